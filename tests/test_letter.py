"""LETTER: its losses by hand (value and where the gradient goes), the equal-size clustering, the cached
SASRec collaborative embeddings, the letter tokenizer beside plain RQ-VAE, and a one-epoch run."""
import json
import logging
import math
import types

import pytest
import torch

from recbole_genrec.data import collab_embeddings
from recbole_genrec.data.semantic_ids import fit_codes
from recbole_genrec.model.letter import LETTER
from recbole_genrec.quick_start import run_recbole_genrec
from recbole_genrec.tokenizer.letter import (LETTERTokenizer, balanced_kmeans, cf_alignment_loss, diversity_loss,
                                             sample_cluster_positives)
from recbole_genrec.tokenizer.rqvae import RQVAE
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict

TINY_RQVAE = dict(num_layers=2, codebook_size=8, seed=3, kmeans_iters=10, latent_dim=4, hidden_dims=[16], epochs=20,
                  lr=3e-3, batch_size=64, commitment=0.25)
TINY_LETTER_RUN = {"device": "cpu", "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8,
                   "d_model": 16, "d_ff": 32, "num_user_tokens": 7, "beam_size": 20, "codebook_size": 8,
                   "num_codebooks": 2, "rqvae_latent_dim": 8, "rqvae_hidden_dims": [16], "rqvae_epochs": 10,
                   "letter_clusters": 2, "letter_cf_epochs": 1, "ranking_temperature": 0.5}


# ---- losses by hand ------------------------------------------------------------------------------------
def test_cf_alignment_loss_by_hand_and_gradient():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    h = torch.tensor([[1.0, 1.0], [0.5, -1.0]], requires_grad=True)
    # logits = z h^T = [[1, .5], [2, -2]]; target = the diagonal
    expected = 0.5 * ((-1 + math.log(math.exp(1) + math.exp(0.5))) + (2 + math.log(math.exp(2) + math.exp(-2))))
    loss = cf_alignment_loss(z, h)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert h.grad is None  # the collaborative embeddings are data, not trained


def test_diversity_loss_by_hand_and_gradient():
    book = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]], requires_grad=True)
    codes, positives = torch.tensor([0, 2]), torch.tensor([2, 1])
    # item 0: code 0, logits over codes 1..3 = <e0,e1>=0, <e0,e2>=1, <e0,e3>=-1; positive 2
    l0 = -1.0 + math.log(math.exp(0) + math.exp(1) + math.exp(-1))
    # item 1: code 2, logits over codes 0, 1, 3 = 1, 1, -0.5; positive 1
    l1 = -1.0 + math.log(math.exp(1) + math.exp(1) + math.exp(-0.5))
    loss = diversity_loss(book, codes, positives)
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    loss.backward()
    assert book.grad.abs().sum() > 0


def test_ranking_guided_loss_is_cross_entropy_over_tempered_logits():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.0, float("-inf")]]], requires_grad=True)
    codes = torch.tensor([[0, 1]])
    loss = LETTER.token_loss(types.SimpleNamespace(ranking_temperature=0.5), logits, codes)
    t0 = -4.0 + math.log(math.exp(4) + math.exp(0) + math.exp(-2))
    t1 = -2.0 + math.log(math.exp(1) + math.exp(2))
    assert loss.item() == pytest.approx((t0 + t1) / 2, abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_each_regulariser_reaches_only_its_parameters():
    """L_CF trains the encoder (through the straight-through latent), never the codebooks or the decoder;
    L_Div trains the codebooks only."""
    g = torch.Generator().manual_seed(0)
    x, cf = torch.randn(40, 12, generator=g), torch.randn(40, 4, generator=g)
    tok = LETTERTokenizer(cf_weight=1.0, div_weight=1.0, clusters=2, **TINY_RQVAE)
    tok.model = RQVAE(12, [16], 4, 2, 8)
    tok._cf, tok._positive_gen, tok._cluster_gen = cf, tok.generator(1), tok.generator(2)
    tok.epoch_start(0)
    rows = torch.arange(0, 40, 2)
    for name, trained, untouched in (("cf", "encoder", ("codebooks", "decoder")),
                                     ("div", "codebooks", ("encoder", "decoder"))):
        tok.model.zero_grad(set_to_none=True)
        out = tok.model(x[rows], 0.25)
        codes, z_q = out.codes, out.z_st
        tok.extra_losses(rows, codes, z_q)[name].backward()
        grads = {n: p.grad for n, p in tok.model.named_parameters()}
        assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(trained)), name
        assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if n.startswith(untouched)), name


# ---- clustering and positives ------------------------------------------------------------------------
def test_balanced_kmeans_and_positive_sampling():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0]])
    x = torch.cat([centers[[0] * 7], centers[[1] * 2], centers[[2] * 3]]) + 0.01 * torch.randn(12, 2, generator=g)
    labels = balanced_kmeans(x, 3, 10, torch.Generator().manual_seed(1))
    assert sorted(torch.bincount(labels, minlength=3).tolist()) == [4, 4, 4]  # equal sizes, whatever the data
    assert len(set(labels[9:12].tolist())) == 1  # a tight group that fits stays together
    codes = torch.arange(12).repeat(20)
    pos = sample_cluster_positives(codes, labels, g)
    assert (labels[pos] == labels[codes]).all() and (pos != codes).all()
    assert set(pos[codes == 0].tolist()) == set((labels == labels[0]).nonzero().flatten().tolist()) - {0}


