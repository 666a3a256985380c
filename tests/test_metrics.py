"""Score-tensor contract and plugin metrics, checked by hand through RecBole's own Collector and Evaluator.

Scores are hand-made ``[n_rows, n_items]`` tensors (column = item id, column 0 = padding, set to -inf
as RecBole's trainer does); each row's single target goes in as ``positive_u``/``positive_i`` exactly as
RecBole's full-sort dataloader hands them over.
"""
import logging
import math
import types
from collections import Counter

import pytest
import torch
from recbole.evaluator import Collector, Evaluator, Register
from recbole.evaluator import metrics as recbole_metrics
from recbole.evaluator import register as recbole_register

from recbole_genrec.config import Config
from recbole_genrec.evaluator.metrics import GENREC_METRICS, head_item_mask, register_metrics
from recbole_genrec.utils import GenRecError

N_ITEMS = 30  # RecBole's data.num_items: ids 1..29 are items, 0 is padding
TOPK = [1, 5, 10]
ALL_METRICS = ["Hit", "NDCG", "MRR", "HeadHit", "TailHit", "HeadNDCG", "TailNDCG", "Coverage", "Entropy",
               "PrefixMatch", "ItemCoverage", "ShannonEntropy"]


def make_config(data_path, **overrides):
    config_dict = {"data_path": str(data_path), "metrics": ALL_METRICS, "topk": TOPK,
                   "valid_metric": "NDCG@10", "state": "WARNING", "show_progress": False}
    config_dict.update(overrides)
    return Config(model="SASRec", dataset="tiny", config_dict=config_dict)


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    return tmp_path_factory.mktemp("metrics_data")


@pytest.fixture(scope="module")
def config(data_path):
    return make_config(data_path)


def fake_train_data(count_items=None, num_items=N_ITEMS):
    """The two things ``Collector.data_collect`` reads from a training dataloader."""
    dataset = types.SimpleNamespace(num=lambda field: num_items, item_counter=Counter(count_items or {}))
    return types.SimpleNamespace(dataset=dataset)


def contract_scores(rankings, n_items=N_ITEMS):
    """Row i ranks ``rankings[i]`` first, in order; every other item scores strictly lower, with a
    distinct deterministic fill (smaller id first); padding column 0 is -inf as in RecBole's trainer."""
    scores = -float(n_items) - torch.arange(n_items, dtype=torch.float).repeat(len(rankings), 1)
    for row, ranked in enumerate(rankings):
        for position, item in enumerate(ranked):
            scores[row, item] = float(len(ranked) - position)
    scores[:, 0] = -math.inf
    return scores


def evaluate(config, scores, targets, count_items=None, model=None):
    """One evaluation pass through RecBole's Collector and Evaluator, as ``Trainer.evaluate`` does it."""
    collector, evaluator = Collector(config), Evaluator(config)
    collector.data_collect(fake_train_data(count_items, num_items=scores.shape[1]))
    rows = torch.arange(len(targets))
    collector.eval_batch_collect(scores, None, rows, torch.as_tensor(targets))
    collector.model_collect(model if model is not None else torch.nn.Module())
    return evaluator.evaluate(collector.get_data_struct())


def ranking_with_target_at(target, rank, length=15):
    others = [i for i in range(1, N_ITEMS) if i != target][:length - 1]
    return others[:rank - 1] + [target] + others[rank - 1:]


# ---- registration ------------------------------------------------------------------------------------
def test_metrics_are_registered_like_recbole_ones(config):
    for cls in GENREC_METRICS:
        name = cls.__name__.lower()
        assert recbole_register.metrics_dict[name] is cls
        assert recbole_register.metric_information[name] == cls.metric_need
        assert name in recbole_register.metric_types and name not in recbole_register.smaller_metrics
        assert getattr(recbole_metrics, cls.__name__) is cls
    register_metrics()  # idempotent
    assert sum(m is GENREC_METRICS[0] for m in recbole_register.metrics_dict.values()) == 1
    register = Register(config)
    assert register.need("rec.targets") and register.need("model.item_codes") and register.need("data.count_items")
    assert config["valid_metric_bigger"] is True


