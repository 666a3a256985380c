"""Beam results -> a ``[batch, n_items]`` score tensor that RecBole's own metrics rank unchanged.

Contract (tested in tests/test_beam_search.py):

* items the beam found carry their sequence log-probabilities;
* every other item (padding item 0 included; RecBole sets it to ``-inf`` itself) carries a fill score
  ``FILL_BASE - rank``, distinct and strictly decreasing in a fixed item order (item id ascending),
  so it is below every found item and the row holds ``n_items`` distinct finite scores;
* hence ``torch.topk(scores, K)`` returns the found items first, best first, and an unfound item can
  enter the top K only when the beam found fewer than K valid items (then the fill decides, always
  the same way); no NaN, no ``inf``.

Ties (every model, stock or plugin): equal scores are never decided by internal item ids, which RecBole assigns
in the order items first appear in the file. Each item gets a tie-break rank from a seeded hash of its *raw* token
(:func:`tie_order`: ``blake2b(f"{seed}\t{token}")``, ascending); among equal scores the item with the lower rank
comes first (:func:`tie_broken_topk`, used by every trainer's evaluation collector). So a metric does not depend on
the order of the file's lines, is the same on every rerun with the same ``seed``, and over seeds equals the
expectation of a uniformly random tie-break. A generative model's fill for unfound items follows the same order
(:func:`fill_scores` with ``order``).

Found log-probabilities are clamped to ``> FILL_BASE`` (a sequence log-probability of -1e5 would need
astronomically unlikely tokens; the clamp only exists so the invariant holds unconditionally).
"""
import torch

FILL_BASE = -1.0e6  # float32 holds FILL_BASE - i exactly for i < 1.5e7 items
FOUND_FLOOR = FILL_BASE / 2


def fill_scores(n_items, device=None, order=None):
    """``[n_items]`` distinct finite scores, all below any found score: strictly decreasing in item id, or, with
    ``order`` (:func:`tie_order`), strictly decreasing along ``order`` (``order[0]`` gets the highest fill)."""
    ranks = torch.arange(n_items, dtype=torch.float32, device=device)
    if order is None:
        return FILL_BASE - ranks
    fill = torch.empty(n_items, dtype=torch.float32, device=device)
    fill[order.to(device)] = FILL_BASE - ranks
    return fill


def tie_order(tokens, seed):
    """``LongTensor [n]``: item indices sorted by the seeded hash of their raw tokens (``tokens[i]`` of item
    ``i``, e.g. ``dataset.field2id_token[ITEM_ID_FIELD]``); independent of the file's line order."""
    import hashlib

    keys = [int.from_bytes(hashlib.blake2b(f"{seed}\t{t}".encode("utf-8"), digest_size=8).digest(), "big")
            for t in tokens]
    return torch.tensor(sorted(range(len(keys)), key=lambda i: (keys[i], str(tokens[i]))), dtype=torch.long)


def tie_broken_topk(scores, k, order):
    """Indices ``[B, k]`` of the ``k`` best items per row, best first; equal scores in ``order``
    (:func:`tie_order`) rather than by item id. ``O(n_items)`` per row plus a sort of the candidates.

    Works on the candidates ``scores >= k-th best`` (about ``k`` per row): one bool ``[B, n_items]`` mask beside
    ``scores`` instead of a permuted copy and a cumulative count (1 instead of ~20 bytes per entry: 2.5 GB for
    128 users x 1M items). Rows with many tied candidates, or NaN scores, take :func:`_tie_broken_topk_dense`,
    which returns the same indices."""
    B, n = scores.shape
    k = min(int(k), n)
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    cand = scores >= kth
    rows, cols = cand.nonzero(as_tuple=True)  # row-major
    del cand
    m = rows.numel()
    if m > 4 * B * k + 1024 or m < B * k:  # many ties at the k-th score, or NaN: the dense path
        return _tie_broken_topk_dense(scores, k, order)
    order = order.to(scores.device)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=order.device)  # position of each item in the tie order
    r = rank[cols]
    by = torch.argsort(r, stable=True)
    by = by[torch.argsort(rows[by], stable=True)]  # grouped by row, tie rank ascending inside a row
    rows, cols, r = rows[by], cols[by], r[by]
    vals = scores[rows, cols]
    kth_row = kth[rows, 0]
    greater = vals > kth_row
    equal = vals == kth_row
    need = k - torch.zeros(B, dtype=torch.long, device=scores.device).index_add_(0, rows, greater.long())
    eq_count = torch.cumsum(equal.long(), 0)
    counts = torch.bincount(rows, minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    eq_before_row = (eq_count - equal.long())[starts.clamp_max(max(m - 1, 0))].masked_fill(counts == 0, 0)
    eq_rank = eq_count - eq_before_row[rows]  # 1-based rank of an equal candidate among its row's, by tie rank
    chosen = greater | (equal & (eq_rank <= need[rows]))
    if int(chosen.sum()) != B * k:
        return _tie_broken_topk_dense(scores, k, order)
    cols, vals = cols[chosen].view(B, k), vals[chosen].view(B, k)  # tie rank ascending inside a row
    best = torch.sort(vals, dim=1, descending=True, stable=True).indices
    return cols.gather(1, best)


def _tie_broken_topk_dense(scores, k, order):
    """:func:`tie_broken_topk` on the permuted ``[B, n_items]`` scores (any number of ties; NaN)."""
    order = order.to(scores.device)
    permuted = scores.index_select(1, order)  # column j holds item order[j]
    B, n = permuted.shape
    k = min(int(k), n)
    kth = torch.topk(permuted, k, dim=1).values[:, -1:]
    greater = permuted > kth
    equal = permuted == kth
    need = k - greater.sum(dim=1, keepdim=True)
    chosen = greater | (equal & (torch.cumsum(equal, dim=1, dtype=torch.int32) <= need))
    if int(chosen.sum()) != B * k:  # NaN scores: fall back to a full stable sort
        cols = torch.sort(permuted, dim=1, descending=True, stable=True).indices[:, :k]
    else:
        cols = chosen.nonzero()[:, 1].view(B, k)  # ascending column = ascending tie rank
        best = torch.sort(permuted.gather(1, cols), dim=1, descending=True, stable=True).indices
        cols = cols.gather(1, best)
    return order[cols]


def beam_scores_to_full(items, scores, n_items, fill=None):
    """``items, scores [B, W]`` from the beam search (``-inf`` = no item) -> ``[B, n_items]`` float32."""
    B = items.shape[0]
    if fill is None:
        fill = fill_scores(n_items, device=items.device)
    out = fill.expand(B, n_items).clone()
    found = torch.isfinite(scores) & (items > 0)
    values = scores.float().clamp_min(FOUND_FLOOR)
    # scatter only found entries: send the others to their own fill value (a no-op write)
    idx = torch.where(found, items, torch.zeros_like(items))
    src = torch.where(found, values, out.gather(1, idx))
    out.scatter_(1, idx, src)
    return out
