"""ETEGRec: SIA/PSA by hand and their gradient paths, the alternating schedule, ID refresh without stale
IDs, checkpoints that restore the validated codes, and short runs through run_recbole_genrec (tiny data)."""
import json
import math
import os
import types

import pytest
import torch

from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.model.etegrec import code_log_probs, first_occurrence, psa_loss, sia_loss
from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data, run_recbole_genrec
from recbole_genrec.trainer.alternating import AlternatingSchedule
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict

DEVICE = os.environ.get("GENREC_TEST_DEVICE", "cpu")
TINY_ETEGREC = {
    "device": DEVICE, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8, "d_model": 16,
    "d_ff": 32, "use_user_token": True, "num_user_tokens": 7, "train_batch_size": 64, "beam_size": 20,
    "num_codebooks": 2, "codebook_size": 6, "rqvae_latent_dim": 4, "rqvae_hidden_dims": [16], "rqvae_epochs": 4,
    "rqvae_batch_size": 16, "kmeans_iters": 5, "collision_layer_size": 16, "align_warmup_epochs": 0,
    "learning_rate": 0.01, "learning_rate_tokenizer": 0.01,
}


def fake_semantic_ids(config, dataset):
    """Random item embeddings (ETEGRec derives its own codes from the RQ-VAE it fits on them)."""
    n = dataset.item_num
    emb = torch.randn(n, 8, generator=torch.Generator().manual_seed(0))
    emb[0] = 0
    return types.SimpleNamespace(codes=torch.zeros(n, 1, dtype=torch.long), codebook_sizes=[1], embeddings=emb,
                                 report={"fake": True}, trie=None)


@pytest.fixture
def fake_sids(monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)


def build(data_path, name, **overrides):
    config = load_config("ETEGRec", name, config_dict=tiny_config_dict(data_path, **{**TINY_ETEGREC, **overrides}))
    dataset, train, valid, test = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train)
    return model, trainer, train, valid, test


# ---- losses by hand ------------------------------------------------------------------------------
def test_code_log_probs_and_sia_by_hand():
    residuals = torch.tensor([[[1.0, 0.0]]])  # L=1, N=1, d=2
    books = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])  # K=3: sq distances 0, 2, 1
    lp = code_log_probs(residuals, books)
    z = 1 + math.exp(-2) + math.exp(-1)
    assert torch.allclose(lp.exp(), torch.tensor([[[1 / z, math.exp(-2) / z, math.exp(-1) / z]]]))

    p = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.5, 0.0001]]])
    q = torch.tensor([[[0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]])
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b))

    expected = sum(kl(q[0, l].tolist(), p[0, l].tolist()) + kl(p[0, l].tolist(), q[0, l].tolist())
                   for l in range(2)) / 2  # mean over N=1 and L=2
    assert sia_loss(p.log(), q.log()).item() == pytest.approx(expected, rel=1e-5)
    assert sia_loss(p.log(), p.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_psa_by_hand():
    pref = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    sem = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    t = 0.5
    c = 1 / math.sqrt(2)
    sim = [[c / t, 0.0], [c / t, 1 / t]]  # cos(pref_i, sem_j) / t
    row = -math.log(math.exp(sim[0][0]) / (math.exp(sim[0][0]) + math.exp(sim[0][1]))) \
        - math.log(math.exp(sim[1][1]) / (math.exp(sim[1][0]) + math.exp(sim[1][1])))
    col = -math.log(math.exp(sim[0][0]) / (math.exp(sim[0][0]) + math.exp(sim[1][0]))) \
        - math.log(math.exp(sim[1][1]) / (math.exp(sim[0][1]) + math.exp(sim[1][1])))
    assert psa_loss(pref, sem, t).item() == pytest.approx((row + col) / 2, rel=1e-5)


def test_first_occurrence():
    assert first_occurrence(torch.tensor([5, 3, 5, 7, 3])).tolist() == [1, 0, 3]


def test_schedule_phases():
    s = AlternatingSchedule(tokenizer_epochs=2, recommender_epochs=3)
    assert [s.phase(e)[0] for e in range(10)] == list("ttrrrttrrr")
    s = AlternatingSchedule(tokenizer_epochs=1, recommender_epochs=1, alternating_epochs=4)
    assert [s.phase(e)[0] for e in range(7)] == list("trtrrrr")
    with pytest.raises(GenRecError, match="cycle_recommender_epochs"):
        AlternatingSchedule(1, 0)


# ---- gradients per phase -------------------------------------------------------------------------
def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    has = lambda module: any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())  # noqa
    return {"codebooks": model.rqvae.codebooks.grad is not None and bool(model.rqvae.codebooks.grad.abs().sum() > 0),
            "rq_encoder": has(model.rqvae.encoder), "rq_decoder": has(model.rqvae.decoder),
            "t5_encoder": has(model.backbone.t5.encoder.block), "t5_decoder": has(model.backbone.t5.decoder.block),
            "seq_projector": has(model.seq_projector), "pref_projector": has(model.pref_projector)}


