"""Hyperparameter search on Ray Tune, on one machine or on an existing Ray cluster.

``python run_hyper.py --model=NAME --dataset=NAME --params_file=FILE [--num_samples=N] [--scheduler=asha|fifo]
[--ray_address=ADDRESS] [--cpus_per_trial=C] [--gpus_per_trial=G] [--output=DIR] [--key=value ...]``
or :func:`run_hyper`.

How a search runs:

* the driver builds the config and prepares the dataset (filtering, splitting, semantic IDs) once;
  the dataset and the train/valid dataloaders go to the object store through ``tune.with_parameters``
  and every trial reuses them. The test dataloader never leaves the driver: trials cannot see it;
* each trial builds its own config (:class:`SnapshotConfig`: the driver's yaml layers, then the sampled
  values, so values are type-checked and derived settings follow), then trains through
  :func:`~recbole_genrec.quick_start.run_recbole_genrec` (same protocol, same metrics) and reports the
  validation metrics to Tune after every validation, so ASHA can stop bad trials early. A trial whose
  values change how the data is built (see :data:`DATA_KEYS`) rebuilds the data in that trial; one that
  only changes batch sizes or negative sampling rebuilds only the dataloaders from the shared dataset;
* checkpoints go to the trial's own directory (absolute path; Tune changes the working directory);
* afterwards the best trial (best validation score over its epochs, failed trials excluded) is
  evaluated once on the test set from its checkpoint, and ``best.json``, ``trials.csv`` and
  ``valid_vs_params.png`` are written atomically under the output folder.
"""
import ast
import copy
import io
import logging
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from recbole_genrec.config import Config, parse_cmd_args
from recbole_genrec.utils import GenRecError, atomic_write_bytes, atomic_write_json, to_jsonable

METRIC = "valid_score"  # the name Tune sees; the value is the config's valid_metric

# Config keys that change how the dataset is built or split: a trial that changes one rebuilds the data.
DATA_KEYS = frozenset("""
data_path dataset benchmark_filename field_separator seq_separator USER_ID_FIELD ITEM_ID_FIELD RATING_FIELD
TIME_FIELD seq_len LABEL_FIELD threshold NEG_PREFIX load_col unload_col unused_col additional_feat_suffix
rm_dup_inter val_interval filter_inter_by_user_or_item user_inter_num_interval item_inter_num_interval
alias_of_user_id alias_of_item_id alias_of_entity_id alias_of_relation_id preload_weight normalize_field
normalize_all numerical_features discretization ITEM_LIST_LENGTH_FIELD LIST_SUFFIX MAX_ITEM_LIST_LENGTH
POSITION_FIELD HEAD_ENTITY_ID_FIELD TAIL_ENTITY_ID_FIELD RELATION_ID_FIELD ENTITY_ID_FIELD kg_reverse_r
entity_kg_num_interval relation_kg_num_interval eval_args repeatable cache_dir
""".split())
# Prefixes of generative-recommendation keys that shape the data (item text, semantic IDs, tokenizers);
# every key of properties/semantic_ids.yaml counts too, and a model class may add its own keys with a
# ``data_config_keys`` attribute.
DATA_KEY_PREFIXES = ("text_", "sid_", "semantic_", "rqvae", "codebook", "tokenizer", "kmeans", "item_emb",
                     "embedding_model")
# Keys that change only the dataloaders: these are rebuilt from the shared dataset.
LOADER_KEYS = frozenset({"train_batch_size", "eval_batch_size", "train_neg_sample_args", "shuffle", "transform"})

# Options of the search itself (everything else on the command line is a RecBole setting).
_SEARCH_OPTIONS = ("params_file", "config_files", "num_samples", "scheduler", "ray_address", "cpus_per_trial",
                   "gpus_per_trial", "output", "num_cpus", "grace_period", "reduction_factor",
                   "max_concurrent_trials")


