"""GenPlugin (TIGER++ / LETTER++): each loss by hand, SSG substitution shares, retrieval without leakage or
self-hits, ablation switches, bad input, and two-stage runs through run_recbole_genrec (tiny data)."""
import json
import math

import numpy as np
import pytest
import torch

from recbole_genrec.data.retrieval import (bm25_topk, cosine_topk, pseudo_documents, rerank_candidates,
                                           training_histories)
from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.model.genplugin import (bidirectional_info_nce, info_nce, semantic_substitutes,
                                            substitute_tokens, symmetric_kl)
from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data, run_recbole_genrec
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict, write_atomic_dataset
from tests.test_tiger import fake_semantic_ids

TINY_GP = {"device": "cpu", "num_encoder_layers": 1, "num_decoder_layers": 1, "num_heads": 2, "d_kv": 8,
           "d_model": 16, "d_ff": 32, "num_user_tokens": 7, "train_batch_size": 64, "beam_size": 20,
           "ssg_start_epoch": 0, "rar_sasrec_epochs": 1, "rar_z": 5, "rar_v": 3}


def fake_sids_with_text(config, dataset):
    sids = fake_semantic_ids(config, dataset)
    sids.embeddings = torch.randn(dataset.item_num, 8, generator=torch.Generator().manual_seed(1))
    sids.embeddings[0] = 0
    return sids


@pytest.fixture
def fake_sids(monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_sids_with_text)


def build(data_path, name, model="TIGER++", **overrides):
    config = load_config(model, name, config_dict=tiny_config_dict(data_path, **{**TINY_GP, **overrides}))
    dataset, train, valid, test = prepare_data(config)
    model_obj, trainer = build_model_and_trainer(config, train)
    return model_obj, trainer, (dataset, train, valid, test)


# ---- losses by hand ------------------------------------------------------------------------------------
def test_info_nce_by_hand_both_directions():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    v = torch.tensor([[1.0, 1.0], [0.5, -1.0]], requires_grad=True)
    tau = 0.5
    # <u_i, v_j> / tau = [[2, 1], [4, -4]]; rows' positives on the diagonal
    l_uv = 0.5 * ((-2 + math.log(math.exp(2) + math.exp(1))) + (4 + math.log(math.exp(4) + math.exp(-4))))
    # <v_i, u_j> / tau = the transpose [[2, 4], [1, -4]]
    l_vu = 0.5 * ((-2 + math.log(math.exp(2) + math.exp(4))) + (4 + math.log(math.exp(1) + math.exp(-4))))
    assert info_nce(u, v, tau).item() == pytest.approx(l_uv, abs=1e-5)
    loss = bidirectional_info_nce(u, v, tau)
    assert loss.item() == pytest.approx(l_uv + l_vu, abs=1e-5)
    loss.backward()
    assert u.grad.abs().sum() > 0 and v.grad.abs().sum() > 0


def test_info_nce_leaves_rows_of_the_same_item_or_user_out_of_the_denominator():
    """Eq. 2-3's negatives are other items / users: a second row of row 0's group is no negative of it."""
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    v = torch.tensor([[1.0, 1.0], [0.5, -1.0], [2.0, 0.0]])
    tau = 0.5
    groups = torch.tensor([7, 3, 7])  # rows 0 and 2: the same item (or user)
    logits = (u @ v.t()) / tau  # [[2, 1, 4], [4, -4, 0], [4, -1, 6]]
    by_hand = []
    for i, allowed in ((0, [0, 1]), (1, [0, 1, 2]), (2, [1, 2])):
        z = torch.logsumexp(logits[i, allowed], 0)
        by_hand.append(float(z - logits[i, i]))
    assert info_nce(u, v, tau, groups).item() == pytest.approx(sum(by_hand) / 3, abs=1e-5)
    assert info_nce(u, v, tau, torch.arange(3)).item() == pytest.approx(info_nce(u, v, tau).item(), abs=1e-6)
    assert info_nce(u, v, tau, groups).item() < info_nce(u, v, tau).item()  # fewer (false) negatives here


def test_symmetric_kl_zero_for_identical_and_by_hand():
    a = torch.tensor([[[1.0, 2.0, float("-inf")]]])
    assert symmetric_kl(a, a.clone(), 0.85).item() == pytest.approx(0.0, abs=1e-7)
    b = torch.tensor([[[0.0, 0.0, float("-inf")]]], requires_grad=True)
    phi = 0.5
    pa = torch.softmax(torch.tensor([2.0, 4.0]), 0)  # a / phi over the two real codes
    pb = torch.tensor([0.5, 0.5])
    expected = float((pa * (pa / pb).log()).sum() + (pb * (pb / pa).log()).sum())
    loss = symmetric_kl(a, b, phi)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert torch.isfinite(b.grad).all() and b.grad.abs().sum() > 0