def test_stock_metrics_collect_nothing_extra(data_path):
    config = make_config(data_path, metrics=["Hit", "NDCG"])
    collector = Collector(config)
    collector.eval_batch_collect(contract_scores([[1, 2]]), None, torch.tensor([0]), torch.tensor([2]))
    assert "rec.targets" not in collector.data_struct


# ---- the score-tensor contract: Hit / NDCG / MRR by hand -------------------------------------------------
@pytest.mark.parametrize("rank", [1, 2, 3, 5, 7, 10, 11])
def test_target_at_rank_r(config, rank):
    target = 17
    result = evaluate(config, contract_scores([ranking_with_target_at(target, rank)]), [target])
    for k in TOPK:
        found = rank <= k
        assert result[f"hit@{k}"] == float(found)
        assert result[f"ndcg@{k}"] == pytest.approx(1 / math.log2(rank + 1) if found else 0.0, abs=1e-4)
        assert result[f"mrr@{k}"] == pytest.approx(1 / rank if found else 0.0, abs=1e-4)


def test_batch_means_over_rows(config):
    ranks = [1, 2, 4, 12]
    targets = [3, 8, 20, 25]
    scores = contract_scores([ranking_with_target_at(t, r) for t, r in zip(targets, ranks)])
    result = evaluate(config, scores, targets)
    assert result["hit@5"] == pytest.approx(3 / 4, abs=1e-4)
    assert result["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 4, abs=1e-4)
    assert result["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 4) / 4, abs=1e-4)


def test_generative_row_with_five_found_items(config):
    """A beam found 5 items; the target is not among them. With the contract's fill
    (``recbole_genrec.evaluator.scores.beam_scores_to_full``: every other item strictly lower, distinct,
    deterministic) Hit@10 = NDCG@10 = 0; with a naive -inf fill torch.topk picks 5 arbitrary unscored
    items and can pick the target, counting a hit the beam never found."""
    from recbole_genrec.evaluator.scores import beam_scores_to_full

    found = torch.tensor([[11, 12, 13, 14, 15, 0, 0, 0, 0, 0]])  # beam width 10, only 5 valid items
    logp = torch.tensor([[-0.1, -0.5, -1.0, -2.0, -3.0] + [-math.inf] * 5])
    naive = torch.full((1, N_ITEMS), -math.inf)
    naive[0, found[0, :5]] = logp[0, :5]
    contract = beam_scores_to_full(found, logp, N_ITEMS)
    contract[:, 0] = -math.inf  # as RecBole's trainer does
    for scores in (naive, contract):
        assert torch.topk(scores, 5).indices[0].tolist() == [11, 12, 13, 14, 15]

    naive_top10 = set(torch.topk(naive, 10).indices[0].tolist())
    contract_top10 = torch.topk(contract, 10).indices[0].tolist()
    assert contract_top10[5:] == [1, 2, 3, 4, 5]  # the fill decides, always the same way
    # a target outside the beam that tie-breaking among -inf scores happens to pull into the top 10
    candidates = sorted(naive_top10 - set(contract_top10) - {0})
    assert candidates, "torch.topk picked the same unscored items as the deterministic fill"
    target = candidates[0]

    naive_result = evaluate(config, naive, [target])
    contract_result = evaluate(config, contract, [target])
    assert naive_result["hit@10"] > 0 and naive_result["ndcg@10"] > 0  # the trap
    assert contract_result["hit@10"] == 0.0 and contract_result["ndcg@10"] == 0.0
    assert contract_result["hit@5"] == 0.0 and contract_result["mrr@10"] == 0.0


# ---- head / tail --------------------------------------------------------------------------------------
# Training counts: items 1..29; items 1-6 have 100..50 interactions, 7-29 have 5 (ties), item 29 has none.
COUNTS = {**{i: 110 - 10 * i for i in range(1, 7)}, **{i: 5 for i in range(7, 29)}}


def test_head_item_mask_by_training_popularity():
    head = head_item_mask(COUNTS, N_ITEMS, 0.2)  # floor(0.2 * 29) = 5 head items
    assert head.nonzero()[0].tolist() == [1, 2, 3, 4, 5] and not head[0]
    head = head_item_mask(COUNTS, N_ITEMS, 0.5)  # floor(14.5) = 14: 1-6, then ties 7..14 by smaller id
    assert head.nonzero()[0].tolist() == list(range(1, 15))
    assert head_item_mask({}, N_ITEMS, 0.01).sum() == 1  # at least one head item


def test_head_tail_hit_and_ndcg(config):
    # (target, rank): head targets 1 (rank 1), 2 (rank 3), 4 (absent); tail targets 9 (rank 2),
    # 20 (absent), 29 (never trained on, rank 10)
    cases = [(1, 1), (2, 3), (4, 12), (9, 2), (20, 12), (29, 10)]
    scores = contract_scores([ranking_with_target_at(t, r) for t, r in cases])
    targets = [t for t, _ in cases]
    result = evaluate(config, scores, targets, count_items=COUNTS)
    assert result["headhit@1"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["headhit@5"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["headndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 3, abs=1e-4)
    assert result["tailhit@5"] == pytest.approx(1 / 3, abs=1e-4)
    assert result["tailhit@10"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["tailndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(11)) / 3, abs=1e-4)
    # the two groups partition the test cases: their weighted mean is the overall value
    for k in TOPK:
        assert (result[f"headhit@{k}"] + result[f"tailhit@{k}"]) / 2 == pytest.approx(result[f"hit@{k}"], abs=1e-4)
        assert (result[f"headndcg@{k}"] + result[f"tailndcg@{k}"]) / 2 == pytest.approx(result[f"ndcg@{k}"],
                                                                                        abs=1e-4)


def test_head_fraction_is_configurable(data_path):
    config = make_config(data_path, head_fraction=0.5)  # head = items 1..14, so 9 is head now
    cases = [(1, 1), (9, 2), (20, 12)]
    scores = contract_scores([ranking_with_target_at(t, r) for t, r in cases])
    result = evaluate(config, scores, [t for t, _ in cases], count_items=COUNTS)
    assert result["headhit@5"] == 1.0 and result["tailhit@5"] == 0.0
    assert result["headndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-4)


def test_empty_group_is_nan_and_bad_fraction_is_one_line_error(config, data_path):
    result = evaluate(config, contract_scores([ranking_with_target_at(1, 1)]), [1], count_items=COUNTS)
    assert result["headhit@10"] == 1.0 and math.isnan(result["tailhit@10"])
    with pytest.raises(GenRecError, match="head_fraction"):
        Evaluator(make_config(data_path, head_fraction=1.5))


def test_head_tail_need_one_target_per_row(config):
    collector, evaluator = Collector(config), Evaluator(config)
    collector.data_collect(fake_train_data(COUNTS))
    collector.eval_batch_collect(contract_scores([[1, 2]]), None, torch.tensor([0, 0]), torch.tensor([1, 2]))
    with pytest.raises(GenRecError, match="exactly one target"):
        evaluator.evaluate(collector.get_data_struct())


# ---- coverage / entropy --------------------------------------------------------------------------------
def test_coverage_and_entropy(config):
    # top-5 lists of 3 users: 9 distinct items, 1-3 in every list, 4-9 once each
    rankings = [[1, 2, 3, 4, 5], [1, 2, 3, 6, 7], [1, 2, 3, 8, 9]]
    result = evaluate(config, contract_scores(rankings), [1, 1, 1])
    n_real = N_ITEMS - 1
    assert result["coverage@1"] == pytest.approx(1 / n_real, abs=1e-4)
    assert result["coverage@5"] == pytest.approx(9 / n_real, abs=1e-4)
    exposure = [3, 3, 3, 1, 1, 1, 1, 1, 1]  # items 1,2,3 three times; 4,5,6,7,8,9 once; 15 slots
    expected = -sum(c / 15 * math.log(c / 15) for c in exposure)
    assert result["entropy@5"] == pytest.approx(expected, abs=1e-4)
    assert result["entropy@1"] == 0.0  # everyone's top-1 is item 1
    # top-10: contract fill adds the smallest unlisted ids; check against a direct count
    top10 = torch.topk(contract_scores(rankings), 10).indices
    counts = Counter(top10.flatten().tolist())
    assert result["coverage@10"] == pytest.approx(len(counts) / n_real, abs=1e-4)
    assert result["entropy@10"] == pytest.approx(-sum(c / 30 * math.log(c / 30) for c in counts.values()), abs=1e-4)
    # RecBole's own: ItemCoverage divides by n_items + padding, ShannonEntropy by the distinct-item count
    assert result["itemcoverage@5"] == pytest.approx(9 / N_ITEMS, abs=1e-4)
    assert result["shannonentropy@5"] == pytest.approx(expected / 9, abs=1e-4)


def test_padding_never_counts_in_coverage_or_entropy(config):
    naive = torch.full((1, N_ITEMS), -math.inf)
    naive[0, [3, 4]] = torch.tensor([2.0, 1.0])
    # all columns but 3, 4 are -inf, padding included: whatever topk picks, padding is not an item
    result = evaluate(config, naive, [3])
    picked = set(torch.topk(naive, 10).indices[0].tolist())
    assert result["coverage@10"] == pytest.approx(len(picked - {0}) / (N_ITEMS - 1), abs=1e-4)


# ---- prefix match ----------------------------------------------------------------------------------------
def item_codes():
    """Item i's codes: (i // 9, (i // 3) % 3, i % 3) -- items sharing prefixes are id neighbours."""
    ids = torch.arange(N_ITEMS)
    return torch.stack([ids // 9, (ids // 3) % 3, ids % 3], dim=1)


def test_prefix_match_on_top1_item(config):
    codes = item_codes()
    # (target, top-1): shares 3 tokens (same item), 2 tokens (10 vs 11), 1 token (10 vs 13), 0 (10 vs 19)
    cases = [(10, 10), (10, 11), (10, 13), (10, 19)]
    assert codes[10].tolist() == [1, 0, 1] and codes[11].tolist() == [1, 0, 2]
    assert codes[13].tolist() == [1, 1, 1] and codes[19].tolist() == [2, 0, 1]
    scores = contract_scores([[top1] for _, top1 in cases])
    model = types.SimpleNamespace(item_codes=codes)
    result = evaluate(config, scores, [t for t, _ in cases], model=model)
    assert result["prefixmatch@1"] == pytest.approx(3 / 4)
    assert result["prefixmatch@2"] == pytest.approx(2 / 4)
    assert result["prefixmatch@3"] == pytest.approx(1 / 4)
    assert result["prefixmatch@3"] == result["hit@1"]  # full-length match = Hit@1 when codes are unique
    assert "prefixmatch@4" not in result  # k runs over prefix lengths 1..L, not over topk


def test_prefix_match_without_codes_is_skipped_with_one_error(config, caplog, data_path):
    scores = contract_scores([[1]])
    with caplog.at_level(logging.ERROR):
        result = evaluate(config, scores, [1], model=torch.nn.Linear(1, 1))
    assert not any(key.startswith("prefixmatch") for key in result)
    assert result["hit@1"] == 1.0
    errors = [r.getMessage() for r in caplog.records if "PrefixMatch" in r.getMessage()]
    assert len(errors) == 1 and "\n" not in errors[0] and "item_codes" in errors[0]
    valid_on_prefix = make_config(data_path, valid_metric="PrefixMatch@1")
    collector, evaluator = Collector(valid_on_prefix), Evaluator(valid_on_prefix)
    collector.data_collect(fake_train_data())
    collector.eval_batch_collect(scores, None, torch.tensor([0]), torch.tensor([1]))
    collector.model_collect(torch.nn.Linear(1, 1))
    with pytest.raises(GenRecError, match="item_codes"):
        evaluator.evaluate(collector.get_data_struct())


# ---- end to end: a real dataset, a RecBole trainer ---------------------------------------------------------
def test_trainer_evaluate_on_tiny_dataset(tmp_path, monkeypatch):
    """Real train counts and real positive_u/positive_i from RecBole's full-sort loader, via Trainer.evaluate."""
    from conftest import write_atomic_dataset
    from recbole.data import create_dataset, data_preparation
    from recbole.model.abstract_recommender import SequentialRecommender
    from recbole.utils import InputType

    from recbole_genrec.registry import get_trainer

    class NextIdModel(SequentialRecommender):
        """Scores item (last + 1) highest, then (last + 2), ...; exposes item_codes."""

        input_type = InputType.POINTWISE

        def __init__(self, config, dataset):
            super().__init__(config, dataset)
            self.weight = torch.nn.Parameter(torch.zeros(1))
            ids = torch.arange(self.n_items)
            self.register_buffer("item_codes", torch.stack([ids % 4, ids % 7], dim=1))

        def full_sort_predict(self, interaction):
            seq, length = interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]
            last = self.gather_indexes(seq.unsqueeze(-1), length - 1).squeeze(-1)
            ids = torch.arange(self.n_items)
            return -((ids.unsqueeze(0) - last.unsqueeze(1) - 1) % self.n_items).float() + 0 * self.weight

    monkeypatch.chdir(tmp_path)
    write_atomic_dataset(str(tmp_path), name="tiny", with_text=False)
    config = Config(model=NextIdModel, dataset="tiny", config_dict={
        "data_path": str(tmp_path), "metrics": ["Hit", "NDCG", "HeadHit", "TailHit", "Coverage", "PrefixMatch"],
        "topk": [1, 5, 10], "valid_metric": "NDCG@10", "state": "WARNING", "show_progress": False,
        "train_neg_sample_args": None, "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "text_fields": None, "epochs": 1, "eval_batch_size": 16})
    dataset = create_dataset(config)
    train_data, _, test_data = data_preparation(config, dataset)
    model = NextIdModel(config, train_data._dataset)
    trainer = get_trainer(NextIdModel, config)(config, model)
    trainer.eval_collector.data_collect(train_data)
    assert trainer.eval_collector.data_struct.get("data.count_items") == train_data.dataset.item_counter

    result = trainer.evaluate(test_data, load_best_model=False)
    # by hand from the same loader: rank of the target under the model's scores
    hits, head_hits, n_head = [], [], 0
    head = head_item_mask(train_data.dataset.item_counter, dataset.item_num, 0.2)
    for interaction, history_index, positive_u, positive_i in test_data:
        scores = model.full_sort_predict(interaction)
        scores[:, 0] = -math.inf
        if history_index is not None:
            scores[history_index] = -math.inf
        top10 = torch.topk(scores, 10).indices
        for row, item in zip(positive_u.tolist(), positive_i.tolist()):
            hit = item in top10[row].tolist()
            hits.append(hit)
            if head[item]:
                head_hits.append(hit)
    assert result["hit@10"] == pytest.approx(sum(hits) / len(hits), abs=1e-4)
    assert result["headhit@10"] == pytest.approx(sum(head_hits) / len(head_hits), abs=1e-4)
    assert {"tailhit@10", "coverage@10", "prefixmatch@1", "prefixmatch@2"} <= set(result)
    assert "prefixmatch@3" not in result
