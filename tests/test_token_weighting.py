"""TokenWeightedTIGER: weight computations on hand-built examples, curriculum limits, CE equivalence,
and a one-epoch run of the full method (tiny model, tiny generated data, fake semantic IDs)."""
import math
import os

import pytest
import torch

from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.model import token_weights as tw
from recbole_genrec.model.seq2seq import token_cross_entropy
from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data, run_recbole_genrec
from tests.conftest import tiny_config_dict
from tests.test_tiger import TINY_TIGER, fake_semantic_ids


def test_front_greater_on_hand_built_example():
    # 4 items in 1-D: 0, 2, 10, 12. Layer 1 splits {0,2} | {10,12}; layer 2 separates within pairs.
    emb = torch.tensor([[0.0], [2.0], [10.0], [12.0]])
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    w, mu = tw.front_greater_weights(emb, codes, skip_padding=False)
    # mu_0: mean 6, squared distances 36,16,16,36 -> 26; mu_1: each pair variance 1; mu_2: 0
    assert torch.allclose(mu, torch.tensor([26.0, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([25 / 26 * 2, 1 / 26 * 2], dtype=torch.float64))
    assert float(w.sum()) == pytest.approx(2.0)
    # negative deltas are clipped; all-zero deltas give uniform weights
    assert tw.front_greater_from_dispersion([5.0, 5.0, 5.0]).tolist() == [1.0, 1.0]
    assert tw.front_greater_from_dispersion([4.0, 1.0, 2.0, 0.0]).tolist() == pytest.approx([3 * 3 / 5, 0.0, 3 * 2 / 5])


def test_frequency_weights_on_hand_built_example():
    targets = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0]])  # layer0: code0 x3, code1 x1; layer1: code0 x3, code1 x1
    counts = tw.token_counts(targets, [2, 2])
    assert counts.tolist() == [[3.0, 1.0], [3.0, 1.0]]
    beta = 0.5
    E = tw.effective_number(torch.tensor([1.0, 3.0]), beta)
    assert E.tolist() == pytest.approx([1.0, (1 - 0.125) / 0.5])  # E_1 = 1, E_3 = 1.75
    w = tw.frequency_weights(torch.tensor([[0, 1], [0, 0]]), counts, beta)
    # row 0: raw [1/1.75, 1/1] -> normalised to sum 2
    raw = torch.tensor([1 / 1.75, 1.0], dtype=torch.float64)
    assert torch.allclose(w[0], raw / raw.sum() * 2)
    assert torch.allclose(w[1], torch.ones(2, dtype=torch.float64))  # equal counts -> equal weights
    assert torch.allclose(w.sum(1), torch.full((2,), 2.0, dtype=torch.float64))
    # paper default beta=0.99 and unseen tokens (n=0) are treated as n=1
    w = tw.frequency_weights(torch.tensor([[1, 1]]), torch.tensor([[5.0, 0.0], [5.0, 0.0]]), 0.99)
    assert w[0].tolist() == pytest.approx([1.0, 1.0])


def test_baseline_weights_sum_to_length():
    assert tw.position_weights(4).tolist() == pytest.approx([4 * 4 / 10, 4 * 3 / 10, 4 * 2 / 10, 4 * 1 / 10])
    assert tw.cft_weights(3, 1, 2.0).tolist() == pytest.approx([1.5, 0.75, 0.75])
    codes = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]])
    # uniform items: each token halves the candidates -> log 2 nats each -> equal weights
    w = tw.information_gain_weights(codes, floor=0.0)
    assert torch.allclose(w, torch.ones(4, 2, dtype=torch.float64))
    # 3 items share prefix 0: first token gains less for them than the second
    codes = torch.tensor([[0, 0], [0, 1], [0, 2], [1, 0]])
    w = tw.information_gain_weights(codes, floor=0.0)
    H0, H1 = math.log(4), math.log(3)
    assert w[0].tolist() == pytest.approx([2 * (H0 - H1) / H0, 2 * H1 / H0])
    assert w[3].tolist() == pytest.approx([2.0, 0.0])
    assert torch.allclose(w.sum(1), torch.full((4,), 2.0, dtype=torch.float64))