def test_semantic_substitutes_by_hand():
    emb = torch.tensor([[0.0, 0.0], [9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [2.0, 2.0], [5.0, 5.0]])
    rows = torch.tensor([[2, 3, 4]])  # one position, codes 0..2 -> tokens 2..4
    logits = torch.tensor([[[1.0, 3.0, -5.0]]])
    w = torch.softmax(torch.tensor([3.0, 1.0]), 0)  # top-2: code 1 (token 3), code 0 (token 2)
    expected = w[0] * emb[3] + w[1] * emb[2]
    assert torch.allclose(semantic_substitutes(logits, rows, emb, q=2)[0, 0], expected, atol=1e-6)
    # q above the codebook size, with a -inf padding code: the padding gets weight 0
    logits = torch.tensor([[[1.0, float("-inf"), 1.0]]])
    assert torch.allclose(semantic_substitutes(logits, rows, emb, q=5)[0, 0], 0.5 * (emb[2] + emb[4]))


@pytest.mark.parametrize("replace", [0.0, 0.3, 1.0])
def test_ssg_replaces_the_expected_share_of_tokens(replace):
    gold, subs = torch.zeros(4000, 3, 2), torch.ones(4000, 3, 2)
    mixed, replaced = substitute_tokens(gold, subs, replace, generator=torch.Generator().manual_seed(0))
    share = replaced.float().mean().item()
    assert share == pytest.approx(replace, abs=0.02)
    assert torch.equal(mixed[..., 0] == 1, replaced)  # exactly the replaced tokens carry the substitute
    if replace == 0.0:
        assert torch.equal(mixed, gold)  # p2 = 1: teacher forcing


def test_ssg_p2_one_is_teacher_forcing_in_the_model(tiny_dataset, run_dirs, fake_sids):
    """With ssg_p2 = 1 (no replacement) the guidance path gives exactly the teacher-forced ID loss."""
    data_path, name = tiny_dataset
    model, _, (_, train, _, _) = build(data_path, name, ssg_p1=0.0, ssg_p2=1.0, dropout_rate=0.0)
    batch = next(iter(train))
    torch.manual_seed(0)
    guided = model.loss_terms(batch)["id"]
    model.gp.use_ssg = False
    plain = model.loss_terms(batch)["id"]
    assert guided.item() == pytest.approx(plain.item(), abs=1e-5)


def test_ssg_never_replaces_the_start_token_or_the_first_code(tiny_dataset, run_dirs, fake_sids):
    """Replacement probability 1: every code input from the second on is the language view's substitute; the
    start token and the first code stay ground truth (as the official loop, which starts at the second label)."""
    data_path, name = tiny_dataset
    model, _, (_, train, _, _) = build(data_path, name, ssg_p1=0.0, dropout_rate=0.0)
    batch = model._sample_prefixes(next(iter(train)))
    codes = model.target_codes(batch)
    dec_in = model.layout.decoder_input(codes)
    logits = torch.randn(dec_in.shape[0], dec_in.shape[1], model.layout.layer_vocab_rows.shape[1])
    embed = model.backbone.t5.get_decoder().embed_tokens
    gold = embed(dec_in)
    embeds, replaced = model.guided_decoder_inputs(dec_in, logits, 1.0)
    assert replaced.shape == (dec_in.shape[0], dec_in.shape[1] - 2) and bool(replaced.all())
    assert torch.equal(embeds[:, :2], gold[:, :2])
    expected = semantic_substitutes(logits[:, 1:-1], model.layout.layer_vocab_rows[1:dec_in.shape[1] - 1],
                                    embed.weight, model.gp.top_q)
    assert torch.allclose(embeds[:, 2:], expected)
    assert not torch.allclose(embeds[:, 2:], gold[:, 2:])
    kept, none = model.guided_decoder_inputs(dec_in, logits, 0.0)
    assert torch.equal(kept, gold) and not bool(none.any())


# ---- model terms, gradients, ablations ---------------------------------------------------------------
def test_each_loss_term_is_finite_and_gets_gradients(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    model, _, (_, train, _, _) = build(data_path, name, ssg_p1=0.0)
    model.train()
    batch = next(iter(train))
    terms = model.loss_terms(batch)
    assert set(terms) == {"lan", "id", "item", "user", "kl"}
    reaches = {"lan": "lan_encoder.projection", "item": "lan_encoder.encoder", "user": "backbone.t5.encoder",
               "kl": "lan_encoder.encoder", "id": "backbone.t5.encoder"}
    for name_, term in terms.items():
        assert torch.isfinite(term), name_
        model.zero_grad(set_to_none=True)
        term.backward(retain_graph=True)
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(reaches[name_])]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name_
    total = model.combine(terms)
    expected = terms["lan"] + terms["id"] + 0.1 * terms["item"] + 0.1 * terms["user"] + 0.5 * terms["kl"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_lan_loss_weight_scales_only_the_language_token_loss(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    model, _, _ = build(data_path, name, lan_loss_weight=0.25)
    terms = {k: torch.tensor(v) for k, v in {"lan": 2.0, "id": 3.0, "item": 5.0, "user": 7.0, "kl": 11.0}.items()}
    assert model.combine(terms).item() == pytest.approx(0.25 * 2 + 3 + 0.1 * 5 + 0.1 * 7 + 0.5 * 11)


def test_ablation_switches_remove_their_terms(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    for overrides, absent in (({"use_dsa": False}, {"item", "user"}), ({"use_ssg": False}, {"kl"}),
                              ({"item_cl_weight": 0.0, "kl_weight": 0.0}, {"item", "kl"})):
        model, _, (_, train, _, _) = build(data_path, name, **overrides)
        terms = model.loss_terms(next(iter(train)))
        assert not absent & set(terms) and {"lan", "id"} <= set(terms), overrides
    model, _, _ = build(data_path, name, use_ssg=False)
    model.train()
    assert not model.ssg_active()


def test_language_encoder_follows_the_backbone_size_keys_of_the_cpu_recipe(tiny_dataset, run_dirs, fake_sids):
    from pathlib import Path

    recipe = Path(__file__).resolve().parent.parent / "properties" / "recipe" / "cpu.yaml"
    assert recipe.is_file(), "properties/recipe/cpu.yaml ships with the package"
    data_path, name = tiny_dataset
    sizes = ("d_model", "d_ff", "num_heads", "d_kv", "num_encoder_layers", "num_decoder_layers")
    config = load_config("TIGER++", name, config_file_list=[str(recipe)], config_dict=tiny_config_dict(
        data_path, **{k: v for k, v in TINY_GP.items() if k not in sizes}))
    _, train, _, _ = prepare_data(config)
    model = config.model_class(config, train._dataset)
    lan, ids = model.lan_encoder.encoder.config, model.backbone.t5.config
    for key in ("d_model", "d_ff", "num_heads", "d_kv", "num_layers", "dropout_rate"):
        assert getattr(lan, key) == getattr(ids, key), key
    assert lan.d_model == config["d_model"] and lan.num_layers == config["num_encoder_layers"]


# ---- retrieval -----------------------------------------------------------------------------------------
def test_bm25_matches_rank_bm25_and_never_returns_self():
    from rank_bm25 import BM25Okapi

    docs = [[], "red apple pie".split(), "green apple".split(), "red red car".split(), "blue car fast".split(),
            "apple car".split()]
    neighbours, scores = bm25_topk(docs, z=3)
    ref = BM25Okapi([d for d in docs[1:]])
    for u in range(1, len(docs)):
        expect = np.asarray(ref.get_scores(docs[u]))
        expect = np.insert(expect, 0, -np.inf)
        expect[u] = -np.inf
        assert np.allclose(np.sort(expect)[::-1][:3], scores[u].numpy(), atol=1e-5)
        assert u not in neighbours[u].tolist() and 0 not in neighbours[u].tolist()
    with pytest.raises(GenRecError, match="rar_z"):
        bm25_topk(docs, z=5)  # only 4 other users have a document


def test_rerank_keeps_users_found_by_both_paths_first():
    content = torch.tensor([[1, 2, 3]] * 6)  # rows = target users 0..5; row 0 is checked
    collab = torch.tensor([[4, 3, 5]] * 6)
    q = torch.zeros(6, 2)
    q[0] = torch.tensor([1.0, 0.0])
    q[1:] = torch.tensor([[1.0, 0.1], [1.0, 0.2], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    neighbours, both = rerank_candidates(content, collab, q, v=3)
    assert neighbours[0].tolist() == [3, 4, 1]  # user 3 (both paths) despite its cosine of -1, then by cosine
    assert both[0].tolist() == [True, False, False]
    assert cosine_topk(q, 2, torch.ones(6, dtype=torch.bool))[0][0].tolist() == [4, 1]
    with pytest.raises(GenRecError, match="rar_v"):
        rerank_candidates(content, collab, q, v=4)


def test_retrieval_sees_training_interactions_only(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    model, _, (dataset, train, valid, test) = build(data_path, name)
    pairs, seq, seq_len = training_histories(train._dataset, 20)
    held_out = set()
    for split in (valid, test):
        feat = split._dataset.inter_feat
        held_out |= set(zip(feat["user_id"].tolist(), feat["item_id"].tolist()))
    train_pairs = set(map(tuple, pairs.tolist()))
    assert train_pairs and not train_pairs & held_out  # (5-core data: no repeated user-item pair)
    for u in range(1, seq.shape[0]):
        items = seq[u, :seq_len[u]].tolist()
        assert all((u, i) in train_pairs for i in items) and len(items) == min(20, 12 - 2)
    docs = pseudo_documents(["", *["w%d" % i for i in range(1, dataset.item_num)]], pairs, seq.shape[0])
    assert all(f"w{i}" in docs[u] for u, i in train_pairs)
    neighbours, _ = model.build_retrieval(train._dataset)
    users = torch.arange(neighbours.shape[0])[:, None]
    assert not (neighbours[1:] == users[1:]).any() and (neighbours[1:] > 0).all() and (neighbours[0] == 0).all()
    assert model.rar_active and model.rar_user_q.shape == (seq.shape[0], 16)


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, match", [
    ({"cl_temperature": 0.0}, "cl_temperature"), ({"ssg_p2": 1.5}, "ssg_p2"), ({"ssg_top_q": 0}, "ssg_top_q"),
    ({"use_dsa": "yes"}, "use_dsa"), ({"rar_v": 9}, "rar_v"), ({"kl_weight": -1}, "kl_weight"),
    ({"lan_text_encoder": "/no/such/encoder"}, "not a readable local model directory"),
])
def test_bad_values_are_one_line_errors(tiny_dataset, run_dirs, fake_sids, overrides, match):
    data_path, name = tiny_dataset
    with pytest.raises(GenRecError, match=match) as err:
        build(data_path, name, **overrides)
    assert "\n" not in str(err.value)


def test_z_larger_than_users_and_missing_text(tmp_path, run_dirs, fake_sids):
    write_atomic_dataset(str(tmp_path), name="tiny")
    with pytest.raises(GenRecError, match="rar_z=60 exceeds the 39 other users"):
        run_recbole_genrec(model="TIGER++", dataset="tiny", config_dict=tiny_config_dict(
            str(tmp_path), **{**TINY_GP, "rar_z": 60, "rar_v": 3}))
    write_atomic_dataset(str(tmp_path), name="holes", missing_text_items=(3, 4))
    with pytest.raises(GenRecError, match="2 of 30 items have no text"):
        build(str(tmp_path), "holes")


# ---- end to end ----------------------------------------------------------------------------------------
def test_two_stage_run_is_finite_and_repeatable(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    records = []
    for i in range(2):
        out = run_dirs / f"tpp{i}.json"
        records.append(run_recbole_genrec(model="TIGER++", dataset=name,
                                          config_dict=tiny_config_dict(data_path, **TINY_GP), result_file=str(out)))
    saved = json.loads((run_dirs / "tpp0.json").read_text())
    assert saved["model"] == "TIGER++" and saved["extras"]["rar_active"]
    stages = saved["extras"]["genplugin"]["stages"]
    assert set(stages) == {"pretrain", "rar"} and stages["rar"]["checkpoint"].endswith("-rar.pth")
    retrieval = saved["extras"]["genplugin"]["retrieval"]
    assert {"bm25_seconds", "sasrec_seconds", "rerank_seconds"} <= set(retrieval)
    for key in ("hit@10", "ndcg@10"):
        assert 0.0 <= saved["test_result"][key] <= 1.0 and math.isfinite(saved["test_result"][key])
    assert records[0]["test_result"] == records[1]["test_result"]  # same seed, same metrics
    assert records[1]["extras"]["genplugin"]["retrieval"]["sasrec_from_cache"]


def test_letter_pp_without_rar_and_rar_checkpoint_restores_state(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    record = run_recbole_genrec(model="LETTER++", dataset=name, config_dict=tiny_config_dict(
        data_path, **{**TINY_GP, "use_rar": False, "ranking_temperature": 0.5}), result_file=str(run_dirs / "l.json"))
    assert set(record["extras"]["genplugin"]["stages"]) == {"pretrain"} and not record["extras"]["rar_active"]
    assert record["extras"]["ranking_temperature"] == 0.5
    assert math.isfinite(record["test_result"]["ndcg@10"])
    # a stage-2 checkpoint carries the retrieval state: a fresh model evaluates it with the same metrics
    model, trainer, (_, train, valid, test) = build(data_path, name)
    trainer.fit(train, valid, saved=True, show_progress=False)
    before = trainer.evaluate(test, load_best_model=True, show_progress=False)
    fresh, fresh_trainer, _ = build(data_path, name)
    assert not fresh.rar_active
    after = fresh_trainer.evaluate(test, model_file=trainer.saved_model_file, show_progress=False)
    assert fresh.rar_active and after == before
