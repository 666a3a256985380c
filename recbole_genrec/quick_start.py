"""Entry points: one run path (config -> dataset -> dataloaders -> model -> trainer -> result JSON)
that serves stock RecBole models and plugin models alike.

``python run_recbole_genrec.py --model=NAME --dataset=NAME [--config_files="a.yaml b.yaml"] [--k=v ...]``
or ``from recbole_genrec.quick_start import run_recbole_genrec``.
"""
import logging
import os
import resource
import sys
import time
import uuid
import warnings
from contextlib import nullcontext
from logging import getLogger
from pathlib import Path

import torch
from recbole.data import data_preparation
from recbole.utils import init_logger, init_seed, set_color

from recbole_genrec import distributed
from recbole_genrec.config import Config, parse_cmd_args
from recbole_genrec.registry import get_trainer
from recbole_genrec.utils import GenRecError, atomic_write_json, phase_timings, set_show_progress, to_jsonable


# RecBole 1.2.1 raises FutureWarnings on every run (pandas 2.x chained inplace fillna in its dataset code,
# torch's deprecated GradScaler alias in its trainer); they change nothing here and drown the one-line
# errors users need to see.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"recbole\.")


def load_config(model=None, dataset=None, config_file_list=None, config_dict=None, cmd_args=None,
                check_unknown_keys=True):
    """Build the layered :class:`~recbole_genrec.config.Config` (see its docstring for the order)."""
    return Config(model=model, dataset=dataset, config_file_list=config_file_list,
                  config_dict=config_dict, cmd_args=cmd_args, check_unknown_keys=check_unknown_keys)


def check_dataset_files(config):
    """Every dataset file property the run depends on (folder, files, headers, required columns, float values)
    is a one-line error here, before RecBole reads anything: :func:`recbole_genrec.checks.check_dataset_files`."""
    from recbole_genrec.checks import check_dataset_files as check_files

    check_files(config)


def load_dataset(config):
    """Check the files, then RecBole's ``create_dataset`` plus the checks that need the loaded data
    (:func:`recbole_genrec.checks.create_dataset`: items vs topk, pre-split histories cut to
    ``MAX_ITEM_LIST_LENGTH``)."""
    from recbole_genrec.checks import create_dataset as checked_create_dataset

    check_dataset_files(config)
    init_seed(config["seed"], config["reproducibility"])
    return checked_create_dataset(config)


def prepare_data(config):
    """Filter and split the dataset once; returns ``(dataset, train, valid, test)`` dataloaders."""
    dataset = load_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    return dataset, train_data, valid_data, test_data


def build_model_and_trainer(config, train_data):
    """The model (seeded ``seed + rank``) and its trainer. In a multi-process run rank 0 builds first, writing
    the caches (item embeddings, semantic IDs, CF SASRec) the other ranks then read; the trainer then gives
    every rank rank 0's weights."""
    multi = not config["single_spec"]
    init_seed(config["seed"] + (distributed.rank() if multi else 0), config["reproducibility"])
    with distributed.rank_zero_first() if multi else nullcontext():
        model = config.model_class(config, train_data._dataset).to(config["device"])
    trainer = get_trainer(config.model_class, config)(config, model)
    return model, trainer


def shard_loaders(config, train_data, valid_data, test_data):
    """Multi-process runs: evaluation shards without RecBole's padding (no user counted twice), and the
    training shuffle follows the run's seed (:func:`recbole_genrec.distributed.unpad_eval_sampler`)."""
    if config["single_spec"]:
        return
    distributed.unpad_eval_sampler(train_data, seed=config["seed"])
    world = distributed.world_size()
    for name, loader in (("valid", valid_data), ("test", test_data)):
        sampler = getattr(loader, "sampler", None)
        rows = len(sampler.dataset) if isinstance(sampler, torch.utils.data.distributed.DistributedSampler) else world
        if rows < world:  # a rank without rows would skip the evaluation's collectives
            raise GenRecError(f"the {name} split has {rows} rows for {world} processes: use at most {rows} "
                              "processes (--nproc / --world_size)")
        distributed.unpad_eval_sampler(loader)


class _RankFilter(logging.Filter):
    """Prefixes every log line with ``[rank R/W]`` in a multi-process run."""

    def filter(self, record):
        if distributed.is_active() and not getattr(record, "_rank_tagged", False):
            record.msg = f"[rank {distributed.rank()}/{distributed.world_size()}] {record.msg}"
            record._rank_tagged = True
        return True