# ---- search space file -----------------------------------------------------------------------------
_NUMERIC_KINDS = {"uniform": 2, "quniform": 3, "loguniform": 2, "qloguniform": 3, "randint": 2, "randn": 2}
_LIST_KINDS = ("choice", "grid")
SPACE_HELP = ("one 'name: kind args' a line, kind one of choice [a, b], grid [a, b], uniform LOW HIGH, "
              "quniform LOW HIGH Q, loguniform LN_LOW LN_HIGH, qloguniform LN_LOW LN_HIGH Q, "
              "randint LOW HIGH (HIGH excluded), randn MEAN SD")


def _parse_list(text):
    """``[a, b]`` as YAML flow (strings unquoted or quoted, numbers, nested lists), else as Python."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return None
    return value if isinstance(value, list) and value else None


def parse_space_line(line):
    """``'learning_rate: loguniform -8 -4'`` -> ``('learning_rate', 'loguniform', [-8.0, -4.0])``.

    RecBole's own format (``learning_rate loguniform -8 -4``, no colon) is read too. Returns ``None``
    for blank and comment lines; raises ``ValueError`` with the reason otherwise.
    """
    text = re.sub(r"(^|\s)#.*$", "", line).strip()
    if not text:
        return None
    match = re.match(r"^([A-Za-z_][\w.\-]*)\s*:\s*(.*)$", text) or re.match(r"^([A-Za-z_][\w.\-]*)\s+(.*)$", text)
    if not match:
        raise ValueError("expected 'name: kind args'")
    name, rest = match.group(1), match.group(2).strip()
    kind, _, args = rest.partition(" ")
    kind, args = kind.strip(), args.strip()
    if kind in _LIST_KINDS:
        values = _parse_list(args)
        if values is None:
            raise ValueError(f"{kind} needs a non-empty list like [64, 128]")
        return name, kind, values
    if kind in _NUMERIC_KINDS:
        parts = args.replace(",", " ").split()
        if len(parts) != _NUMERIC_KINDS[kind]:
            raise ValueError(f"{kind} takes {_NUMERIC_KINDS[kind]} numbers, got {len(parts)}")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            raise ValueError(f"{kind} takes numbers, got {args!r}") from None
        if kind != "randn" and numbers[0] >= numbers[1]:
            raise ValueError(f"{kind} needs LOW < HIGH, got {parts[0]} {parts[1]}")
        if kind == "randn" and numbers[1] <= 0:
            raise ValueError("randn needs a positive SD")
        if kind == "randint" and not all(n.is_integer() for n in numbers):
            raise ValueError("randint takes integers")
        if kind.startswith("q") and numbers[2] <= 0:
            raise ValueError(f"{kind} needs a positive Q")
        return name, kind, numbers
    raise ValueError(f"unknown kind {kind!r}")


def read_search_space(path):
    """The search space file as ``{name: (kind, args)}``; a bad line is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GenRecError(f"search space file {str(path)!r} not found: check --params_file")
    space = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            parsed = parse_space_line(line)
        except ValueError as err:
            raise GenRecError(f"{path.name} line {number} {line.strip()!r}: {err}; {SPACE_HELP}") from None
        if parsed is None:
            continue
        name, kind, args = parsed
        if name in space:
            raise GenRecError(f"{path.name} line {number}: {name!r} is given twice; keep one line")
        space[name] = (kind, args)
    if not space:
        raise GenRecError(f"search space file {path.name} has no hyperparameters: {SPACE_HELP}")
    return space


def to_tune_space(space):
    """``{name: (kind, args)}`` -> Tune domains (loguniform bounds are natural logs, as in RecBole)."""
    from ray import tune

    domains = {}
    for name, (kind, args) in space.items():
        if kind == "choice":
            domains[name] = tune.choice(args)
        elif kind == "grid":
            domains[name] = tune.grid_search(args)
        elif kind == "uniform":
            domains[name] = tune.uniform(*args)
        elif kind == "quniform":
            domains[name] = tune.quniform(*args)
        elif kind == "loguniform":
            domains[name] = tune.loguniform(math.exp(args[0]), math.exp(args[1]))
        elif kind == "qloguniform":
            domains[name] = tune.qloguniform(math.exp(args[0]), math.exp(args[1]), args[2])
        elif kind == "randint":
            domains[name] = tune.randint(int(args[0]), int(args[1]))
        elif kind == "randn":
            domains[name] = tune.randn(*args)
    return domains


