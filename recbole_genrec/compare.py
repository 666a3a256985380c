"""Several models, one after another, on one prepared dataset: a side-by-side table, JSON and bar chart.

``python run_recbole_genrec.py --model=TIGER,SASRec --dataset=ml-100k [--recipe=cpu] [--key=value ...]``
or :func:`run_comparison`. The dataset is filtered and split once (with the first model's config); each
model gets its own dataloaders (its own batch size) from it, unless its settings change how the data is
built (``recbole_genrec.hyper.DATA_KEYS``, or another ``MODEL_TYPE``), in which case its data is prepared
anew (the split is deterministic, leave-one-out in time order, so it is the same split). Each model also
writes its own result JSON, as a single run does.

Output (``results_dir/compare-<dataset>-seed<seed>-<time>.{json,png}`` unless ``--result_file`` is given):
the per-model test metrics, fit minutes, epochs and peak memory; the PNG shows Hit/NDCG@10 (and the
head/tail and coverage metrics when measured) side by side.
"""
import copy
import time
from logging import getLogger
from pathlib import Path

from recbole_genrec.utils import GenRecError, atomic_write_bytes, atomic_write_json

#: Metrics a comparison measures on top of the protocol's (head/tail Hit@K, coverage and entropy of the top-K).
COMPARISON_METRICS = ["Hit", "NDCG", "Recall", "MRR", "HeadHit", "TailHit", "HeadNDCG", "TailNDCG", "Coverage",
                      "Entropy"]
#: Columns of the printed table, in order (RecBole's lower-case metric keys).
TABLE_COLUMNS = ["hit@5", "hit@10", "hit@20", "ndcg@5", "ndcg@10", "ndcg@20", "headhit@10", "tailhit@10",
                 "coverage@10"]


def split_models(value):
    """``'TIGER,SASRec'`` -> ``['TIGER', 'SASRec']``; empty names and duplicates are one-line errors."""
    names = [m.strip() for m in str(value).split(",")]
    if any(not m for m in names):
        raise GenRecError(f"--model={value!r} has an empty name: write --model=A,B with no spaces or extra commas")
    if len(set(names)) != len(names):
        raise GenRecError(f"--model={value!r} names a model twice: list each model once")
    return names


def _dataset_signature(config):
    from recbole_genrec.hyper import DATA_KEYS

    return repr(sorted((k, repr(config[k])) for k in DATA_KEYS if k in config)) + str(config["MODEL_TYPE"])


def run_comparison(models, dataset, config_file_list=None, cmd_args=None, result_file=None, config_dict=None):
    """Train and test ``models`` (names) one after another on ``dataset``; returns the comparison record.

    Every model's config is built (and checked) before any training starts, so a typo in the third
    model's settings fails in seconds, not after the first model's hour.
    """
    from recbole.data import data_preparation
    from recbole.utils import init_logger

    from recbole_genrec import quick_start

    cmd_args = list(cmd_args or [])
    if any(a.startswith("--resume=") for a in cmd_args):
        raise GenRecError("--resume continues one run: resume each model on its own (--model=NAME --resume=FILE)")
    if not any(a.startswith("--metrics=") for a in cmd_args) and "metrics" not in (config_dict or {}):
        cmd_args.append(f"--metrics={COMPARISON_METRICS}")
    configs = [quick_start.load_config(m, dataset, config_file_list, config_dict, cmd_args, check_unknown_keys=False)
               for m in models]
    known = set().union(*(set(c.internal_config_dict) for c in configs))  # a key of any compared model is no typo
    for config in configs:
        config.check_unknown_keys(known)
    init_logger(configs[0])
    logger = getLogger()
    start_all = time.perf_counter()
    shared, rows = None, []
    for index, (name, config) in enumerate(zip(models, configs), 1):
        logger.info(f"comparison: model {index} of {len(models)}: {name}")
        start = time.perf_counter()
        signature = _dataset_signature(config)
        if shared is not None and shared[0] == signature:
            dataset_obj = copy.deepcopy(shared[1])  # RecBole's build() converts the dataset in place: copy it
        else:
            dataset_obj = quick_start.load_dataset(config)  # checks files, settings vs data; RecBole's create_dataset
            if shared is None:
                shared = (signature, copy.deepcopy(dataset_obj))
        from recbole_genrec.checks import check_dataset

        check_dataset(config, dataset_obj)  # this model's topk / codebooks vs the shared dataset's items
        quick_start.init_seed(config["seed"], config["reproducibility"])
        train_data, valid_data, test_data = data_preparation(config, dataset_obj)
        data_seconds = time.perf_counter() - start
        record = quick_start.run_recbole_genrec(
            prepared=(config, dataset_obj, train_data, valid_data, test_data),
            result_file=None, data_seconds=data_seconds)
        rows.append(_row(name, record))
    comparison = {
        "dataset": dataset,
        "seed": configs[0]["seed"],
        "models": rows,
        "total_minutes": (time.perf_counter() - start_all) / 60.0,
        "columns": TABLE_COLUMNS,
    }
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(result_file) if result_file else \
        Path(configs[0]["results_dir"]) / f"compare-{dataset}-seed{configs[0]['seed']}-{stamp}.json"
    comparison["plot_file"] = str(write_bar_chart(comparison, path.with_suffix(".png")))
    atomic_write_json(path, comparison)
    comparison["result_file"] = str(path.resolve())
    table = format_table(comparison)
    comparison["table"] = table
    return comparison


