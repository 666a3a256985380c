"""Extra metrics every model can report, registered with RecBole's evaluator.

Once :func:`register_metrics` has run (``recbole_genrec.config.Config.__init__`` calls it first, so every
``recbole_genrec`` entry point has it), the names below work in ``metrics: [...]`` exactly like RecBole's
own (``Hit``, ``NDCG``, ...): RecBole's ``Config`` accepts them, the ``Register`` tells the ``Collector``
what to gather and the ``Evaluator`` finds the classes.

* ``HeadHit`` / ``TailHit`` -> ``headhit@K`` / ``tailhit@K``: Hit@K averaged over the test cases whose
  target is a head (resp. tail) item;
* ``HeadNDCG`` / ``TailNDCG`` -> ``headndcg@K`` / ``tailndcg@K``: NDCG@K, same split;
* ``Coverage`` -> ``coverage@K``: distinct real items in anyone's top-K / n_items;
* ``Entropy`` -> ``entropy@K``: Shannon entropy (nats) of the item exposure distribution of all top-K lists;
* ``PrefixMatch`` -> ``prefixmatch@k``: share of test cases whose TOP-1 item has the target's first ``k``
  semantic-ID tokens; here ``k`` is a PREFIX LENGTH (1..L), not a list cut-off, and ``topk`` is ignored.

Head/tail: items (padding id 0 excluded) are sorted by their number of TRAINING interactions
(``data.count_items``, RecBole's ``train_data.dataset.item_counter``), most first, ties by smaller item id;
the first ``max(1, floor(head_fraction * n_items))`` are head, the rest (items never seen in training
included) tail. ``head_fraction`` is a config key, default 0.2 (GenPlugin); 0.5 reproduces the
token-weighting paper's split. A test case is head or tail by its target item, and ``headhit@K`` is the
mean Hit@K over head-target test cases only (denominator: their count), ``tailhit@K`` likewise over
tail-target cases; a group with no test case reports ``nan``. These metrics need exactly one target per
evaluated row, which the protocol's leave-one-out split gives.

Semantic IDs for ``PrefixMatch``: the model exposes ``item_codes``, a LongTensor ``[n_items, L]`` whose
row ``i`` is item ``i``'s code sequence (row 0 = padding, never matched); the collector reads it in its
``model_collect`` hook after each evaluation pass. A model without ``item_codes`` gets no
``prefixmatch@k`` keys and one logged error line (a hard error if ``PrefixMatch`` is the valid_metric).

RecBole's own diversity metrics, checked against the above:

* ``ItemCoverage`` counts the padding item in its denominator (``n_items + 1``) and would count item 0
  if it reached a top-K list, hence ``Coverage``;
* ``ShannonEntropy`` divides the entropy by the number of distinct recommended items, so it is not the
  entropy of the exposure distribution, hence ``Entropy``;
* ``GiniIndex``, ``AveragePopularity``, ``TailPercentage`` are left as they are and usable.

All of RecBole's metrics that need ``data.num_items`` or ``data.count_items`` crash in RecBole 1.2.1's
``Collector.get_data_struct`` (it calls ``.cpu()`` on an int and on a ``Counter``); the collector
extension below moves only tensors to the CPU, which fixes them as well.
"""
import logging
import math

import numpy as np
import torch
from recbole.evaluator.base_metric import AbstractMetric, TopkMetric
from recbole.evaluator.collector import Collector
from recbole.utils import EvaluatorType

from recbole_genrec.utils import GenRecError

logger = logging.getLogger(__name__)

#: Collected per evaluation pass: ``[n_rows, 2]`` = (target item id, number of positives) of each row.
TARGETS_KEY = "rec.targets"
#: Collected from the model after each evaluation pass: the model's ``item_codes`` ``[n_items, L]``.
ITEM_CODES_KEY = "model.item_codes"
#: Share of items (by training popularity) that are "head" unless ``head_fraction`` is set.
DEFAULT_HEAD_FRACTION = 0.2