# ---- data reuse ------------------------------------------------------------------------------------
def _semantic_id_keys():
    """Every key of ``properties/semantic_ids.yaml`` (when present) shapes the semantic IDs: a data key."""
    import yaml

    from recbole_genrec.config import PROPERTIES_DIR

    path = PROPERTIES_DIR / "semantic_ids.yaml"
    try:
        return frozenset(yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else frozenset()
    except (OSError, yaml.YAMLError, TypeError):
        return frozenset()


def _is_data_key(key, model_class):
    return (key in DATA_KEYS or key.startswith(DATA_KEY_PREFIXES) or key in _semantic_id_keys()
            or key in tuple(getattr(model_class, "data_config_keys", ())))


def data_changes(base_config, config):
    """``('dataset'|'loaders'|None, keys)``: what a trial's config changes in how the data is built."""
    base, new = base_config.final_config_dict, config.final_config_dict
    changed = sorted(k for k in set(base) | set(new) if base.get(k) != new.get(k))
    data = [k for k in changed if _is_data_key(k, config.model_class)]
    if data:
        return "dataset", data
    loaders = [k for k in changed if k in LOADER_KEYS]
    if loaders:
        return "loaders", loaders
    return None, []


def _plain(value):
    """Tune samples numpy scalars; the config's type checks want Python ints and floats."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class SnapshotConfig(Config):
    """:class:`~recbole_genrec.config.Config` whose yaml layers (RecBole's and the plugin's property files,
    then the user's ``--config_files``) are the ones the driver read. Property or config files edited, or
    different on another node, while a search runs do not reach its trials; the trial's own values (the
    ``config_dict`` layer) and the fixed command-line settings still go through every check and default."""

    def __init__(self, model, dataset, layers, config_dict=None, cmd_args=None):
        self._layers = layers
        super().__init__(model, dataset, None, config_dict, cmd_args)

    def _load_config_files(self, file_list):
        return copy.deepcopy(self._layers["files"])

    def _load_internal_config_dict(self, model, model_class, dataset):
        super()._load_internal_config_dict(model, model_class, dataset)
        self.internal_config_dict = copy.deepcopy(self._layers["internal"])


def config_layers(config):
    """The yaml layers of a built config, for :class:`SnapshotConfig`."""
    return {"files": copy.deepcopy(config.file_config_dict), "internal": copy.deepcopy(config.internal_config_dict)}


def trial_config(spec, params):
    """A trial's config: the driver's yaml layers, the sampled ``params``, the fixed command-line settings."""
    return SnapshotConfig(spec["model"], spec["dataset"], spec["layers"], params, spec["cmd_args"])


# ---- one trial (runs in a Ray worker) -------------------------------------------------------------------
def _trial(params, spec=None, shared=None):
    import torch
    from ray.air import session
    from recbole.utils import init_logger

    from recbole_genrec import quick_start

    torch.set_num_threads(max(1, int(spec["cpus_per_trial"])))
    trial_dir = Path(session.get_trial_dir()).resolve()
    params = {k: _plain(v) for k, v in params.items()}
    config = trial_config(spec, params)
    config["checkpoint_dir"] = str(trial_dir / "checkpoints")
    init_logger(config)
    logger = logging.getLogger()

    base_config, dataset, train_data, valid_data = shared
    change, keys = data_changes(base_config, config)
    if change == "dataset":
        logger.warning(f"trial changes data keys {keys}: rebuilding the dataset for this trial")
        dataset, train_data, valid_data, _ = quick_start.prepare_data(config)
    elif change == "loaders":
        logger.info(f"trial changes loader keys {keys}: rebuilding dataloaders from the shared dataset")
        train_data, valid_data, _ = quick_start.data_preparation(config, dataset)

    valid_key = str(config["valid_metric"]).lower()

    def report(epoch_idx, valid_result):
        valid_result = dict(valid_result or {})
        metrics = {f"valid_{k}": float(v) for k, v in valid_result.items()}
        metrics.update({METRIC: float(valid_result[valid_key]), "epoch": epoch_idx + 1,
                        "checkpoint_dir": config["checkpoint_dir"]})
        session.report(metrics)

    # test=None: the test set is not evaluated (nor shipped) in a trial.
    quick_start.run_recbole_genrec(prepared=(config, dataset, train_data, valid_data, None), saved=True,
                                   epoch_callback=report, result_file=str(trial_dir / "trial_result.json"))


# ---- results ------------------------------------------------------------------------------------
def _error_line(error):
    """The last meaningful line of a (Ray-wrapped) exception: ``'ValueError: Training loss is nan'``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception)\b", line) or ": " in line and not line.startswith("File "):
            return line[:300]
    return (lines[-1] if lines else type(error).__name__)[:300]


