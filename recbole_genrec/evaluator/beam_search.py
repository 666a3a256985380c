"""Trie-constrained beam search over semantic IDs, batched over users and beams.

Only the L decoding steps are a Python loop; users and beams are tensor axes. At depth ``d`` a beam
that sits on trie node ``n`` may only extend with the codes ``c`` where ``trie.children[d][n, c] >= 0``,
so every finished beam is a valid item (``trie.leaf_item``). Log-probabilities come from the model's
``step`` function, already restricted to layer ``d``'s token range.
"""
import torch

NEG_INF = float("-inf")


def trie_beam_search(step, trie, batch_size, beam_size):
    """Run the constrained beam search.

    Args:
        step: ``step(depth, last_codes, parent) -> log_probs [B * w, K_depth]``. At depth 0
            ``last_codes`` and ``parent`` are ``None`` and there is one row per user; later, ``parent``
            ``[B * w]`` holds, for each new beam row, the row of the previous step it extends (the model
            reorders its per-beam cache with it) and ``last_codes`` the code chosen at ``depth - 1``.
        trie: a PrefixTrie (``children`` list of ``[nodes_d, K_d]`` LongTensors, ``-1`` = invalid;
            ``leaf_item`` ``[nodes_L]``), on the model's device.
        beam_size: beams kept per user.

    Returns:
        ``(items [B, W'], scores [B, W'])`` sorted best first, ``W' <= beam_size``; ``scores`` are summed
        log-probabilities, ``-inf`` (with item 0) where fewer than ``W'`` valid IDs exist.
    """
    B = batch_size
    children = trie.children
    device = children[0].device
    node = torch.zeros(B, 1, dtype=torch.long, device=device)
    score = torch.zeros(B, 1, device=device)
    last_codes = parent = None
    row_base = torch.arange(B, device=device)[:, None]
    for depth, child_table in enumerate(children):
        log_probs = step(depth, last_codes, parent)
        w = node.shape[1]
        K = log_probs.shape[-1]
        child = child_table[node]  # [B, w, K]
        cand = score[:, :, None] + log_probs.view(B, w, K).to(score.dtype)
        cand = cand.masked_fill(child < 0, NEG_INF).view(B, w * K)
        k = min(beam_size, w * K)
        score, flat_idx = cand.topk(k, dim=1)
        node = child.view(B, w * K).gather(1, flat_idx)
        dead = torch.isinf(score) | (node < 0)
        score = score.masked_fill(dead, NEG_INF)
        node = node.clamp_min(0)
        parent = (row_base * w + flat_idx // K).reshape(-1)
        last_codes = (flat_idx % K).reshape(-1)
    items = trie.leaf_item[node].masked_fill(torch.isinf(score), 0)
    return items, score


def constrained_beam_search(backbone, input_ids, attention_mask, trie, beam_size, encoder_hidden=None):
    """Encode once per user, then decode with the backbone's ``beam_decoder`` (for
    :class:`~recbole_genrec.model.seq2seq.Seq2SeqBackbone`, a ``BeamDecoder``; the evaluator layer does not
    import the model layer, docs/architecture.md).

    ``encoder_hidden [B, T', d]`` (optional) are states already computed by the caller, with
    ``attention_mask [B, T']`` their mask (TIGER++ appends retrieved users' states to the encoder's)."""
    if encoder_hidden is None:
        encoder_hidden = backbone.encode(input_ids, attention_mask)
    decoder = backbone.beam_decoder(encoder_hidden, attention_mask)
    return trie_beam_search(decoder.step, trie, input_ids.shape[0], beam_size)
