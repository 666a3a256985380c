"""TIGER: token layout, loss, beam-size check and a one-epoch run through run_recbole_genrec (tiny data)."""
import json
import os
import types

import pytest
import torch

from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.model.seq2seq import SemanticTokenLayout, token_cross_entropy
from recbole_genrec.quick_start import run_recbole_genrec
from recbole_genrec.tokenizer.trie import PrefixTrie
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict

# GENREC_TEST_DEVICE=cuda runs the training tests on a GPU (same assertions).
DEVICE = os.environ.get("GENREC_TEST_DEVICE", "cpu")
TINY_TIGER = {"device": DEVICE, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8, "d_model": 16,
              "d_ff": 32, "num_user_tokens": 7, "train_batch_size": 64, "beam_size": 20}


def fake_semantic_ids(config, dataset, sizes=(3, 4, 4)):
    """Unique random codes for the dataset's items (the semantic-ID layer is tested on its own)."""
    n = dataset.item_num
    g = torch.Generator().manual_seed(0)
    total = sizes[0] * sizes[1] * sizes[2]
    assert n - 1 <= total
    flat = torch.randperm(total, generator=g)[: n - 1]
    codes = torch.stack([flat // (sizes[1] * sizes[2]), (flat // sizes[2]) % sizes[1], flat % sizes[2]], 1)
    codes = torch.cat([torch.zeros(1, 3, dtype=torch.long), codes])
    trie = PrefixTrie.from_codes(codes[1:], torch.arange(1, n), list(sizes))
    return types.SimpleNamespace(codes=codes, codebook_sizes=list(sizes), num_layers=3,
                                 embeddings=torch.zeros(n, 4), report={"fake": True}, trie=trie)


@pytest.fixture
def fake_sids(monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)


def test_token_layout_offsets_and_inputs():
    codes = torch.tensor([[0, 0], [1, 2], [0, 1], [2, 0]])
    layout = SemanticTokenLayout(codes, [3, 4], num_user_tokens=5)
    assert layout.offsets.tolist() == [2, 5]
    assert layout.vocab_size == 2 + 3 + 4 + 5
    assert layout.item_tokens.tolist() == [[0, 0], [3, 7], [2, 6], [4, 5]]
    seq = torch.tensor([[1, 2, 0], [3, 0, 0]])
    ids, mask = layout.encoder_input(seq, torch.tensor([2, 1]), torch.tensor([12, 3]))
    assert ids.tolist() == [[9 + 12 % 5, 3, 7, 2, 6], [9 + 3, 4, 5, 0, 0]]  # user token, then item tokens
    assert mask.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert layout.decoder_input(codes[1:3]).tolist() == [[0, 3], [0, 2]]


def test_token_cross_entropy_weights_and_temperature():
    logits = torch.randn(4, 2, 5)
    logits[:, 1, 4] = float("-inf")  # layer 1 has only 4 codes
    codes = torch.tensor([[0, 1], [2, 3], [4, 0], [1, 1]])
    plain = token_cross_entropy(logits, codes)
    assert torch.isfinite(plain)
    assert torch.allclose(token_cross_entropy(logits, codes, weights=torch.ones(2)), plain)
    per = token_cross_entropy(logits, codes, reduction="none")
    assert per.shape == (4, 2)
    w = torch.tensor([2.0, 0.0])
    assert torch.allclose(token_cross_entropy(logits, codes, weights=w), (per * w).mean())
    assert not torch.allclose(token_cross_entropy(logits, codes, temperature=2.0), plain)


def test_beam_smaller_than_topk_is_a_user_error(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    with pytest.raises(GenRecError, match="beam_size"):
        run_recbole_genrec(model="TIGER", dataset=name,
                           config_dict=tiny_config_dict(data_path, **{**TINY_TIGER, "beam_size": 10}))


def test_one_epoch_run_writes_result(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    out = run_dirs / "tiger.json"
    record = run_recbole_genrec(model="TIGER", dataset=name, config_dict=tiny_config_dict(data_path, **TINY_TIGER),
                                result_file=str(out))
    saved = json.loads(out.read_text())
    assert saved["model"] == "TIGER"
    for key in ("hit@10", "ndcg@10", "recall@20"):
        assert 0.0 <= saved["test_result"][key] <= 1.0
    assert saved["extras"]["semantic_ids"] == {"fake": True}
    assert saved["extras"]["beam_size"] == 20
    assert record["timings"]["epochs_trained"] == 1


def test_training_learns_and_beam_scores_are_valid(tiny_dataset, run_dirs, fake_sids):
    """A few epochs on the learnable tiny data beat a random ranking; full_sort_predict's contract."""
    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data

    data_path, name = tiny_dataset
    config = load_config("TIGER", name, config_dict=tiny_config_dict(
        data_path, **{**TINY_TIGER, "epochs": 8, "learning_rate": 0.01, "dropout_rate": 0.0}))
    dataset, train, valid, test = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train)
    trainer.fit(train, valid, saved=False, show_progress=False)
    batch = next(iter(test))[0]
    scores = model.full_sort_predict(batch.to(model.device))
    assert scores.shape == (len(batch), model.n_items)
    assert torch.isfinite(scores).all()
    for row in scores:
        assert len(torch.unique(row[1:])) == model.n_items - 1
    result = trainer.evaluate(test, load_best_model=False, show_progress=False)
    assert result["hit@10"] > 10 / (model.n_items - 1)


def test_beam_analysis_on_a_checkpoint(tiny_dataset, run_dirs, fake_sids):
    from recbole_genrec.beam_analysis import analyse, format_table

    data_path, name = tiny_dataset
    record = run_recbole_genrec(model="TIGER", dataset=name, config_dict=tiny_config_dict(data_path, **TINY_TIGER),
                                result_file=str(run_dirs / "r.json"))
    result = analyse(record["checkpoint"], [10, 20, 40])
    rows = {r["beam_size"]: r for r in result["rows"]}
    assert sorted(rows) == [10, 20, 40]
    assert rows[40]["top5_overlap_with_largest"] == 1.0
    assert rows[20]["ndcg@10"] == pytest.approx(record["test_result"]["ndcg@10"], abs=1e-4)
    assert all(r["eval_seconds"] > 0 and r["users"] == rows[40]["users"] for r in rows.values())
    assert "NDCG@10" in format_table(result)
    with pytest.raises(GenRecError, match="beam sizes"):
        analyse(record["checkpoint"], [5, 20])


def test_training_forward_reads_no_deprecated_cache_name(monkeypatch):
    """transformers 5.x logs (not warns) when ``past_key_values`` is passed or read; the backbone must use ``cache``."""
    from transformers.utils import generic

    logged = []
    monkeypatch.setattr(generic.logger, "warning_once", lambda msg, *a, **k: logged.append(msg))
    codes = torch.tensor([[0, 0], [1, 2], [0, 1], [2, 0]])
    layout = SemanticTokenLayout(codes, [3, 4], num_user_tokens=5)
    from recbole_genrec.model.seq2seq import Seq2SeqBackbone

    cfg = dict(TINY_TIGER, dropout_rate=0.1, feed_forward_proj="relu", relative_attention_num_buckets=32,
               relative_attention_max_distance=128, attn_implementation="sdpa")
    backbone = Seq2SeqBackbone(layout, _Cfg(cfg))
    ids = torch.tensor([[3, 7, 2, 6]])
    backbone(ids, ids != 0, layout.decoder_input(codes[1:2]))
    assert not [m for m in logged if "past_key_values" in str(m)]


class _Cfg(dict):
    """A RecBole-Config-like mapping: missing keys read as None."""

    def __getitem__(self, key):
        return dict.get(self, key)

    def __contains__(self, key):
        return dict.__contains__(self, key)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    """``gradient_checkpointing: True`` recomputes the blocks in backward (dropout replayed from the saved RNG
    state): loss and every gradient equal the plain step's; a non-boolean value is a one-line error."""
    from recbole_genrec.model.seq2seq import Seq2SeqBackbone

    codes = torch.tensor([[0, 0], [1, 2], [0, 1], [2, 0]])
    layout = SemanticTokenLayout(codes, [3, 4], num_user_tokens=5)
    base = dict(TINY_TIGER, dropout_rate=0.3, feed_forward_proj="relu", relative_attention_num_buckets=32,
                relative_attention_max_distance=128, attn_implementation="sdpa")
    ids = torch.tensor([[3, 7, 2, 6], [0, 5, 8, 4]])
    target = codes[[1, 3]]
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        backbone = Seq2SeqBackbone(layout, _Cfg(dict(base, gradient_checkpointing=flag)))
        backbone.train()
        t5 = backbone.t5
        assert (t5.is_activation_checkpointing if hasattr(t5, "is_activation_checkpointing")
                else t5.is_gradient_checkpointing) == flag
        torch.manual_seed(1)
        logits = backbone(ids, ids != 0, layout.decoder_input(target))
        loss = token_cross_entropy(logits, target)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in backbone.named_parameters()
                                        if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-5), name
    with pytest.raises(GenRecError, match="gradient_checkpointing must be True or False"):
        Seq2SeqBackbone(layout, _Cfg(dict(base, gradient_checkpointing="yes")))