def _trial_rows(result_grid, searched, mode, max_reports):
    rows = []
    better = max if mode == "max" else min
    for index in range(len(result_grid)):
        result = result_grid[index]
        history = result.metrics_dataframe
        scores = []
        if history is not None and METRIC in history:
            scores = [float(s) for s in history[METRIC].tolist() if s is not None and np.isfinite(s)]
        metrics = result.metrics or {}
        # A trial ran to its end if it reported every validation (ASHA stops it at max_t, after its last
        # report) or if its run returned (RecBole's own early stopping); otherwise the scheduler stopped it.
        if result.error is not None:
            status = "failed"
        elif len(scores) >= max_reports or (Path(result.path) / "trial_result.json").is_file():
            status = "completed"
        else:
            status = "stopped early"
        row = {"trial_id": metrics.get("trial_id") or Path(result.path).name, "status": status}
        row.update({name: to_jsonable(_plain((result.config or {}).get(name))) for name in searched})
        row.update({
            "best_valid_score": better(scores) if scores else float("nan"),
            "last_valid_score": scores[-1] if scores else float("nan"),
            "epochs": len(scores),
            "error": _error_line(result.error) if result.error is not None else "",
            "checkpoint_dir": metrics.get("checkpoint_dir", ""),
            "trial_dir": str(result.path),
        })
        rows.append(row)
    return rows


def _pick_best(rows, mode):
    candidates = [r for r in rows if r["status"] != "failed" and np.isfinite(r["best_valid_score"])]
    if not candidates:
        return None
    key = lambda r: r["best_valid_score"]  # noqa: E731
    return max(candidates, key=key) if mode == "max" else min(candidates, key=key)