def test_curriculum_limits_and_alphas():
    assert tw.curriculum_factors(0, 2e-5) == (1.0, 0.0, 1.0)
    g = tw.curriculum_factors(10**9, 2e-5)
    assert g[0] == pytest.approx(0.0) and g[1] == pytest.approx(1.0) and g[2] == pytest.approx(0.0)
    lam = torch.tensor([1.0, 1.0, 1.0])
    assert tw.normalised_alphas(lam, tw.curriculum_factors(0, 2e-5)).tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert tw.normalised_alphas(lam, tw.curriculum_factors(10**9, 2e-5)).tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert tw.normalised_alphas(torch.tensor([1.0, 2.0, 1.0])).tolist() == pytest.approx([0.25, 0.5, 0.25])
    wfg = torch.tensor([1.5, 0.5])
    assert tw.linear_fg_schedule(wfg, 0.0).tolist() == [1.5, 0.5]
    assert tw.linear_fg_schedule(wfg, 1.0).tolist() == [1.0, 1.0]
    wfr = torch.tensor([[0.4, 1.6]])
    assert tw.linear_fg_fr_schedule(wfg, wfr, 0.0).tolist() == [[1.5, 0.5]]
    assert tw.linear_fg_fr_schedule(wfg, wfr, 0.5).tolist() == [[1.0, 1.0]]
    assert torch.allclose(tw.linear_fg_fr_schedule(wfg, wfr, 1.0), wfr)


@pytest.fixture
def tiny_model(tiny_dataset, run_dirs, monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)
    data_path, name = tiny_dataset

    def make(**overrides):
        config = load_config("TokenWeightedTIGER", name,
                             config_dict=tiny_config_dict(data_path, **{**TINY_TIGER, **overrides}))
        dataset, train, valid, test = prepare_data(config)
        model, trainer = build_model_and_trainer(config, train)
        return model, trainer, train, valid, test
    return make


def test_weighting_off_equals_plain_tiger(tiny_model):
    model, _, train, _, _ = tiny_model(token_loss="ce", dropout_rate=0.0)
    batch = next(iter(train)).to(model.device)
    model.eval()
    logits = model.compute_token_logits(batch)
    codes = model.target_codes(batch)
    assert torch.equal(model.calculate_loss(batch), token_cross_entropy(logits, codes))
    assert torch.equal(model.calculate_loss(batch), tiger_module.TIGER.token_loss(model, logits, codes))
    # multi-target with every weight 1 and alpha forced to 1 (linear form, fg/or only) also reduces to CE
    mt, _, _, _, _ = tiny_model(token_loss="fg_fr_mt_cl", mt_form="logit", dropout_rate=0.0)
    mt.load_state_dict(model.state_dict(), strict=False)
    mt.eval()
    item = batch[mt.POS_ITEM_ID]
    mt.w_fg.fill_(1.0)
    mt.w_fr_items.fill_(1.0)
    # at t = 0: alpha = (1/2, 0, 1/2); the logit form is then sum_j CE(alpha_j f)
    want = sum(token_cross_entropy(torch.where(torch.isfinite(logits), logits * a, logits), codes)
               for a in (0.5, 0.0, 0.5))
    assert torch.allclose(mt.weighted_token_loss(logits, codes, item), want)


@pytest.mark.parametrize("mode,form", [("fg", "logit"), ("fg_fr", "logit"), ("fg_fr_mt", "linear"),
                                       ("fg_fr_mt_cl", "uncertainty"), ("pos", "logit"), ("cft", "logit"),
                                       ("igd", "logit"), ("rank", "logit")])
def test_every_option_gives_a_finite_loss_with_gradients(tiny_model, mode, form):
    model, _, train, _, _ = tiny_model(token_loss=mode, mt_form=form)
    batch = next(iter(train)).to(model.device)
    loss = model.calculate_loss(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert int(model.global_step) == 1


def test_full_method_one_epoch_logs_weights_and_plot(tiny_dataset, run_dirs, monkeypatch):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)
    data_path, name = tiny_dataset
    record = run_recbole_genrec(model="TokenWeightedTIGER", dataset=name,
                                config_dict=tiny_config_dict(data_path, **{**TINY_TIGER, "curriculum_c": 0.05}),
                                result_file=str(run_dirs / "tw.json"))
    extras = record["extras"]["token_weighting"]
    assert extras["token_loss"] == "fg_fr_mt_cl"
    assert len(extras["history"]) == 1
    row = extras["history"][0]
    assert sum(row[f"alpha_{j}"] for j in ("fg", "fr", "or")) == pytest.approx(1.0)
    assert row["alpha_fr"] > 0  # the curriculum moved on (c = 0.05 per step)
    assert os.path.getsize(extras["weights_plot"]) > 0
    assert sum(extras["front_greater_weights"]) == pytest.approx(3.0)
