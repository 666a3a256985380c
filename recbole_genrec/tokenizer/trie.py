"""Prefix trie over valid semantic IDs as dense per-depth transition tables, for constrained decoding.

``children[d]`` is ``[num_nodes_at_depth_d, K_d]``: entry ``[node, token]`` is the index of the child node at
depth ``d+1``, or ``-1`` when no item's ID continues ``node``'s prefix with ``token``. The root is node 0 at
depth 0; nodes at depth ``d`` are the distinct length-``d`` prefixes in lexicographic order.
``leaf_item[node]`` maps a depth-L node to its item id. Built in O(L n log n) with sorts, no Python loop
over items.

A level whose dense table would exceed ``DENSE_MAX_ENTRIES`` is a :class:`SparseLevel` (its ``n_children`` edges,
sorted) that answers the same indexing: ``level[nodes]`` gives the dense rows ``[..., K_d]`` of just those nodes.
At a million items the collision level (``collision: append``) has ~N nodes x the largest collision group
(hundreds) columns, almost all ``-1``: gigabytes as a dense table, growing faster than N.
"""
import torch

from recbole_genrec.tokenizer.collision import row_keys

DENSE_MAX_ENTRIES = 2**24  # larger levels are stored sparse (a dense [2**24] int64 table is 128 MB)


class SparseLevel:
    """One trie level as its edges: ``key[j] = parent * K + token`` of child node ``j`` (ascending, since children
    are numbered in lexicographic order of their prefixes). Indexing matches the dense ``[num_parents, K]`` table:
    ``level[nodes]`` -> ``[*nodes.shape, K]`` child ids (``-1`` where none), ``level[nodes, tokens]`` -> child ids."""

    def __init__(self, key, num_parents, width):
        self.key = key
        self.num_parents = int(num_parents)
        self.width = int(width)

    @property
    def shape(self):
        return torch.Size([self.num_parents, self.width])

    @property
    def device(self):
        return self.key.device

    dtype = torch.long

    def to(self, device):
        return SparseLevel(self.key.to(device), self.num_parents, self.width)

    def nbytes(self):
        return self.key.numel() * self.key.element_size()

    def _find(self, query):
        pos = torch.searchsorted(self.key, query).clamp_max_(max(self.key.numel() - 1, 0))
        if self.key.numel() == 0:
            return torch.full_like(query, -1)
        return torch.where(self.key[pos] == query, pos, torch.full_like(pos, -1))

    def __getitem__(self, index):
        if isinstance(index, tuple):
            nodes, tokens = (torch.as_tensor(i, device=self.device).long() for i in index)
            return self._find(nodes * self.width + tokens)
        nodes = torch.as_tensor(index, device=self.device).long()
        return self._find(nodes[..., None] * self.width + torch.arange(self.width, device=self.device))

    def dense(self):
        return self[torch.arange(self.num_parents, device=self.device)]

    def tolist(self):
        return self.dense().tolist()


class PrefixTrie:
    def __init__(self, children, leaf_item):
        self.children = list(children)
        self.leaf_item = leaf_item

    @classmethod
    def from_codes(cls, codes, item_ids=None, codebook_sizes=None):
        """Trie over the rows of ``codes`` ``[n, L]`` (unique rows); ``item_ids[i]`` is row i's item id."""
        codes = codes.long().cpu()
        n, L = codes.shape
        item_ids = torch.arange(n) if item_ids is None else torch.as_tensor(item_ids, dtype=torch.long)
        sizes = list(codebook_sizes) if codebook_sizes is not None else (codes.max(0).values + 1).tolist()
        parent = torch.zeros(n, dtype=torch.long)  # node index of each item's prefix at the current depth
        num_parents, children = 1, []
        for d in range(L):
            node_key = row_keys(codes[:, :d + 1], sizes[:d + 1])
            uniq, child = torch.unique(node_key, sorted=True, return_inverse=True)
            if num_parents * int(sizes[d]) <= DENSE_MAX_ENTRIES:
                table = torch.full((num_parents, int(sizes[d])), -1, dtype=torch.long)
                table[parent, codes[:, d]] = child
            else:  # edge keys in child order (ascending: children are sorted by (parent, token))
                key = torch.empty(len(uniq), dtype=torch.long)
                key[child] = parent * int(sizes[d]) + codes[:, d]
                table = SparseLevel(key, num_parents, sizes[d])
            children.append(table)
            parent, num_parents = child, len(uniq)
        leaf_item = torch.full((num_parents,), -1, dtype=torch.long)
        leaf_item[parent] = item_ids
        return cls(children, leaf_item)

    @property
    def num_layers(self):
        return len(self.children)

    def nbytes(self):
        """Bytes held by the transition tables and the leaf map."""
        return sum(c.nbytes() if isinstance(c, SparseLevel) else c.numel() * c.element_size()
                   for c in self.children) + self.leaf_item.numel() * self.leaf_item.element_size()

    def to(self, device):
        return PrefixTrie([c.to(device) for c in self.children], self.leaf_item.to(device))

    def step(self, nodes, tokens, depth):
        """Child node indices (``-1`` where invalid) for ``nodes`` at ``depth`` after ``tokens``."""
        nodes = torch.as_tensor(nodes, device=self.children[depth].device)
        tokens = torch.as_tensor(tokens, device=self.children[depth].device)
        out = torch.full_like(nodes, -1)
        ok = nodes >= 0
        out[ok] = self.children[depth][nodes[ok], tokens[ok]]
        return out

    def valid_mask(self, nodes, depth):
        """``[len(nodes), K_depth]`` bool: tokens that keep each prefix a prefix of some item's ID."""
        return self.children[depth][torch.as_tensor(nodes, device=self.children[depth].device)] >= 0

    def lookup(self, codes):
        """Item id of each full ID in ``codes`` ``[m, L]`` (``-1`` for an ID no item has)."""
        codes = torch.as_tensor(codes, device=self.leaf_item.device).long()
        node = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        for d in range(self.num_layers):
            node = self.step(node, codes[:, d].clamp(0, self.children[d].shape[1] - 1), d)
            node[(codes[:, d] < 0) | (codes[:, d] >= self.children[d].shape[1])] = -1
        out = torch.full_like(node, -1)
        out[node >= 0] = self.leaf_item[node[node >= 0]]
        return out
