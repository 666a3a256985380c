"""SODA (SODA-T, SODA-L, SODA-E): the objective by hand (soft assignment, symmetric-KL score, in-batch
negatives, BPR), where its gradient goes, the ablation switches, bad input, and short end-to-end runs on
tiny generated data (fake item embeddings; the letter tokenizer's SASRec embeddings are faked too)."""
import json
import math
import os

import pytest
import torch

from recbole_genrec.model import learnable_ids
from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.model.seq2seq import token_cross_entropy
from recbole_genrec.model.soda import (SODAObjective, in_batch_negative_log_probs, soda_bpr_loss, soda_settings,
                                       soft_code_log_probs, symmetric_kl_score)
from recbole_genrec.quick_start import build_model_and_trainer, load_config, main, prepare_data, run_recbole_genrec
from recbole_genrec.tokenizer.rqvae import residual_quantise
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict
from tests.test_etegrec import fake_semantic_ids

DEVICE = os.environ.get("GENREC_TEST_DEVICE", "cpu")
TINY_SODA = {
    "device": DEVICE, "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8, "d_model": 16,
    "d_ff": 32, "num_user_tokens": 7, "train_batch_size": 64, "beam_size": 20,
    "num_codebooks": 2, "codebook_size": 6, "rqvae_latent_dim": 4, "rqvae_hidden_dims": [16], "rqvae_epochs": 4,
    "rqvae_batch_size": 16, "kmeans_iters": 5, "collision_layer_size": 16, "letter_clusters": 2,
    "learning_rate": 0.01, "learning_rate_tokenizer": 0.01, "align_warmup_epochs": 0,
}


def fake_cf_embeddings(config, dataset):
    return torch.randn(dataset.item_num, config["rqvae_latent_dim"], generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fake_sids(monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)
    monkeypatch.setattr(learnable_ids, "load_cf_embeddings", fake_cf_embeddings)


def build(data_path, name, model="SODA-T", **overrides):
    config = load_config(model, name, config_dict=tiny_config_dict(data_path, **{**TINY_SODA, **overrides}))
    dataset, train, valid, test = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train)
    return model, trainer, train, valid, test


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def score(a, b):  # Eq. 7 for one layer
    return -(kl(a, b) + kl(b, a)) / 2


# ---- the objective by hand -----------------------------------------------------------------------------
def test_soft_assignment_is_a_distribution_and_tends_to_the_hard_code():
    g = torch.Generator().manual_seed(0)
    latent, books = torch.randn(50, 4, generator=g), torch.randn(3, 8, 4, generator=g)
    hard = residual_quantise(latent, books)[0]
    for tau in (1.0, 0.1):
        p = soft_code_log_probs(latent, books, tau).exp()
        assert p.shape == (50, 3, 8) and torch.allclose(p.sum(-1), torch.ones(50, 3), atol=1e-5)
    p = soft_code_log_probs(latent, books, 1e-6).exp()
    assert torch.equal(p.argmax(-1), hard)
    assert torch.allclose(p, torch.nn.functional.one_hot(hard, 8).float(), atol=1e-4)
    # layer 2 uses the residual left by the hard code of layer 1 (Eq. 2), not the latent itself
    by_hand = torch.log_softmax(-((latent - books[0][hard[:, 0]])[:, None, :] - books[1][None]).pow(2).sum(-1) / 0.5, -1)
    assert torch.allclose(soft_code_log_probs(latent, books, 0.5)[:, 1], by_hand, atol=1e-5)
    with pytest.raises(GenRecError, match="soda_tau"):
        soft_code_log_probs(latent, books, 0.0)