# Keys RecBole (and we) collect per evaluation pass; everything else (data.*) is kept across passes.
_PER_PASS_KEYS = ("rec.topk", "rec.meanrank", "rec.score", "rec.items", "data.label", TARGETS_KEY)
#: The same keys, public: one row per evaluated row (a multi-process evaluation gathers exactly these).
PER_PASS_KEYS = _PER_PASS_KEYS


# ---- helpers ------------------------------------------------------------------------------------
def head_fraction_from(config):
    """``config['head_fraction']`` checked to lie in (0, 1]; the default when unset."""
    fraction = config["head_fraction"]
    if fraction is None:
        return DEFAULT_HEAD_FRACTION
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise GenRecError(f"head_fraction must be a number in (0, 1] (e.g. 0.2), got {fraction!r}")
    return float(fraction)


def head_item_mask(count_items, num_items, fraction):
    """Boolean ``[num_items]``: True for head items (see the module docstring); index 0 (padding) False.

    Args:
        count_items: mapping item id -> training interactions (RecBole's ``item_counter``).
        num_items: RecBole's ``data.num_items`` (real items + the padding id 0).
        fraction: share of real items that are head.
    """
    counts = np.zeros(num_items, dtype=np.int64)
    for item, count in dict(count_items).items():
        if 0 < int(item) < num_items:
            counts[int(item)] = count
    ids = np.arange(1, num_items)
    order = ids[np.lexsort((ids, -counts[ids]))]  # most interactions first, ties by smaller id
    n_head = max(1, int(math.floor(fraction * len(ids) + 1e-9)))
    mask = np.zeros(num_items, dtype=bool)
    mask[order[:n_head]] = True
    return mask


def single_targets(dataobject, metric):
    """The target item of each evaluated row; a one-line error when a row has not exactly one."""
    targets = dataobject.get(TARGETS_KEY).numpy()
    if len(targets) and not (targets[:, 1] == 1).all():
        bad = int((targets[:, 1] != 1).sum())
        raise GenRecError(
            f"metric {metric} needs exactly one target item per evaluated user, but {bad} rows have "
            f"another number: use the leave-one-out split (eval_args.split: {{'LS': 'valid_and_test'}})"
        )
    return targets[:, 0]


def per_row_hit(pos_index):
    """``[n_rows, max_k]``: 1 where a positive is within the first k items."""
    return (np.cumsum(pos_index, axis=1) > 0).astype(float)


def per_row_ndcg_single(pos_index):
    """``[n_rows, max_k]`` NDCG@k for rows with one positive: ``1/log2(r+1)`` once the hit rank r <= k."""
    gains = 1.0 / np.log2(np.arange(2, pos_index.shape[1] + 2))
    return np.cumsum(np.where(pos_index, gains, 0.0), axis=1)


# ---- metrics --------------------------------------------------------------------------------------
class _PopularityGroupMetric(TopkMetric):
    """Hit or NDCG restricted to the test cases whose target is a head (or a tail) item."""

    metric_need = ["rec.topk", TARGETS_KEY, "data.count_items", "data.num_items"]
    group = None  # "head" | "tail"
    per_row = None  # function pos_index -> [n_rows, max_k]

    def __init__(self, config):
        super().__init__(config)
        self.head_fraction = head_fraction_from(config)

    def calculate_metric(self, dataobject):
        name = type(self).__name__.lower()
        pos_index, _ = self.used_info(dataobject)
        targets = single_targets(dataobject, type(self).__name__)
        head = head_item_mask(dataobject.get("data.count_items"), dataobject.get("data.num_items"),
                              self.head_fraction)
        in_group = head[targets] if self.group == "head" else ~head[targets]
        values = type(self).per_row(pos_index)[in_group]
        result = {}
        for k in self.topk:
            value = values[:, k - 1].mean() if len(values) else float("nan")
            result[f"{name}@{k}"] = round(float(value), self.decimal_place)
        return result


class HeadHit(_PopularityGroupMetric):
    """Hit@K over test cases whose target is a head item (most popular ``head_fraction`` in training)."""

    group, per_row = "head", per_row_hit