def test_alignment_gradients_reach_the_phase_parameters_only(tiny_dataset, run_dirs, fake_sids):
    model, trainer, train, _, _ = build(*tiny_dataset)
    batch = next(iter(train)).to(model.device)
    model.set_phase("recommender", 5)
    model.train()
    ce, vq, sia, psa = model.calculate_loss(batch)
    assert float(vq) == 0.0 and float(ce.detach()) > 0 and float(sia.detach()) > 0 and float(psa.detach()) > 0
    g = _grads(model, sia)
    assert g["t5_encoder"] and g["seq_projector"]
    assert not (g["codebooks"] or g["rq_encoder"] or g["t5_decoder"] or g["pref_projector"])
    g = _grads(model, model.calculate_loss(batch)[3])
    assert g["t5_decoder"] and g["pref_projector"] and not (g["rq_decoder"] or g["rq_encoder"])

    model.set_phase("tokenizer", 5)
    model.train()
    assert not model.backbone.training and model.rqvae.training
    ce, vq, sia, psa = model.calculate_loss(batch)
    assert float(ce) == 0.0 and float(vq.detach()) > 0
    g = _grads(model, sia)
    assert g["codebooks"] and g["rq_encoder"]
    assert not (g["t5_encoder"] or g["seq_projector"] or g["t5_decoder"])
    g = _grads(model, model.calculate_loss(batch)[3])
    assert g["rq_decoder"] and g["rq_encoder"] and not (g["t5_decoder"] or g["pref_projector"])

    model.set_phase("recommender", 0)  # warm-up: no alignment before align_warmup_epochs
    model.align_warmup_epochs = 1
    assert [float(x) == 0.0 for x in model.calculate_loss(batch)[2:]] == [True, True]


def test_frozen_parameters_do_not_change_and_validation_skips_tokenizer_epochs(tiny_dataset, run_dirs, fake_sids):
    model, trainer, train, valid, _ = build(*tiny_dataset, cycle_tokenizer_epochs=1, cycle_recommender_epochs=2)
    snap = lambda module: [p.detach().clone() for p in module.parameters()]  # noqa: E731
    same = lambda a, module: all(torch.equal(x, y) for x, y in zip(a, module.parameters()))  # noqa: E731
    before_rq, before_t5 = snap(model.rqvae), snap(model.backbone)
    trainer._train_epoch(train, 0)  # tokenizer epoch
    assert trainer.phase == "tokenizer" and trainer.eval_step == 2  # (0 + 1) % 2 != 0: no validation
    assert same(before_t5, model.backbone) and not same(before_rq, model.rqvae)
    before_rq, before_t5 = snap(model.rqvae), snap(model.backbone)
    trainer._train_epoch(train, 1)  # recommender epoch
    assert trainer.phase == "recommender" and trainer.eval_step == 1
    assert same(before_rq, model.rqvae) and not same(before_t5, model.backbone)
    assert [h[:2] for h in trainer.phase_history] == [(0, "tokenizer"), (1, "recommender")]
    assert trainer.phase_history[0][2] is not None and trainer.phase_history[1][2] is None


# ---- ID refresh ------------------------------------------------------------------------------------
def _sequence_log_prob(model, input_ids, mask, codes):
    logits = model.backbone(input_ids, mask, model.layout.decoder_input(codes)).float()
    return torch.log_softmax(logits, -1).gather(2, codes[..., None]).squeeze(-1).sum(1)


