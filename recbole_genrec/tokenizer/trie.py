"""Prefix trie over valid semantic IDs as dense per-depth transition tables, for constrained decoding.

``children[d]`` is ``[num_nodes_at_depth_d, K_d]``: entry ``[node, token]`` is the index of the child node at
depth ``d+1``, or ``-1`` when no item's ID continues ``node``'s prefix with ``token``. The root is node 0 at
depth 0; nodes at depth ``d`` are the distinct length-``d`` prefixes in lexicographic order.
``leaf_item[node]`` maps a depth-L node to its item id. Built in O(L n log n) with sorts, no Python loop
over items.
"""
import torch

from recbole_genrec.tokenizer.collision import row_keys


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
            table = torch.full((num_parents, int(sizes[d])), -1, dtype=torch.long)
            table[parent, codes[:, d]] = child
            children.append(table)
            parent, num_parents = child, len(uniq)
        leaf_item = torch.full((num_parents,), -1, dtype=torch.long)
        leaf_item[parent] = item_ids
        return cls(children, leaf_item)

    @property
    def num_layers(self):
        return len(self.children)

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