def tag_log_with_rank(logger):
    """On the handlers, so records of child loggers (which skip the root logger's own filters) are tagged too."""
    if distributed.is_active():
        for handler in logger.handlers:
            if not any(isinstance(f, _RankFilter) for f in handler.filters):
                handler.addFilter(_RankFilter())


def peak_memory():
    """Peak resident memory of this process (MiB) and peak CUDA memory (MiB, 0 on CPU)."""
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    cuda_mib = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    return {"peak_rss_mib": round(rss_mib, 1), "peak_cuda_mib": round(cuda_mib, 1)}


def default_result_path(config):
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{config['model']}-{config['dataset']}-seed{config['seed']}-{stamp}-{uuid.uuid4().hex[:6]}.json"
    return Path(config["results_dir"]) / name


def run_recbole_genrec(model=None, dataset=None, config_file_list=None, config_dict=None, saved=True,
                       cmd_args=None, result_file=None, prepared=None, epoch_callback=None, data_seconds=0.0):
    """Train, validate (early stopping) and test one model; write and return the result record.

    Args:
        cmd_args: ``['--k=v', ...]`` read as the command line (``None``: the command line is not read).
        result_file: where the JSON goes (default ``results_dir/<model>-<dataset>-seed<seed>-<time>.json``).
        prepared: ``(config, dataset, train, valid, test)`` already built (hyperparameter search and
            comparisons reuse it); ``data_seconds`` is then the time its preparation took.
        epoch_callback: ``f(epoch_idx, valid_result)`` after every validation (Ray Tune reports here).
    """
    phase_timings(reset=True)  # timings.phases: this run's setup phases (text embedding, tokenizer fit, ...)
    if prepared is None:
        config = load_config(model, dataset, config_file_list, config_dict, cmd_args)
        # RecBole's init_logger checks then creates ./log/<model>: ranks starting together race on it
        os.makedirs(os.path.join("log", str(config["model"])), exist_ok=True)
        init_logger(config)
        logger = getLogger()
        tag_log_with_rank(logger)
        logger.info(config)
        start = time.perf_counter()
        dataset_obj, train_data, valid_data, test_data = prepare_data(config)
        data_seconds = time.perf_counter() - start
        logger.info(dataset_obj)
    else:
        config, dataset_obj, train_data, valid_data, test_data = prepared
        logger = getLogger()
    shard_loaders(config, train_data, valid_data, test_data)
    set_show_progress(config["show_progress"])  # progress bars of the long setup phases, as RecBole's

    start = time.perf_counter()
    model_obj, trainer = build_model_and_trainer(config, train_data)
    resume = config["resume"] if "resume" in config else None
    if resume:  # --resume=CHECKPOINT: weights, optimizer, schedule, RNG, early stopping; the best file for the test
        trainer.resume_checkpoint(resume)
    setup_seconds = time.perf_counter() - start
    logger.info(model_obj)

    callback = None
    if epoch_callback is not None:
        callback = lambda epoch_idx, valid_score: epoch_callback(epoch_idx, trainer.last_valid_result)  # noqa: E731
    start = time.perf_counter()
    best_valid_score, best_valid_result = trainer.fit(
        train_data, valid_data, saved=saved, show_progress=config["show_progress"], callback_fn=callback
    )
    fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    test_result = trainer.evaluate(test_data, load_best_model=saved, show_progress=config["show_progress"])
    test_seconds = time.perf_counter() - start

    logger.info(set_color("best valid ", "yellow") + f": {best_valid_result}")
    logger.info(set_color("test result", "yellow") + f": {test_result}")
    record = {
        "model": config["model"],
        "dataset": config["dataset"],
        "seed": config["seed"],
        "best_valid_score": best_valid_score,
        "best_valid_result": dict(best_valid_result or {}),
        "test_result": dict(test_result or {}),
        "timings": {
            "data_prep_seconds": data_seconds,
            "model_setup_seconds": setup_seconds,
            "fit_seconds": fit_seconds,
            "epochs_trained": len(trainer.timings["train_epoch_seconds"]),
            "stopped_by_time_budget": trainer.timings.get("stopped_by_time_budget", False),
            "train_epoch_seconds": trainer.timings["train_epoch_seconds"],
            "valid_eval_seconds": trainer.timings["valid_epoch_seconds"],
            "test_eval_seconds": test_seconds,
            "learning_rate": trainer.timings.get("learning_rate", []),  # after each epoch (with lr_scheduler)
            "train_loss": trainer.timings.get("train_loss", []),  # per epoch (RecBole's summed batch losses)
            "valid_scores": trainer.timings.get("valid_scores", []),  # valid_metric at each validation
            "precision": getattr(trainer, "precision", "fp32"),
            "phases": phase_timings(),  # seconds per setup phase (utils.timed_phase; nested phases overlap)
            **peak_memory(),
        },
        "checkpoint": trainer.saved_model_file if saved else None,
        "resume_file": getattr(trainer, "resume_file", None) if saved else None,  # --resume=... continues the run
        "extras": to_jsonable(getattr(model_obj, "result_extras", dict)()),
        "distributed": {"world_size": distributed.world_size() if not config["single_spec"] else 1,
                        "backend": config["ddp_backend"] if not config["single_spec"] else None},
        "config": to_jsonable(config.final_config_dict),
    }
    if not config["single_spec"] and not distributed.is_main():  # rank 0 alone writes the result
        record["result_file"] = None
        return record
    path = Path(result_file) if result_file else default_result_path(config)
    atomic_write_json(path, record)
    record["result_file"] = str(path.resolve())
    logger.info(set_color("result file", "green") + f": {record['result_file']}")
    return record