def _row(name, record):
    timings = record["timings"]
    return {
        "model": name,
        "test_result": record["test_result"],
        "best_valid_result": record["best_valid_result"],
        "fit_minutes": timings["fit_seconds"] / 60.0,
        "total_minutes": (timings["data_prep_seconds"] + timings["model_setup_seconds"] + timings["fit_seconds"]
                          + timings["test_eval_seconds"]) / 60.0,
        "epochs_trained": timings["epochs_trained"],
        "peak_rss_mib": timings["peak_rss_mib"],
        "result_file": record["result_file"],
    }


def format_table(comparison):
    """A markdown table: one row per model, the :data:`TABLE_COLUMNS` measured, then fit minutes."""
    cols = [c for c in comparison["columns"] if any(c in r["test_result"] for r in comparison["models"])]
    lines = ["| model | " + " | ".join(cols) + " | fit min | epochs |",
             "|---" * (len(cols) + 3) + "|"]
    for r in comparison["models"]:
        values = [f"{r['test_result'][c]:.4f}" if c in r["test_result"] else "-" for c in cols]
        lines.append(f"| {r['model']} | " + " | ".join(values) + f" | {r['fit_minutes']:.1f} | {r['epochs_trained']} |")
    return "\n".join(lines)


def write_bar_chart(comparison, path):
    """Grouped bars of the measured test metrics at K=10, one colour per model; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [c for c in ("hit@10", "ndcg@10", "headhit@10", "tailhit@10", "coverage@10")
               if all(c in r["test_result"] for r in comparison["models"])]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(metrics), 3.4))
    width = 0.8 / max(1, len(comparison["models"]))
    for i, r in enumerate(comparison["models"]):
        xs = [j + i * width for j in range(len(metrics))]
        ax.bar(xs, [r["test_result"][m] for m in metrics], width, label=r["model"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))], metrics)
    ax.set_ylabel("test value")
    ax.set_title(f"{comparison['dataset']}, seed {comparison['seed']}")
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path).resolve()


def main(argv=None):
    """``run_recbole_genrec.py`` CLI: ``--model=A,B`` compares models, one model is a plain run
    (:func:`recbole_genrec.quick_start.main`); exit 0 on success, 2 with a one-line error on bad input."""
    import logging
    import sys

    from recbole_genrec import distributed, quick_start
    from recbole_genrec.config import parse_cmd_args

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(quick_start.USAGE)
        return 0
    try:
        args = parse_cmd_args(argv)
        model = args.get("model")
        if model is None or "," not in model:
            return quick_start.main(argv)
        if quick_start.launch_settings(dict(args)) is not None or distributed.torchrun_env() is not None:
            raise GenRecError("--nproc, --world_size and torchrun run one model at a time: start one "
                              "multi-process run per model")
        config_files = args.pop("config_files", "").split() or None
        result_file = args.pop("result_file", None)
        args.pop("model")
        dataset = args.pop("dataset", None)
        comparison = run_comparison(split_models(model), dataset, config_file_list=config_files,
                                    cmd_args=[f"--{k}={v}" for k, v in args.items()], result_file=result_file)
    except GenRecError as err:
        logging.shutdown()
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(comparison["table"])
    print(f"comparison file: {comparison['result_file']}")
    print(f"bar chart: {comparison['plot_file']}")
    return 0