def plot_valid_vs_params(rows, space, metric_name, path, best_id=None):
    """One panel per searched hyperparameter: each trial's best validation score against its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(space)
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    ok = [r for r in rows if r["status"] != "failed" and np.isfinite(r["best_valid_score"])]
    for ax, name in zip(axes.flat, names):
        kind = space[name][0]
        values = [r[name] for r in ok]
        scores = [r["best_valid_score"] for r in ok]
        numeric = kind not in _LIST_KINDS or all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in values)
        if numeric:
            xs = [float(v) for v in values]
            if kind in _LIST_KINDS:  # the choices themselves as ticks
                ax.set_xticks(sorted({float(v) for v in space[name][1]}))
        else:
            labels = sorted({str(v) for v in values})
            xs = [labels.index(str(v)) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=30, fontsize=8)
        ax.scatter(xs, scores, color="tab:blue")
        for r, x, s in zip(ok, xs, scores):
            if r["trial_id"] == best_id:
                ax.scatter([x], [s], marker="*", s=180, color="tab:red", label="best")
                ax.legend(fontsize=8)
        if kind in ("loguniform", "qloguniform"):
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(f"best valid {metric_name}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    failed = len(rows) - len(ok)
    fig.suptitle(f"{len(ok)} trials" + (f" ({failed} failed, not shown)" if failed else ""), fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def _evaluate_best(spec, base_prepared, test_data, best_params, checkpoint_dir):
    """Valid and test results of the best trial's checkpoint: the one look at the test set."""
    from recbole_genrec import quick_start

    checkpoints = sorted(Path(checkpoint_dir).glob("*.pth"), key=lambda p: p.stat().st_mtime)
    if not checkpoints:
        raise GenRecError(f"the best trial left no checkpoint in {checkpoint_dir}: is the output folder shared "
                          "with the Ray workers (a cluster needs --output on a shared filesystem)?")
    config = trial_config(spec, best_params)
    config["checkpoint_dir"] = str(checkpoint_dir)
    base_config, dataset, train_data, valid_data = base_prepared
    change, _ = data_changes(base_config, config)
    if change == "dataset":
        dataset, train_data, valid_data, test_data = quick_start.prepare_data(config)
    elif change == "loaders":
        train_data, valid_data, test_data = quick_start.data_preparation(config, dataset)
    _, trainer = quick_start.build_model_and_trainer(config, train_data)
    model_file = str(checkpoints[-1])
    valid_result = trainer.evaluate(valid_data, model_file=model_file, show_progress=False)
    test_result = trainer.evaluate(test_data, model_file=model_file, show_progress=False)
    return config, model_file, dict(valid_result), dict(test_result)


# ---- the search ------------------------------------------------------------------------------------
def _start_ray(ray_address, num_cpus):
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if ray_address:
        ray.init(address=ray_address, **{k: v for k, v in quiet.items() if k != "include_dashboard"})
    else:
        if num_cpus is None:
            num_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # Ray runs its workers at niceness 15; on a machine shared with other work that starves the
        # trials. Run them at the priority the user gave this command (unless RAY_worker_niceness is set).
        os.environ.setdefault("RAY_worker_niceness", str(os.nice(0)))
        ray.init(num_cpus=int(num_cpus), **quiet)
    return True


def _absolute_paths(config, cmd_args):
    """Paths a trial reads or writes, made absolute (trials run in their own working directory)."""
    args = parse_cmd_args(cmd_args)
    # config["data_path"] is <data_path>/<dataset>; the setting is its parent.
    args["data_path"] = str(Path(config["data_path"]).resolve().parent)
    for key in ("checkpoint_dir", "results_dir", "cache_dir"):
        if config[key] is not None:
            args[key] = str(Path(config[key]).resolve())
    args.setdefault("show_progress", "False")
    return [f"--{k}={v}" for k, v in args.items()]