def test_score_is_symmetric_summed_over_layers_and_zero_for_equal_distributions():
    a = torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]])
    b = torch.tensor([[[0.2, 0.6, 0.2], [0.1, 0.1, 0.8]]])
    s = symmetric_kl_score(a.log(), b.log())
    assert s.item() == pytest.approx(score(a[0, 0].tolist(), b[0, 0].tolist()) + score(a[0, 1].tolist(), b[0, 1].tolist()),
                                     rel=1e-5)
    assert torch.allclose(s, symmetric_kl_score(b.log(), a.log()))
    assert s.item() < 0 and symmetric_kl_score(a.log(), a.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_soda_loss_by_hand_on_two_users():
    pos = [[0.8, 0.2], [0.3, 0.7]]  # h^+ of users A and B (one layer, K = 2)
    tgt = [[0.6, 0.4], [0.1, 0.9]]  # h^y of their targets
    beta = 2.0
    # h^- of A is B's h^+ and vice versa (the only other user in the batch)
    expected = sum(-math.log(1 / (1 + math.exp(-beta * (score(pos[i], tgt[i]) - score(pos[1 - i], tgt[i])))))
                   for i in range(2)) / 2
    lp, lt = torch.tensor(pos)[:, None].log(), torch.tensor(tgt)[:, None].log()
    log_neg, has = in_batch_negative_log_probs(lp, torch.tensor([11, 12]))
    assert has.tolist() == [True, True] and torch.allclose(log_neg, lp.flip(0), atol=1e-6)
    assert soda_bpr_loss(lp, lt, log_neg, beta, has).item() == pytest.approx(expected, rel=1e-5)
    # w/o neg (Table 3): pointwise, the positive term only
    pointwise = sum(-math.log(1 / (1 + math.exp(-beta * score(pos[i], tgt[i])))) for i in range(2)) / 2
    assert soda_bpr_loss(lp, lt, None, beta).item() == pytest.approx(pointwise, rel=1e-5)


def test_negatives_never_include_the_users_own_rows_and_one_user_batches_fall_back():
    g = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(torch.randn(4, 2, 5, generator=g), -1)
    users = torch.tensor([7, 7, 9, 3])  # rows 0 and 1: two prefixes of user 7
    log_neg, has = in_batch_negative_log_probs(lp, users)
    p = lp.exp()
    assert has.all()
    assert torch.allclose(log_neg[0].exp(), (p[2] + p[3]) / 2, atol=1e-6)  # never rows 0 or 1
    assert torch.allclose(log_neg[1].exp(), (p[2] + p[3]) / 2, atol=1e-6)
    assert torch.allclose(log_neg[2].exp(), (p[0] + p[1] + p[3]) / 3, atol=1e-6)
    assert torch.allclose(log_neg.exp().sum(-1), torch.ones(4, 2), atol=1e-5)  # still distributions
    # a batch of one user: no negative exists; documented fallback: L_SODA = 0, still attached to the graph
    lp1 = lp.clone().requires_grad_(True)
    log_neg, has = in_batch_negative_log_probs(lp1, torch.tensor([5, 5, 5, 5]))
    assert not has.any()
    loss = soda_bpr_loss(lp1, lp.detach().flip(0), log_neg, 10.0, has)
    assert loss.item() == 0.0 and loss.requires_grad


def test_tiny_tau_stays_finite_and_runs_in_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    obj = SODAObjective(d_model=8, latent_dim=4, tau=1e-5, beta=1000.0)
    hidden = torch.randn(6, 5, 8, generator=g, requires_grad=True)
    mask = torch.ones(6, 5, dtype=torch.bool)
    books = torch.randn(3, 6, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        log_p = soft_code_log_probs(torch.randn(6, 4, generator=g).bfloat16(), books.bfloat16(), 0.1)
        loss, missing = obj(hidden, mask, torch.randn(6, 4, generator=g), books, torch.arange(6))
    assert log_p.dtype == torch.float32 and loss.dtype == torch.float32 and missing == 0
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(hidden.grad).all()


def test_history_pooling_ignores_padding():
    obj = SODAObjective(d_model=4, latent_dim=3, tau=1.0, beta=1.0)
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    changed = hidden.clone()
    changed[0, 2] = 100.0  # a padding position
    assert torch.allclose(obj.history_latent(hidden, mask), obj.history_latent(changed, mask))
    assert torch.allclose(obj.history_latent(hidden, mask)[0], obj.projector(hidden[0, :2].mean(0)), atol=1e-6)


def test_settings_are_checked():
    def cfg(**kw):
        return _Config(kw)

    assert soda_settings(cfg())["tokenizer_grad"] is False
    for key, value, match in (("soda_tau", 0, "soda_tau must be a finite number > 0"),
                              ("soda_beta", -1.0, "soda_beta must be a finite number > 0"),
                              ("soda_weight", -1e-3, "soda_weight must be a finite number >= 0"),
                              ("soda_weight", float("nan"), "soda_weight"), ("soda_tau", "0.1", "soda_tau"),
                              ("soda_negatives", "no", "soda_negatives must be True or False"),
                              ("soda_alternate", 1, "soda_alternate must be True or False"),
                              ("soda_tokenizer_grad", None, None), ("soda_mlp_hidden", 0, "soda_mlp_hidden")):
        if match is None:
            soda_settings(cfg(**{key: value}))
            continue
        with pytest.raises(GenRecError, match=match):
            soda_settings(cfg(**{key: value}))


class _Config(dict):
    def __getitem__(self, key):
        return self.get(key)


# ---- in the models -----------------------------------------------------------------------------------
def _grads(module):
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("tokenizer_grad", [False, True])
def test_gradient_switch_decides_whether_l_soda_reaches_the_tokenizer(tiny_dataset, run_dirs, fake_sids, tokenizer_grad):
    model, trainer, train, _, _ = build(*tiny_dataset, soda_tokenizer_grad=tokenizer_grad)
    batch = next(iter(train)).to(model.device)
    model.train()
    parts = model.calculate_loss(batch)
    assert len(parts) == 4 and float(parts[-1].detach()) > 0  # (rec, token, reg, soda)
    model.zero_grad(set_to_none=True)
    parts[-1].backward()
    assert _grads(model.soda.projector) and _grads(model.backbone.t5.encoder.block)
    assert not _grads(model.backbone.t5.decoder.block)  # L_SODA reads the encoder only
    assert _grads(model.rqvae.encoder) == tokenizer_grad and _grads(model.rqvae) == tokenizer_grad
    tokenizer_params = {id(p) for p in model.rqvae.parameters()}
    in_recommender_optimizer = {id(p) for p in model.phase_parameters("recommender")}
    assert bool(tokenizer_params & in_recommender_optimizer) == tokenizer_grad
    assert not _grads(model.rqvae.decoder)  # h^y uses the tokenizer's encoder and codebooks, never its decoder


def test_soda_e_keeps_etegrec_losses_off_the_tokenizer_in_recommender_epochs(tiny_dataset, run_dirs, fake_sids):
    model, _, train, _, _ = build(*tiny_dataset, model="SODA-E", soda_tokenizer_grad=True)
    batch = next(iter(train)).to(model.device)
    model.train()
    ce, vq, sia, psa, soda = model.calculate_loss(batch)
    assert float(vq) == 0.0 and min(float(x.detach()) for x in (ce, sia, psa, soda)) > 0
    model.zero_grad(set_to_none=True)
    (ce + sia + psa).backward(retain_graph=True)
    assert not _grads(model.rqvae) and _grads(model.seq_projector)
    soda.backward()
    assert _grads(model.rqvae.encoder) and model.rqvae.codebooks.grad.abs().sum() > 0


def test_lambda_zero_leaves_the_backbone_loss(tiny_dataset, run_dirs, fake_sids):
    model, trainer, train, _, _ = build(*tiny_dataset, soda_weight=0)
    batch = next(iter(train)).to(model.device)
    model.eval()  # no dropout: compare the same computation
    parts = model.calculate_loss(batch)
    backbone = token_cross_entropy(model.compute_token_logits(batch), model.target_codes(batch))
    assert float(parts[-1]) == 0.0 and float(sum(parts)) == pytest.approx(float(backbone), rel=1e-6)
    model.soda_weight = 0.5  # the same weights with lambda > 0: the same L_rec plus lambda L_SODA
    parts2 = model.calculate_loss(batch)
    assert float(parts2[0]) == pytest.approx(float(parts[0]), rel=1e-6) and float(parts2[-1]) > 0
    assert float(parts2[-1]) == pytest.approx(0.5 * float(model.soda_loss(
        batch, *model.phase_loss_parts(batch)[1:])), rel=1e-5)


def test_tokenizer_phase_trains_the_tokenizer_only_without_l_soda(tiny_dataset, run_dirs, fake_sids):
    for name in ("SODA-T", "SODA-L"):
        model, trainer, train, _, _ = build(*tiny_dataset, model=name)
        batch = next(iter(train)).to(model.device)
        model.set_phase("tokenizer", 1)
        model.train()
        rec, token, reg, soda = model.calculate_loss(batch)
        assert float(rec) == 0.0 and float(soda) == 0.0 and float(token.detach()) > 0
        assert (float(reg.detach()) > 0) == (name == "SODA-L")  # LETTER's L_CF + L_Div keep training its tokenizer
        model.zero_grad(set_to_none=True)
        (token + reg).backward()
        assert _grads(model.rqvae) and not _grads(model.backbone) and not _grads(model.soda)


def test_without_alternation_the_tokenizer_and_ids_stay_fixed(tiny_dataset, run_dirs, fake_sids):
    model, trainer, train, _, _ = build(*tiny_dataset, soda_alternate=False)
    before = [p.detach().clone() for p in model.rqvae.parameters()]
    codes = model.layout.codes.clone()
    for epoch in range(2):
        trainer._train_epoch(train, epoch)
    assert [h[1] for h in trainer.phase_history] == ["recommender", "recommender"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.rqvae.parameters()))
    assert torch.equal(model.layout.codes, codes) and model.refresh_log == []
    assert model.soda_log["batches"] > 0  # L_SODA still trains the recommender

    model, trainer, train, _, _ = build(*tiny_dataset)  # default: alternate, the tokenizer moves
    trainer._train_epoch(train, 0)
    assert trainer.phase_history[0][1] == "tokenizer"
    assert not all(torch.equal(a, b) for a, b in zip(before, model.rqvae.parameters()))


def test_without_negatives_is_the_pointwise_loss(tiny_dataset, run_dirs, fake_sids):
    model, _, train, _, _ = build(*tiny_dataset, soda_negatives=False, soda_beta=3.0, soda_tau=0.5)
    batch = next(iter(train)).to(model.device)
    model.eval()
    _, hidden, mask = model.phase_loss_parts(batch)
    with torch.no_grad():
        books = model.rqvae.codebooks
        lp = soft_code_log_probs(model.soda.history_latent(hidden, mask), books, 0.5)
        lt = soft_code_log_probs(model.rqvae.encoder(model.item_text_emb[batch[model.POS_ITEM_ID]]), books, 0.5)
        expected = -torch.nn.functional.logsigmoid(3.0 * symmetric_kl_score(lp, lt)).mean()
        assert float(model.soda_loss(batch, hidden, mask)) == pytest.approx(float(expected), rel=1e-5)


def test_bad_input_is_one_line(tiny_dataset, run_dirs, fake_sids, capsys):
    data_path, name = tiny_dataset
    with pytest.raises(GenRecError, match="soda_beta"):
        build(data_path, name, soda_beta=0)
    with pytest.raises(GenRecError, match="tokenizer=rqvae"):
        build(data_path, name, tokenizer="letter")
    with pytest.raises(GenRecError, match="tokenizer=letter"):
        build(data_path, name, model="SODA-L", tokenizer="rqvae")
    assert main([f"--data_path={data_path}", f"--dataset={name}", "--model=SODA-T", "--soda_tau=0",
                 "--state=WARNING", "--show_progress=False"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: soda_tau must be a finite number > 0")


# ---- end to end -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["SODA-T", "SODA-L", "SODA-E"])
def test_run_end_to_end(tiny_dataset, run_dirs, fake_sids, model):
    data_path, name = tiny_dataset
    out = run_dirs / f"{model}.json"
    record = run_recbole_genrec(model=model, dataset=name, result_file=str(out),
                                config_dict=tiny_config_dict(data_path, **{**TINY_SODA, "epochs": 3}))
    saved = json.loads(out.read_text())
    assert saved["model"] == model
    for key in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
        assert 0.0 <= saved["test_result"][key] <= 1.0 and math.isfinite(saved["test_result"][key])
    extras = saved["extras"]
    assert extras["soda"]["weight"] == 1e-3 and extras["soda"]["batches"] > 0
    assert [r["epoch"] for r in extras["learnable_tokenizer"]["id_refreshes"]] == [0, 2]  # alternation ran
    assert len(saved["timings"]["valid_eval_seconds"]) == 1  # only the recommender epoch is validated
    assert record["timings"]["epochs_trained"] == 3


def test_same_seed_same_metrics(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    results = [run_recbole_genrec(model="SODA-T", dataset=name, result_file=str(run_dirs / f"r{i}.json"),
                                  config_dict=tiny_config_dict(data_path, **{**TINY_SODA, "epochs": 2}))["test_result"]
               for i in range(2)]
    assert results[0] == results[1]


def test_accepts_the_cpu_recipe(tiny_dataset, run_dirs, fake_sids):
    """The generic recipe keys (lr_scheduler, warmup_ratio, precision, ...) combine with SODA; the tiny sizes
    given as config_dict override the recipe's model sizes."""
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "properties" / "recipe" / "cpu.yaml"
    assert recipe.is_file(), "properties/recipe/cpu.yaml ships with the package"
    data_path, name = tiny_dataset
    record = run_recbole_genrec(model="SODA-T", dataset=name, config_file_list=[str(recipe)],
                                result_file=str(run_dirs / "recipe.json"),
                                config_dict=tiny_config_dict(data_path, **{**TINY_SODA, "epochs": 2,
                                                                           "precision": "bf16"}))
    assert all(math.isfinite(v) for v in record["test_result"].values())
    assert record["config"]["lr_scheduler"] == "cosine" and record["extras"]["soda"]["batches"] > 0
