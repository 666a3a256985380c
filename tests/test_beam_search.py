"""Trie-constrained beam search and the score-tensor contract, on tiny random models (seconds)."""
import itertools

import pytest
import torch

from recbole_genrec.evaluator.beam_search import constrained_beam_search, trie_beam_search
from recbole_genrec.evaluator.scores import beam_scores_to_full
from recbole_genrec.model.seq2seq import BeamDecoder, Seq2SeqBackbone, SemanticTokenLayout
from recbole_genrec.tokenizer.trie import PrefixTrie

TINY_T5 = {"d_model": 16, "d_kv": 8, "d_ff": 32, "num_encoder_layers": 2, "num_decoder_layers": 2,
           "num_heads": 2, "dropout_rate": 0.0, "feed_forward_proj": "relu",
           "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16,
           "attn_implementation": "sdpa"}


def random_codes(n_items, sizes, seed=0):
    """Unique random codes for items 1..n_items (row 0 = padding) drawn from a sparse subset of IDs."""
    g = torch.Generator().manual_seed(seed)
    all_ids = torch.tensor(list(itertools.product(*[range(k) for k in sizes])))
    pick = torch.randperm(len(all_ids), generator=g)[:n_items]
    return torch.cat([torch.zeros(1, len(sizes), dtype=torch.long), all_ids[pick]])


def tiny_backbone(codes, sizes, seed=0, num_user_tokens=5):
    torch.manual_seed(seed)
    layout = SemanticTokenLayout(codes, sizes, num_user_tokens=num_user_tokens)
    backbone = Seq2SeqBackbone(layout, TINY_T5).eval()
    # larger weights than T5's init so the distributions are peaked and beams disagree
    with torch.no_grad():
        backbone.t5.lm_head.weight.mul_(30.0)
    return layout, backbone