# ---- tokenizer -----------------------------------------------------------------------------------------
def test_letter_tokenizer_against_plain_rqvae_and_bad_input():
    g = torch.Generator().manual_seed(1)
    x, cf = torch.randn(120, 12, generator=g), torch.randn(120, 4, generator=g)
    plain = fit_codes(x, {"tokenizer": "rqvae", **TINY_RQVAE}, "append")[3]
    letter_settings = {"tokenizer": "letter", "clusters": 2, **TINY_RQVAE}
    no_reg = fit_codes(x, {**letter_settings, "cf_weight": 0.0, "div_weight": 0.0}, "append", cf_embeddings=cf)[3]
    assert torch.equal(no_reg, plain)  # without its regularisers LETTER is the RQ-VAE, code for code
    a = fit_codes(x, letter_settings, "append", cf_embeddings=cf)
    b = fit_codes(x, letter_settings, "append", cf_embeddings=cf)
    assert torch.equal(a[0], b[0])  # same seed, same codes
    assert {"final_cf_loss", "final_div_loss"} <= set(a[4].stats)
    with pytest.raises(GenRecError, match="collaborative"):
        fit_codes(x, letter_settings, "append")
    with pytest.raises(GenRecError, match="rqvae_latent_dim"):
        fit_codes(x, letter_settings, "append", cf_embeddings=torch.randn(120, 5))
    with pytest.raises(GenRecError, match="letter_clusters"):
        LETTERTokenizer(clusters=5, **TINY_RQVAE)


# ---- collaborative-embedding cache ---------------------------------------------------------------------
def test_collab_embeddings_cached_and_corrupt_cache_retrained(tiny_dataset, run_dirs, monkeypatch, caplog):
    from recbole.data import create_dataset

    from recbole_genrec import quick_start
    from recbole_genrec.data.semantic_ids import cache_folder

    data_path, name = tiny_dataset
    config = quick_start.load_config("LETTER", name, config_dict=tiny_config_dict(data_path, **TINY_LETTER_RUN))
    dataset = create_dataset(config)
    trained = []
    real = quick_start.build_model_and_trainer
    monkeypatch.setattr(quick_start, "build_model_and_trainer",
                        lambda cfg, train: trained.append(cfg["model"]) or real(cfg, train))
    folder = cache_folder(config)
    rng = torch.get_rng_state()
    first, meta = collab_embeddings.collab_item_embeddings(config, dataset, folder)
    assert torch.equal(torch.get_rng_state(), rng)  # training the SASRec leaves the caller's random stream alone
    assert trained == ["SASRec"] and not meta["from_cache"] and meta["epochs_trained"] == 1
    assert first.shape == (dataset.item_num, 8)
    second, meta2 = collab_embeddings.collab_item_embeddings(config, dataset, folder)
    assert trained == ["SASRec"] and meta2["from_cache"] and torch.equal(first, second)
    (folder / meta["path"].split("/")[-1]).write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING):
        third, meta3 = collab_embeddings.collab_item_embeddings(config, dataset, folder)
    assert trained == ["SASRec", "SASRec"] and not meta3["from_cache"] and "checksum mismatch" in caplog.text
    assert torch.allclose(third, first)  # retrained with the same seed: same embeddings
    with pytest.raises(GenRecError, match="letter_cf_epochs"):
        collab_embeddings.cf_settings(quick_start.load_config("LETTER", name, config_dict=tiny_config_dict(
            data_path, letter_cf_epochs=0)))


# ---- end to end ----------------------------------------------------------------------------------------
def test_one_epoch_letter_run_reports_letter_beside_rqvae(tiny_dataset, run_dirs, capsys):
    from recbole_genrec.build_ids import main as sid_main

    data_path, name = tiny_dataset
    out = run_dirs / "letter.json"
    record = run_recbole_genrec(model="LETTER", dataset=name,
                                config_dict=tiny_config_dict(data_path, **TINY_LETTER_RUN), result_file=str(out))
    saved = json.loads(out.read_text())
    assert saved["model"] == "LETTER" and record["timings"]["epochs_trained"] == 1
    assert 0.0 <= saved["test_result"]["hit@10"] <= 1.0
    extras = saved["extras"]
    assert extras["ranking_temperature"] == 0.5
    report = extras["semantic_ids"]
    assert report["tokenizer"]["tokenizer"] == "letter" and report["tokenizer"]["cf_weight"] == 0.01
    assert report["cf_embeddings"]["sasrec"]["hidden_size"] == 8
    base = report["baseline_rqvae"]
    assert len(base["codebook_utilisation"]) == 3 and 0.0 <= base["collisions_before_resolution"]["collision_rate"] <= 1
    assert base["cache_file"] != report["cache_file"]
    # the CLI shows both from the cache, for letter and via --tokenizer=letter for any model
    id_keys = ("rqvae", "letter", "num_cod", "codebook")
    args = [f"--data_path={data_path}", f"--dataset={name}", "--model=TIGER", "--tokenizer=letter"] + \
        [f"--{k}={v}" for k, v in TINY_LETTER_RUN.items() if k.startswith(id_keys)] + \
        ["--seed=7", "--load_col=" + json.dumps(tiny_config_dict("")["load_col"]).replace(" ", ""),
         "--text_fields=['movie_title','release_year','class']"]
    assert sid_main(args) == 0
    printed = capsys.readouterr().out
    assert "tokenizer letter" in printed and "plain RQ-VAE, same settings" in printed and "(cache)" in printed