def run_hyper(model, dataset, params_file, config_file_list=None, config_dict=None, cmd_args=None,
              num_samples=4, scheduler="asha", ray_address=None, cpus_per_trial=1, gpus_per_trial=0,
              output="hyper_results", num_cpus=None, grace_period=1, reduction_factor=2,
              max_concurrent_trials=None):
    """Search ``params_file`` for ``model`` on ``dataset`` with Ray Tune; returns the summary dict.

    ``config_file_list``/``config_dict``/``cmd_args`` fix RecBole settings as in
    :func:`~recbole_genrec.quick_start.run_recbole_genrec`. With ``ray_address`` the search joins that
    Ray cluster (``"auto"``: the one this machine belongs to); without it a local Ray is started with
    this machine's cores (``num_cpus`` to override). An already initialised Ray is used as it is.
    Writes ``best.json``, ``trials.csv`` and ``valid_vs_params.png`` under ``output``.
    """
    from recbole.utils import init_logger

    from recbole_genrec import quick_start

    started = time.perf_counter()
    if scheduler not in ("asha", "fifo"):
        raise GenRecError(f"--scheduler must be asha or fifo, got {scheduler!r}")
    num_samples, cpus_per_trial, gpus_per_trial = int(num_samples), float(cpus_per_trial), float(gpus_per_trial)
    if num_samples < 1 or cpus_per_trial <= 0 or gpus_per_trial < 0:
        raise GenRecError("--num_samples and --cpus_per_trial must be positive and --gpus_per_trial >= 0")
    space = read_search_space(params_file)
    cmd_args = list(cmd_args or [])
    given = parse_cmd_args(cmd_args)
    launch = {k: v for k, v in {**(config_dict or {}), **given}.items() if k in quick_start.LAUNCH_ARGS}
    if quick_start.launch_settings(dict(launch)) is not None or any(k in space for k in quick_start.LAUNCH_ARGS):
        raise GenRecError("a search runs every trial in one process (a trial may not start a process group): drop "
                          "--nproc/--world_size and give each trial more cores with --cpus_per_trial or GPUs with "
                          "--gpus_per_trial (docs/distributed.md)")
    clash = sorted((set(given) | set(config_dict or {})) & set(space))
    if clash:
        raise GenRecError(f"{clash} are both fixed and searched: drop them from the command line or from "
                          f"{Path(params_file).name}")
    # One form for the trials: everything fixed travels as command-line settings (the command line wins
    # over config_dict, as in Config).
    cmd_args += [f"--{k}={v!r}" if isinstance(v, str) else f"--{k}={v}"
                 for k, v in (config_dict or {}).items() if k not in given]
    config_files = [str(Path(p).resolve()) for p in config_file_list or []]
    output = Path(output).resolve()

    # Prepare the data once, in the driver.
    base_config = quick_start.load_config(model, dataset, config_files or None, None, cmd_args)
    init_logger(base_config)
    logger = logging.getLogger()
    cmd_args = _absolute_paths(base_config, cmd_args)
    base_config = quick_start.load_config(model, dataset, config_files or None, None, cmd_args)
    prep_start = time.perf_counter()
    dataset_obj, train_data, valid_data, test_data = quick_start.prepare_data(base_config)
    prep_seconds = time.perf_counter() - prep_start
    spec = {"model": model, "dataset": dataset, "layers": config_layers(base_config), "cmd_args": cmd_args,
            "cpus_per_trial": cpus_per_trial}
    shared = (base_config, dataset_obj, train_data, valid_data)

    import ray
    from ray import air, tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    own_ray = _start_ray(ray_address, num_cpus)
    try:
        mode = "max" if base_config["valid_metric_bigger"] else "min"
        evals = max(1, math.ceil(base_config["epochs"] / max(1, base_config["eval_step"])))
        if scheduler == "asha":
            sched = ASHAScheduler(time_attr="training_iteration", max_t=evals,
                                  grace_period=min(int(grace_period), evals), reduction_factor=float(reduction_factor))
        else:
            sched = FIFOScheduler()
        resources = {"cpu": cpus_per_trial, "gpu": gpus_per_trial}
        trainable = tune.with_resources(tune.with_parameters(_trial, spec=spec, shared=shared), resources)
        tuner = tune.Tuner(
            trainable,
            param_space=to_tune_space(space),
            tune_config=tune.TuneConfig(
                metric=METRIC, mode=mode, scheduler=sched, num_samples=num_samples,
                search_alg=BasicVariantGenerator(random_state=int(base_config["seed"])),
                max_concurrent_trials=max_concurrent_trials,
            ),
            run_config=air.RunConfig(
                name=f"{base_config['model']}-{base_config['dataset']}", storage_path=str(output / "ray_results"),
                failure_config=air.FailureConfig(max_failures=0), verbose=1,
            ),
        )
        logging.getLogger("tensorboardX").setLevel(logging.WARNING)  # one line per '@' metric name otherwise
        search_start = time.perf_counter()
        result_grid = tuner.fit()  # failed trials stay in the grid with their error; nothing is raised
        search_seconds = time.perf_counter() - search_start
    finally:
        if own_ray:
            ray.shutdown()

    rows = _trial_rows(result_grid, list(space), mode, evals)
    best = _pick_best(rows, mode)
    metric_name = base_config["valid_metric"]
    summary = {
        "model": base_config["model"], "dataset": base_config["dataset"], "valid_metric": metric_name,
        "mode": mode, "scheduler": scheduler, "num_trials": len(rows),
        "num_failed": sum(r["status"] == "failed" for r in rows),
        "search_space": {k: [kind, args] for k, (kind, args) in space.items()},
        "fixed_settings": parse_cmd_args(cmd_args), "config_files": config_files,
        "ray_address": ray_address or "local",
        "timings": {"data_prep_seconds": prep_seconds, "search_seconds": search_seconds},
        "trials_csv": str(output / "trials.csv"), "plot": str(output / "valid_vs_params.png"),
    }
    _write_table(rows, output / "trials.csv")
    plot_valid_vs_params(rows, space, metric_name, output / "valid_vs_params.png", best and best["trial_id"])
    if best is None:
        summary["best"] = None
        atomic_write_json(output / "best.json", summary)
        first = next((f"; first error: {r['error']}" for r in rows if r["error"]), "")
        raise GenRecError(f"no trial reported a validation score ({summary['num_failed']} of {len(rows)} failed"
                          f"{first}): see {output / 'trials.csv'}")
    best_params = {k: best[k] for k in space}
    config, model_file, valid_result, test_result = _evaluate_best(
        spec, shared, test_data, best_params, best["checkpoint_dir"])
    summary["best"] = {
        "trial_id": best["trial_id"], "params": best_params, "best_valid_score": best["best_valid_score"],
        "valid_result": valid_result, "test_result": test_result, "checkpoint": model_file,
        "epochs_trained": best["epochs"], "config": to_jsonable(config.final_config_dict),
    }
    summary["timings"]["total_seconds"] = time.perf_counter() - started
    atomic_write_json(output / "best.json", summary)
    summary["rows"] = rows
    summary["output"] = str(output)
    logger.info(f"best trial {best['trial_id']}: {best_params}; valid {valid_result}; test {test_result}")
    return summary