def test_refresh_leaves_no_stale_id(tiny_dataset, run_dirs, fake_sids):
    model, trainer, train, _, test = build(*tiny_dataset, learning_rate_tokenizer=0.3, cycle_tokenizer_epochs=1)
    batch = next(iter(train)).to(model.device)
    old_codes = model.layout.codes.clone()
    old_trie = model.trie_on(model.device)
    trainer._train_epoch(train, 0)  # a tokenizer epoch, which refreshes the IDs
    changed_items = (model.layout.codes != old_codes).any(1)
    assert trainer.phase_history[0][2] == int(changed_items.sum()) > 0

    fresh = model._tokenize_items(model.rqvae, model.item_text_emb, model.collision_layer_size).to(model.device)
    assert torch.equal(model.layout.codes, fresh) and torch.equal(model.item_codes, fresh)
    assert torch.equal(model.layout.item_tokens[1:], fresh[1:] + model.layout.offsets)
    assert torch.equal(model.target_codes(batch), fresh[batch[model.POS_ITEM_ID]])  # loss targets
    input_ids, _ = model.encoder_input(batch)  # encoder inputs: user token, then the items' new tokens
    seq, n = batch[model.ITEM_SEQ], int(batch[model.ITEM_SEQ_LEN].max())
    expected = model.layout.item_tokens[seq[:, :n]].reshape(len(batch), -1)
    assert torch.equal(input_ids[:, 1:], expected)

    trie = model.trie_on(model.device)  # every device's trie was dropped and is rebuilt from the new codes
    assert trie is not old_trie and list(model._trie_by_device) == [str(model.device)]
    items = torch.arange(1, model.n_items, device=model.device)
    assert torch.equal(trie.lookup(fresh[1:]), items)
    moved = changed_items[1:]
    assert (trie.lookup(old_codes[1:][moved]) != items[moved]).all()  # old IDs no longer name their items

    model.eval()
    tb = next(iter(test))[0].to(model.device)
    input_ids, mask = model.encoder_input(tb)
    found, scores = model.beam_search(input_ids, mask, beam_size=20)
    ok = torch.isfinite(scores)
    assert (found[ok] > 0).all()
    # Beam scores are the model's log-probabilities of the found items' NEW codes.
    rows = ok.nonzero()[:40]
    expect = _sequence_log_prob(model, input_ids[rows[:, 0]], mask[rows[:, 0]], fresh[found[rows[:, 0], rows[:, 1]]])
    assert torch.allclose(scores[rows[:, 0], rows[:, 1]], expect, atol=1e-4)


def test_checkpoint_restores_the_codes_it_was_validated_with(tiny_dataset, run_dirs, fake_sids):
    model, trainer, train, _, _ = build(*tiny_dataset)
    saved_codes = model.layout.codes.clone()
    trainer._save_checkpoint(0, verbose=False)
    with torch.no_grad():
        model.rqvae.codebooks.mul_(-1.0).add_(0.3)  # a different tokenizer, as after more tokenizer epochs
    changed = model.refresh_item_ids()
    per_level = model.refresh_log[-1]["changed_per_level"]
    assert changed > 0 and len(per_level) == saved_codes.shape[1]
    assert max(per_level) <= changed <= sum(per_level)  # an item counts once however many of its tokens moved
    assert per_level == [int(c) for c in (model.layout.codes != saved_codes).sum(0)]
    assert not torch.equal(model.layout.codes, saved_codes)
    ckpt = trainer.load_model_weights(trainer.saved_model_file)
    assert torch.equal(model.layout.codes, saved_codes) and torch.equal(model.item_codes, saved_codes)
    assert torch.equal(model.trie_on(model.device).lookup(saved_codes[1:]), torch.arange(1, model.n_items))
    assert "rqvae.codebooks" in ckpt["state_dict"] and set(ckpt["phase_optimizers"]) == {"tokenizer", "recommender"}