# ---- several processes ---------------------------------------------------------------------------------------
LAUNCH_ARGS = ("nproc", "world_size", "ip", "port", "offset")


def launch_settings(args):
    """``--nproc`` / ``--world_size`` / ``--ip`` / ``--port`` / ``--offset`` from the command line (popped from
    ``args``), checked; ``None`` for a single process or a torchrun start (each torchrun process runs as one)."""
    raw = {k: args.pop(k) for k in LAUNCH_ARGS if k in args}
    if distributed.torchrun_env() is not None:
        if raw:
            raise GenRecError(f"{sorted(raw)} cannot be combined with torchrun: torchrun sets the ranks "
                              "(--nproc_per_node, --nnodes, --master_addr, --master_port)")
        return None

    def integer(key, default, minimum):
        value = raw.get(key, default)
        try:
            value = int(value)
        except (TypeError, ValueError):
            raise GenRecError(f"--{key} must be an integer >= {minimum}, got {raw.get(key)!r}") from None
        if value < minimum:
            raise GenRecError(f"--{key} must be an integer >= {minimum}, got {value}")
        return value

    nproc = integer("nproc", 1, 1)
    world = integer("world_size", -1, -1)
    world = nproc if world in (-1, 0) else world
    offset = integer("offset", 0, 0)
    if world == 1 and nproc == 1:
        return None
    if nproc > world:
        raise GenRecError(f"--nproc={nproc} is more than --world_size={world}: world_size counts every process "
                          "on every machine")
    if offset + nproc > world:
        raise GenRecError(f"--offset={offset} + --nproc={nproc} exceeds --world_size={world}: each machine's "
                          "offset is the number of processes on the machines before it")
    several_machines = world > nproc
    port = raw.get("port")
    if several_machines and (port is None or "ip" not in raw):
        raise GenRecError("several machines need the same --ip=<rank 0's address> and --port on each")
    if port is None:
        port = distributed.free_port()
    try:
        if not 0 < int(port) < 65536:
            raise ValueError
    except (TypeError, ValueError):
        raise GenRecError(f"--port must be a TCP port (1-65535), got {port!r}") from None
    return {"nproc": nproc, "world_size": world, "offset": offset, "ip": str(raw.get("ip", "localhost")),
            "port": str(port)}


def _rank_main(local_rank, launch, model, dataset, config_files, cmd_args, result_file, queue):
    """One spawned process of a ``--nproc`` run: ``run_recbole_genrec`` as rank ``offset + local_rank``."""
    try:
        record = run_recbole_genrec(model=model, dataset=dataset, config_file_list=config_files,
                                    config_dict={"local_rank": local_rank, **launch}, cmd_args=cmd_args,
                                    result_file=result_file)
    except GenRecError as err:
        queue.put(("error", local_rank, str(err)))
        raise SystemExit(2)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if record.get("result_file"):
        queue.put(("result", local_rank, {"test_result": record["test_result"],
                                          "result_file": record["result_file"]}))


