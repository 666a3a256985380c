"""Collision handling: after it every item has a unique ID (checked by :func:`assert_unique`).

``append`` (TIGER, Rajput et al. 2023, Sec. 3.1): one extra last token numbers the items that share a
code (0, 1, 2, ... in item order); the ID length grows by one and that layer's size is the largest group.
``reassign``: the items of a shared code, except the one closest to the code, move to the nearest free
code of the last layer under the same prefix (greedy, nearest first); the ID length stays L.
"""
import torch

from recbole_genrec.utils import GenRecError


def row_keys(codes, sizes=None):
    """One int64 key per row of ``codes`` that is equal iff the rows are equal (mixed radix ``sizes``)."""
    codes = codes.long()
    if codes.shape[1] == 0:
        return torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    if sizes is None:
        sizes = (codes.max(0).values + 1).tolist() if codes.shape[0] else [1] * codes.shape[1]
    total = 1
    for s in sizes:
        total *= max(int(s), 1)
    if total >= 2**62:  # too many combinations for one int64: fall back to row-wise unique
        return torch.unique(codes, dim=0, return_inverse=True)[1]
    key = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
    for j, s in enumerate(sizes):
        key = key * max(int(s), 1) + codes[:, j]
    return key


def collision_stats(codes):
    """Share of items whose code another item also has, and the largest group of identical codes."""
    n = codes.shape[0]
    if n == 0:
        return {"collision_rate": 0.0, "colliding_items": 0, "max_items_per_code": 0, "unique_codes": 0}
    _, inverse, counts = torch.unique(row_keys(codes), return_inverse=True, return_counts=True)
    colliding = int((counts[inverse] > 1).sum())
    return {"collision_rate": colliding / n, "colliding_items": colliding,
            "max_items_per_code": int(counts.max()), "unique_codes": int(len(counts)),
            "duplicate_rate": 1.0 - len(counts) / n}


def append_index(codes):
    """``[n, L] -> [n, L+1]``: the extra token numbers items within each group of identical codes."""
    n = codes.shape[0]
    if n == 0:
        return torch.zeros(0, codes.shape[1] + 1, dtype=torch.long), 1
    key = row_keys(codes)
    order = torch.sort(key, stable=True).indices  # groups contiguous, item order kept inside a group
    sorted_key = key[order]
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = sorted_key[1:] != sorted_key[:-1]
    group_start = torch.cummax(torch.where(new_group, torch.arange(n), torch.zeros(n, dtype=torch.long)), 0).values
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n) - group_start
    return torch.cat([codes.long(), rank[:, None]], 1), int(rank.max()) + 1


def reassign_last(codes, last_layer_distances, codebook_size):
    """Move colliding items to the nearest free last-layer code with the same prefix.

    ``last_layer_distances(rows) -> [len(rows), K]`` gives the distances used both to choose which item keeps
    a shared code (the closest) and where the others go. Raises ``GenRecError`` when a prefix holds more
    items than the last layer has codes.
    """
    codes = codes.clone().long()
    n, L = codes.shape
    key = row_keys(codes)
    _, inverse, counts = torch.unique(key, return_inverse=True, return_counts=True)
    rows = (counts[inverse] > 1).nonzero().flatten()
    if len(rows) == 0:
        return codes, 0
    prefix = row_keys(codes[:, :L - 1])
    prefix_sizes = torch.bincount(torch.unique(prefix, return_inverse=True)[1])
    if int(prefix_sizes.max()) > codebook_size:
        raise GenRecError(
            f"collision=reassign cannot make IDs unique: {int(prefix_sizes.max())} items share one prefix but the "
            f"last layer has only {codebook_size} codes; use --collision=append or a larger codebook_size"
        )
    dist = last_layer_distances(rows)  # [m, K]
    own = dist[torch.arange(len(rows)), codes[rows, L - 1]]
    # Keepers: per shared code, the item closest to it stays.
    order = torch.argsort(own, stable=True)
    keep = torch.zeros(len(rows), dtype=torch.bool)
    seen = set()
    for j in order.tolist():
        k = int(key[rows[j]])
        if k not in seen:
            seen.add(k)
            keep[j] = True
    used = {}  # prefix key -> set of taken last-layer codes
    for p, c in zip(prefix.tolist(), codes[:, L - 1].tolist()):
        used.setdefault(p, set()).add(c)
    movers = (~keep).nonzero().flatten()
    ranking = torch.argsort(dist[movers], dim=1, stable=True)
    moved = 0
    for mi, j in enumerate(movers.tolist()):
        item = int(rows[j])
        taken = used[int(prefix[item])]
        for c in ranking[mi].tolist():
            if c not in taken:
                taken.add(c)
                codes[item, L - 1] = c
                moved += 1
                break
    return codes, moved


def assert_unique(codes):
    """Raise ``GenRecError`` if two rows of ``codes`` are equal."""
    stats = collision_stats(codes)
    if stats["unique_codes"] != codes.shape[0]:
        raise GenRecError(
            f"semantic IDs are not unique: {stats['colliding_items']} items share an ID (largest group "
            f"{stats['max_items_per_code']}); use --collision=append or a larger codebook_size"
        )