class TailHit(_PopularityGroupMetric):
    """Hit@K over test cases whose target is a tail item (all non-head items)."""

    group, per_row = "tail", per_row_hit


class HeadNDCG(_PopularityGroupMetric):
    """NDCG@K over test cases whose target is a head item."""

    group, per_row = "head", per_row_ndcg_single


class TailNDCG(_PopularityGroupMetric):
    """NDCG@K over test cases whose target is a tail item."""

    group, per_row = "tail", per_row_ndcg_single


class Coverage(AbstractMetric):
    """Coverage@K = |distinct real items in all users' top-K lists| / n_items (padding id 0 excluded)."""

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.items", "data.num_items"]

    def __init__(self, config):
        super().__init__(config)
        self.topk = config["topk"]

    def calculate_metric(self, dataobject):
        items = dataobject.get("rec.items").numpy()
        n_real = dataobject.get("data.num_items") - 1
        result = {}
        for k in self.topk:
            distinct = np.unique(items[:, :k])
            result[f"coverage@{k}"] = round(float((distinct > 0).sum() / n_real), self.decimal_place)
        return result


class Entropy(AbstractMetric):
    """Entropy@K = -sum_i p_i ln p_i, p_i = (times item i is in a top-K list) / (all top-K slots).

    Natural log (nats); 0 when every list holds the same items, ``ln(n_items)`` at most. Padding
    entries (id 0) are left out.
    """

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.items"]

    def __init__(self, config):
        super().__init__(config)
        self.topk = config["topk"]

    def calculate_metric(self, dataobject):
        items = dataobject.get("rec.items").numpy()
        result = {}
        for k in self.topk:
            exposed = items[:, :k].ravel()
            counts = np.bincount(exposed[exposed > 0])
            counts = counts[counts > 0]
            p = counts / counts.sum() if counts.sum() else counts.astype(float)
            result[f"entropy@{k}"] = round(float(-(p * np.log(p)).sum()) + 0.0, self.decimal_place)  # no -0.0
        return result


class PrefixMatch(AbstractMetric):
    """PrefixMatch@k: share of test cases whose top-1 item has the target's first k semantic-ID tokens.

    ``k`` runs over the prefix lengths 1..L of the model's ``item_codes`` (NOT over ``topk``);
    ``prefixmatch@L`` equals Hit@1 when codes are unique per item.
    """

    metric_type = EvaluatorType.RANKING
    metric_need = ["rec.items", TARGETS_KEY, ITEM_CODES_KEY]

    def __init__(self, config):
        super().__init__(config)
        self.is_valid_metric = str(config["valid_metric"]).lower().startswith("prefixmatch")
        self.model_name = config["model"]
        self._reported_missing = False

    def calculate_metric(self, dataobject):
        if ITEM_CODES_KEY not in dataobject:
            message = (f"metric PrefixMatch skipped: model {self.model_name} exposes no item_codes "
                       f"(semantic IDs); remove PrefixMatch from metrics for this model")
            if self.is_valid_metric:
                raise GenRecError(message.replace("skipped", "cannot be the valid_metric"))
            if not self._reported_missing:  # once per run, not once per epoch
                logger.error(message)
                self._reported_missing = True
            return {}
        codes = dataobject.get(ITEM_CODES_KEY).numpy()
        top1 = dataobject.get("rec.items").numpy()[:, 0]
        targets = single_targets(dataobject, "PrefixMatch")
        if codes.ndim != 2 or codes.shape[0] <= max(top1.max(initial=0), targets.max(initial=0)):
            raise GenRecError(
                f"model {self.model_name}'s item_codes has shape {tuple(codes.shape)}: it must be "
                f"[n_items, L] with one row per item id (row 0 = padding)"
            )
        same = codes[top1] == codes[targets]  # [n_rows, L]
        prefix = np.cumprod(same, axis=1) * (top1 > 0)[:, None]
        mean = prefix.mean(axis=0) if len(prefix) else np.zeros(codes.shape[1])
        return {f"prefixmatch@{k}": round(float(mean[k - 1]), self.decimal_place)
                for k in range(1, codes.shape[1] + 1)}