def test_tokenizer_optimizer_has_its_own_schedule_over_tokenizer_epochs_and_resume_continues_it(
        tiny_dataset, run_dirs, fake_sids):
    """Cosine over the tokenizer epochs' steps from learning_rate_tokenizer (as the official ETEGRec code), apart
    from the recommender's; a resumed run continues both; lr_scheduler_tokenizer=constant keeps the rate."""
    def cosine(step, warmup, total):
        return step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))

    settings = dict(epochs=4, lr_scheduler="cosine", warmup_steps=1, learning_rate=0.01, learning_rate_tokenizer=0.002)
    model, trainer, train, _, _ = build(*tiny_dataset, **settings)
    steps = len(train)
    tok, rec = trainer.phase_optimizers["tokenizer"], trainer.phase_optimizers["recommender"]
    trainer._attach_lr_schedule(train)
    trainer._train_epoch(train, 0)  # tokenizer epoch 1 of 2
    assert tok.param_groups[0]["lr"] == pytest.approx(0.002 * cosine(steps, 1, 2 * steps))
    assert rec.param_groups[0]["lr"] == pytest.approx(0.0)  # the recommender's schedule has not stepped
    trainer._train_epoch(train, 1)  # recommender epoch: the tokenizer's rate does not move
    assert tok.param_groups[0]["lr"] == pytest.approx(0.002 * cosine(steps, 1, 2 * steps))
    assert rec.param_groups[0]["lr"] == pytest.approx(0.01 * cosine(steps, 1, 2 * steps))
    trainer._save_checkpoint(1, verbose=False)

    _, resumed, train2, _, _ = build(*tiny_dataset, **settings)
    resumed.resume_checkpoint(trainer.saved_model_file)
    resumed._attach_lr_schedule(train2)
    resumed._train_epoch(train2, 2)  # the last tokenizer epoch ends the tokenizer's cosine at 0
    assert resumed.phase_optimizers["tokenizer"].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    _, constant, train3, _, _ = build(*tiny_dataset, **settings, lr_scheduler_tokenizer="constant")
    constant._attach_lr_schedule(train3)
    constant._train_epoch(train3, 0)
    assert constant.phase_optimizers["tokenizer"].param_groups[0]["lr"] == pytest.approx(0.002)
    with pytest.raises(GenRecError, match="lr_scheduler_tokenizer must be one of"):
        build(*tiny_dataset, **settings, lr_scheduler_tokenizer="step")


# ---- bad input and end-to-end runs --------------------------------------------------------------------
def test_bad_settings_are_one_line_errors(tiny_dataset, run_dirs, fake_sids):
    with pytest.raises(GenRecError, match="collision_layer_size"):
        build(*tiny_dataset, codebook_size=2, collision_layer_size=1)
    with pytest.raises(GenRecError, match="tokenizer=rqvae"):
        build(*tiny_dataset, tokenizer="pq")
    with pytest.raises(GenRecError, match="cycle_recommender_epochs"):
        build(*tiny_dataset, cycle_recommender_epochs=0)
    with pytest.raises(GenRecError, match="collision_layer_size must be an integer >= 1, got 'abc'"):
        build(*tiny_dataset, collision_layer_size="abc")


def test_run_crosses_a_phase_switch_and_is_reproducible(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    records = []
    for i in range(2):
        out = run_dirs / f"etegrec-{i}.json"
        records.append(run_recbole_genrec(model="ETEGRec", dataset=name, result_file=str(out),
                                          config_dict=tiny_config_dict(data_path, **{**TINY_ETEGREC, "epochs": 3})))
        saved = json.loads(out.read_text())
        assert saved["model"] == "ETEGRec" and 0.0 <= saved["test_result"]["ndcg@10"] <= 1.0
        assert len(saved["timings"]["valid_eval_seconds"]) == 1  # epochs 0, 2 tokenizer; only epoch 1 validated
        assert [r["epoch"] for r in saved["extras"]["etegrec"]["id_refreshes"]] == [0, 2]
    assert records[0]["test_result"] == records[1]["test_result"]


def test_too_few_epochs_for_a_recommender_epoch_is_a_one_line_error():
    from recbole_genrec.trainer.alternating import AlternatingSchedule

    with pytest.raises(GenRecError, match=r"set --epochs=2 or more"):
        AlternatingSchedule(tokenizer_epochs=1, recommender_epochs=1).check_reaches_recommender(1)
    AlternatingSchedule(tokenizer_epochs=1, recommender_epochs=1).check_reaches_recommender(2)
    AlternatingSchedule(tokenizer_epochs=0, recommender_epochs=1).check_reaches_recommender(1)