def _write_table(rows, path):
    import pandas as pd

    frame = pd.DataFrame(rows)
    atomic_write_bytes(path, frame.to_csv(index=False).encode("utf-8"))


def format_table(rows, searched):
    """The trials as a fixed-width text table (best score first), errors shortened."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    columns = ["trial_id", "status", *searched, "best_valid_score", "epochs", "error"]
    frame = frame[columns].sort_values("best_valid_score", ascending=False, na_position="last")
    frame["error"] = frame["error"].str.slice(0, 60)
    with pd.option_context("display.width", 250, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        return frame.to_string(index=False)


def main(argv=None):
    """``run_hyper.py`` CLI; exit 0 on success, 2 with a one-line error on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_cmd_args(argv)
        options = {k: args.pop(k) for k in _SEARCH_OPTIONS if k in args}
        model, dataset = args.pop("model", None), args.pop("dataset", None)
        if "params_file" not in options:
            raise GenRecError("no search space given: pass --params_file=FILE (examples in properties/hyper/)")
        numbers = {}
        for key, cast in (("num_samples", int), ("cpus_per_trial", float), ("gpus_per_trial", float),
                          ("num_cpus", int), ("grace_period", int), ("reduction_factor", float),
                          ("max_concurrent_trials", int)):
            if key in options:
                try:
                    numbers[key] = cast(options.pop(key))
                except ValueError:
                    raise GenRecError(f"--{key} must be a number") from None
        summary = run_hyper(model, dataset, options.pop("params_file"),
                            config_file_list=options.pop("config_files", "").split() or None,
                            cmd_args=[f"--{k}={v}" for k, v in args.items()], **options, **numbers)
    except GenRecError as err:
        logging.shutdown()
        print(f"error: {err}", file=sys.stderr)
        return 2
    best = summary["best"]
    print(format_table(summary["rows"], list(summary["search_space"])))
    print(f"best trial: {best['trial_id']} {best['params']}")
    print(f"best valid: {best['valid_result']}")
    print(f"test (best config only): {best['test_result']}")
    print(f"output: {summary['output']} (best.json, trials.csv, valid_vs_params.png)")
    return 0