def run_distributed(launch, model, dataset, config_files, cmd_args, result_file):
    """Spawn ``launch['nproc']`` processes of one run (ranks ``offset .. offset + nproc - 1``); returns rank 0's
    ``{'test_result', 'result_file'}`` (``None`` on a machine without rank 0). The settings are checked in
    this process first, so bad input ends before any process starts."""
    import torch.multiprocessing as mp

    check_dataset_files(load_config(model, dataset, config_files, cmd_args=cmd_args))  # one-line errors, exit 2
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    failure = None
    try:
        mp.spawn(_rank_main, args=(launch, model, dataset, config_files, cmd_args, result_file, queue),
                 nprocs=launch["nproc"], join=True)
    except mp.ProcessExitedException as err:  # exit code 2 after a one-line error (queued), or killed (OOM, ...)
        failure = (f"rank {launch['offset'] + err.error_index} ended with exit code {err.exit_code}"
                   + (f" (signal {err.signal_name})" if getattr(err, "signal_name", None) else ""))
    except Exception as err:  # a worker raised: its traceback is on stderr
        raise RuntimeError(f"a process of the {launch['nproc']}-process run failed: {err}") from None
    result = None
    while not queue.empty():
        kind, rank, payload = queue.get()
        if kind == "error":
            raise GenRecError(f"rank {launch['offset'] + rank}: {payload}")
        result = payload
    if failure is not None:
        raise RuntimeError(f"the {launch['nproc']}-process run failed: {failure}")
    if result is None and launch["offset"] == 0:
        raise RuntimeError("the multi-process run ended without rank 0's result")
    return result


USAGE = """usage: python run_recbole_genrec.py --model=NAME[,NAME...] --dataset=NAME [--recipe=cpu]
       [--config_files="a.yaml b.yaml"] [--result_file=PATH] [--resume=CHECKPOINT] [--key=value ...]
       [--nproc=N] [--world_size=W --ip=HOST --port=P --offset=K]    (or start it under torchrun)

Trains, validates (early stopping on valid_metric) and tests one model, or several one after another on one
prepared dataset (--model=A,B: a side-by-side table, JSON and PNG). Any RecBole or plugin setting goes as
--key=value. Models, settings and examples: README.md and docs/usage.md."""


def main(argv=None):
    """``run_recbole_genrec.py`` CLI; exit 0 on success, 2 with a one-line error on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return 0
    try:
        args = parse_cmd_args(argv)
        config_files = args.pop("config_files", "").split() or None
        result_file = args.pop("result_file", None)
        model, dataset = args.pop("model", None), args.pop("dataset", None)
        if model is not None and "," in model:  # compare.main runs comparisons (it imports this module)
            raise GenRecError(f"--model={model!r} names several models: compare them with "
                              "python run_recbole_genrec.py (recbole_genrec.compare.main)")
        launch = launch_settings(args)
        if launch is not None:
            try:
                result = run_distributed(launch, model, dataset, config_files,
                                         [f"--{k}={v}" for k, v in args.items()], result_file)
            except RuntimeError as err:  # a rank crashed or was killed: its traceback is on stderr above
                print(f"error: {err}", file=sys.stderr)
                return 1
            if result is None:
                print(f"ranks {launch['offset']}..{launch['offset'] + launch['nproc'] - 1} done (the machine of "
                      "rank 0 writes the result)")
            else:
                print(f"test result: {result['test_result']}")
                print(f"result file: {result['result_file']}")
            return 0
        record = run_recbole_genrec(model=model, dataset=dataset, config_file_list=config_files,
                                    cmd_args=[f"--{k}={v}" for k, v in args.items()], result_file=result_file)
    except GenRecError as err:
        logging.shutdown()
        print(f"error: {err}", file=sys.stderr)
        return 2
    if torch.distributed.is_initialized():  # a torchrun start
        rank = distributed.rank()
        torch.distributed.destroy_process_group()
        if record["result_file"] is None:
            print(f"rank {rank} done (rank 0 writes the result)")
            return 0
    print(f"test result: {record['test_result']}")
    print(f"result file: {record['result_file']}")
    return 0