#: The metric classes :func:`register_metrics` makes visible to RecBole.
GENREC_METRICS = (HeadHit, TailHit, HeadNDCG, TailNDCG, Coverage, Entropy, PrefixMatch)


# ---- RecBole integration ----------------------------------------------------------------------------
def _eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
    _RECBOLE_EVAL_BATCH_COLLECT(self, scores_tensor, interaction, positive_u, positive_i)
    if self.register.need(TARGETS_KEY):
        rows = positive_u.detach().long().cpu()
        n_rows = scores_tensor.shape[0]
        targets = torch.zeros(n_rows, dtype=torch.long)
        targets[rows] = positive_i.detach().long().cpu()
        n_pos = torch.bincount(rows, minlength=n_rows)
        self.data_struct.update_tensor(TARGETS_KEY, torch.stack([targets, n_pos], dim=1))


def _model_collect(self, model):
    _RECBOLE_MODEL_COLLECT(self, model)
    if self.register.need(ITEM_CODES_KEY):
        if ITEM_CODES_KEY in self.data_struct:
            del self.data_struct[ITEM_CODES_KEY]
        codes = getattr(getattr(model, "module", model), "item_codes", None)
        if codes is not None:
            self.data_struct.set(ITEM_CODES_KEY, torch.as_tensor(codes).detach().long().cpu())


def _get_data_struct(self):
    """RecBole's ``get_data_struct``, but only tensors go ``.cpu()`` (ints and Counters stay as they are)."""
    import copy

    for key, value in self.data_struct._data_dict.items():
        if isinstance(value, torch.Tensor):
            self.data_struct._data_dict[key] = value.cpu()
    returned = copy.deepcopy(self.data_struct)
    for key in _PER_PASS_KEYS:
        if key in self.data_struct:
            del self.data_struct[key]
    return returned


_RECBOLE_EVAL_BATCH_COLLECT = Collector.eval_batch_collect
_RECBOLE_MODEL_COLLECT = Collector.model_collect


def register_metrics():
    """Make :data:`GENREC_METRICS` usable in ``metrics: [...]`` like RecBole's own; idempotent.

    RecBole 1.2.1 builds its metric tables once, at import of ``recbole.evaluator.register``, from the
    classes defined in ``recbole.evaluator.metrics``. This adds ours to those same dict/list objects (which
    ``Config``, ``Register`` and ``Evaluator`` all share by reference): ``metrics_dict``,
    ``metric_information`` (what to collect), ``metric_types`` (RANKING) and ``smaller_metrics`` (none of
    ours), and sets them as attributes of ``recbole.evaluator.metrics``. It also extends RecBole's
    ``Collector`` class in place, so every trainer's collector, stock or plugin, gathers what ours need:

    * ``eval_batch_collect`` also stores each row's target item (``rec.targets``) when a metric needs it;
    * ``model_collect`` (empty in RecBole) reads the model's ``item_codes`` when ``PrefixMatch`` is asked;
    * ``get_data_struct`` moves only tensors to the CPU (RecBole's crashes on ``data.num_items``).

    Stock metrics see no change: the extra work runs only when one of our metrics is configured.
    """
    from recbole.evaluator import metrics as recbole_metrics
    from recbole.evaluator import register as recbole_register

    for cls in GENREC_METRICS:
        name = cls.__name__.lower()
        recbole_register.metrics_dict[name] = cls
        recbole_register.metric_information[name] = cls.metric_need
        recbole_register.metric_types[name] = cls.metric_type
        if cls.smaller and name not in recbole_register.smaller_metrics:
            recbole_register.smaller_metrics.append(name)
        setattr(recbole_metrics, cls.__name__, cls)
    Collector.eval_batch_collect = _eval_batch_collect
    Collector.model_collect = _model_collect
    Collector.get_data_struct = _get_data_struct
