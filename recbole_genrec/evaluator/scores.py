"""Beam results -> a ``[batch, n_items]`` score tensor that RecBole's own metrics rank unchanged.

Contract (tested in tests/test_beam_search.py):

* items the beam found carry their sequence log-probabilities;
* every other item (padding item 0 included; RecBole sets it to ``-inf`` itself) carries a fill score
  ``FILL_BASE - rank``, distinct and strictly decreasing in a fixed item order (item id ascending),
  so it is below every found item and the row holds ``n_items`` distinct finite scores;
* hence ``torch.topk(scores, K)`` returns the found items first, best first, and an unfound item can
  enter the top K only when the beam found fewer than K valid items (then the fill decides, always
  the same way); no NaN, no ``inf``.

Found log-probabilities are clamped to ``> FILL_BASE`` (a sequence log-probability of -1e5 would need
astronomically unlikely tokens; the clamp only exists so the invariant holds unconditionally).
"""
import torch

FILL_BASE = -1.0e6  # float32 holds FILL_BASE - i exactly for i < 1.5e7 items
FOUND_FLOOR = FILL_BASE / 2


def fill_scores(n_items, device=None):
    """``[n_items]`` strictly decreasing finite scores, all below any found score."""
    return FILL_BASE - torch.arange(n_items, dtype=torch.float32, device=device)


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