def random_histories(layout, n_items, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_len = torch.randint(1, 6, (batch,), generator=g)
    seq = torch.randint(1, n_items + 1, (batch, 5), generator=g)
    seq[torch.arange(5)[None, :] >= seq_len[:, None]] = 0
    user = torch.randint(1, 50, (batch,), generator=g)
    return layout.encoder_input(seq, seq_len, user)


def exhaustive_log_probs(backbone, layout, input_ids, mask, n_items):
    """Teacher-forced log p(item | user) for every item 1..n: the ground truth for the beam."""
    B = input_ids.shape[0]
    codes = layout.codes[1:]  # [n, L]
    enc = backbone.encode(input_ids, mask)
    enc = enc.repeat_interleave(n_items, 0)
    m = mask.repeat_interleave(n_items, 0)
    c = codes.repeat(B, 1)
    hidden, _ = backbone.decode(layout.decoder_input(c), enc, m)
    logp = torch.log_softmax(backbone.layer_logits(hidden), dim=-1)
    return logp.gather(2, c[:, :, None]).squeeze(2).sum(1).view(B, n_items)


SIZES = [4, 3, 5]
N_ITEMS = 25


@pytest.fixture(scope="module")
def tiny():
    codes = random_codes(N_ITEMS, SIZES)
    layout, backbone = tiny_backbone(codes, SIZES)
    trie = PrefixTrie.from_codes(codes[1:], torch.arange(1, N_ITEMS + 1), SIZES)
    input_ids, mask = random_histories(layout, N_ITEMS, batch=7)
    return codes, layout, backbone, trie, input_ids, mask


@torch.no_grad()
def test_beam_decoder_matches_hf_decoder(tiny):
    """The incremental decoder (shared cross-attention K/V, per-beam self cache) = the HF T5 decoder."""
    codes, layout, backbone, trie, input_ids, mask = tiny
    enc = backbone.encode(input_ids, mask)
    target = codes[torch.arange(1, 8)]  # one full ID per user
    hidden, _ = backbone.decode(layout.decoder_input(target), enc, mask)
    expected = torch.log_softmax(backbone.layer_logits(hidden), dim=-1)
    dec = BeamDecoder(backbone, enc, mask)
    parent = torch.arange(7)
    for d in range(len(SIZES)):
        got = dec.step(d, None if d == 0 else target[:, d - 1], None if d == 0 else parent)
        assert torch.allclose(got, expected[:, d, :SIZES[d]], atol=1e-5)


@torch.no_grad()
def test_beam_never_emits_invalid_ids(tiny):
    codes, layout, backbone, trie, input_ids, mask = tiny
    valid = set(range(1, N_ITEMS + 1))
    for beam in (1, 3, 10, 40):
        items, scores = constrained_beam_search(backbone, input_ids, mask, trie, beam)
        finite = torch.isfinite(scores)
        assert finite[:, 0].all()
        assert set(items[finite].tolist()) <= valid
        assert (items[~finite] == 0).all()
        for row, ok in zip(items, finite):  # no item twice in a user's beam
            assert len(set(row[ok].tolist())) == int(ok.sum())
        assert (scores[:, :-1] >= scores[:, 1:]).all() or beam == 1  # sorted best first
        assert items.shape[1] <= beam
    # a beam wider than the number of valid IDs returns them all, the rest -inf
    items, scores = constrained_beam_search(backbone, input_ids, mask, trie, 40)
    assert (torch.isfinite(scores).sum(1) == N_ITEMS).all()


@torch.no_grad()
def test_beam_finds_exact_top_k_when_exhaustive(tiny):
    codes, layout, backbone, trie, input_ids, mask = tiny
    exact = exhaustive_log_probs(backbone, layout, input_ids, mask, N_ITEMS)  # [B, n]
    items, scores = constrained_beam_search(backbone, input_ids, mask, trie, N_ITEMS)
    top_scores, top_idx = exact.topk(10, dim=1)
    assert torch.equal(items[:, :10], top_idx + 1)
    assert torch.allclose(scores[:, :10], top_scores, atol=1e-4)
    # beam scores are the items' exact sequence log-probabilities at any beam size
    for beam in (2, 5):
        items, scores = constrained_beam_search(backbone, input_ids, mask, trie, beam)
        assert torch.allclose(scores, exact.gather(1, items - 1), atol=1e-4)


def test_trie_beam_search_on_hand_made_distribution():
    """Generic search on a fixed per-prefix distribution where the greedy path is not the best item."""
    # L=2, K=[2,2]; valid IDs: (0,0) (0,1) (1,1) -> items 1, 2, 3
    codes = torch.tensor([[0, 0], [0, 1], [1, 1]])
    trie = PrefixTrie.from_codes(codes, torch.tensor([1, 2, 3]), [2, 2])
    p0 = torch.tensor([0.6, 0.4]).log()
    p1 = {0: torch.tensor([0.5, 0.5]).log(), 1: torch.tensor([0.01, 0.99]).log()}

    def step(depth, last, parent):
        if depth == 0:
            return p0.expand(2, 2)
        return torch.stack([p1[int(c)] for c in last])  # (test helper only: per-row lookup)

    items, scores = trie_beam_search(step, trie, batch_size=2, beam_size=2)
    assert items[0].tolist() == [3, 1] or items[0].tolist() == [3, 2]
    assert torch.allclose(scores[0, 0], torch.tensor(0.4 * 0.99).log())
    items, scores = trie_beam_search(step, trie, batch_size=2, beam_size=1)
    assert items[:, 0].tolist() == [1, 1] or items[:, 0].tolist() == [2, 2]  # greedy misses item 3
    items, scores = trie_beam_search(step, trie, batch_size=2, beam_size=5)
    assert sorted(items[0][torch.isfinite(scores[0])].tolist()) == [1, 2, 3]


# ---- score-tensor contract ------------------------------------------------------------------
def check_contract(full, items, scores, max_k):
    assert full.dtype == torch.float32 and not torch.isnan(full).any() and torch.isfinite(full).all()
    ranked = full.clone()
    ranked[:, 0] = float("-inf")  # what RecBole does
    for r in range(full.shape[0]):
        found = [int(i) for i, s in zip(items[r], scores[r]) if torch.isfinite(s) and i > 0]
        row = ranked[r]
        assert torch.isfinite(row).sum() >= max_k
        assert len(torch.unique(row[torch.isfinite(row)])) == int(torch.isfinite(row).sum())  # distinct
        unfound = torch.ones_like(row, dtype=torch.bool)
        unfound[found] = False
        unfound[0] = False
        if found and unfound.any():
            assert row[unfound].max() < row[found].min()
        if found:
            assert torch.allclose(row[found], scores[r][torch.isfinite(scores[r]) & (items[r] > 0)])
        top = torch.topk(row, max_k).indices.tolist()
        n_in = min(len(found), max_k)
        assert set(top[:n_in]) <= set(found)  # found items first
        if len(found) >= max_k:
            assert set(top) <= set(found)  # an unfound item never enters the top max(topk)
    return True


def test_score_tensor_contract_full_and_short_beams():
    n_items, max_k = 50, 20
    g = torch.Generator().manual_seed(3)
    items = torch.stack([torch.randperm(n_items - 1, generator=g)[:20] + 1 for _ in range(4)])
    scores = -torch.rand(4, 20, generator=g).sort(dim=1, descending=False).values * 30
    scores = scores.sort(dim=1, descending=True).values
    # row 1: only 3 items found; row 2: nothing found; row 3: very low log-probs
    scores[1, 3:] = float("-inf")
    items[1, 3:] = 0
    scores[2] = float("-inf")
    items[2] = 0
    scores[3] = scores[3] - 5000
    full = beam_scores_to_full(items, scores, n_items)
    assert full.shape == (4, n_items)
    check_contract(full, items, scores, max_k)
    # the fill is deterministic: two rows with nothing found rank identically
    again = beam_scores_to_full(items, scores, n_items)
    assert torch.equal(full, again)


@torch.no_grad()
def test_score_tensor_contract_from_real_beams(tiny):
    codes, layout, backbone, trie, input_ids, mask = tiny
    for beam in (20, 40):
        items, scores = constrained_beam_search(backbone, input_ids, mask, trie, beam)
        full = beam_scores_to_full(items, scores, N_ITEMS + 1)
        check_contract(full, items, scores, max_k=20)
