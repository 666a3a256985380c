"""Multi-seed runs of the TIGER family (TIGER, TokenWeightedTIGER, LETTER, ETEGRec: every model that gets
its semantic IDs through ``recbole_genrec.model.tiger.load_semantic_ids``), with the IDs exported once.

    # here (has the text encoder): build and export the semantic IDs (codes + item embeddings) of each seed;
    # --model picks the model yaml, hence the tokenizer (LETTER: tokenizer=letter)
    python benchmarks/tiger_seeds.py export [--model=TIGER] --dataset=ml-100k --seeds=2020,2021,2022 --out=shared_ids
    # anywhere (e.g. the GPU machine): train each seed through run_recbole_genrec, in parallel processes
    python benchmarks/tiger_seeds.py run [--model=TIGER[,LETTER,...]] --dataset=ml-100k --seeds=2020,2021,2022 \
        --ids=shared_ids --results=results/seeds [--parallel=N] [--config_dir=DIR] [--key=value ...]
    python benchmarks/tiger_seeds.py summary results/seeds/*.json
    python benchmarks/tiger_seeds.py table --model=TIGER,LETTER --results=results/seeds [--columns=hit@10,ndcg@10]

``run`` queues every (model, seed) pair and keeps ``--parallel`` of them running (default: one per seed);
``--config_dir`` adds ``DIR/common.yaml`` and ``DIR/<model>.yaml`` (where they exist) as ``--config_files``
(``benchmarks/cpu_budget``: the equal short CPU budget of docs/results.md). Each run is exactly
``python run_recbole_genrec.py --model=M --dataset=... --seed=S``, except that the semantic IDs are read from
the exported file of seed ``S`` (the same codes ``build_semantic_ids`` made for that seed and tokenizer)
instead of being rebuilt from item text.
"""
import json
import os
import subprocess
import sys
import time
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ids_stem(config):
    """Exported-IDs file stem: ``<dataset>-seed<S>`` (rqvae) or ``<dataset>-<tokenizer>-seed<S>``."""
    tok = str(config["tokenizer"] or "rqvae").lower()
    return f"{config['dataset']}-seed{config['seed']}" if tok == "rqvae" else \
        f"{config['dataset']}-{tok}-seed{config['seed']}"


def export(dataset, seeds, out, model="TIGER", extra=None):
    from safetensors.torch import save_file

    from recbole_genrec.data.semantic_ids import build_semantic_ids
    from recbole_genrec.quick_start import load_config, prepare_data

    os.makedirs(out, exist_ok=True)
    for seed in seeds:
        config = load_config(model, dataset, config_dict={"seed": seed, "state": "WARNING", "device": "cpu"},
                             cmd_args=list(extra or []))
        ds, *_ = prepare_data(config)
        sids = build_semantic_ids(config, ds)
        base = os.path.join(out, _ids_stem(config))
        tensors = {"codes": sids.codes.contiguous()}
        if sids.embeddings is not None:  # TokenWeightedTIGER's Front-Greater weights need them
            tensors["embeddings"] = torch.as_tensor(sids.embeddings).float().contiguous()
        save_file(tensors, base + ".safetensors")
        with open(base + ".json", "w") as f:
            json.dump({"codebook_sizes": list(sids.codebook_sizes), "report": _plain(sids.report)}, f)
        print(f"exported {base} codes {list(sids.codes.shape)}", flush=True)


def _plain(obj):
    from recbole_genrec.utils import to_jsonable

    return to_jsonable(obj)


def exported_loader(ids_dir):
    from safetensors.torch import load_file

    from recbole_genrec.tokenizer.trie import PrefixTrie

    def load(config, dataset):
        base = os.path.join(ids_dir, _ids_stem(config))
        tensors = load_file(base + ".safetensors")
        codes = tensors["codes"]
        meta = json.load(open(base + ".json"))
        sizes = meta["codebook_sizes"]
        trie = PrefixTrie.from_codes(codes[1:], torch.arange(1, codes.shape[0]), sizes)
        return types.SimpleNamespace(codes=codes, codebook_sizes=sizes, num_layers=codes.shape[1],
                                     embeddings=tensors.get("embeddings"), report=dict(meta["report"], exported_from=base), trie=trie)

    return load


def use_exported_ids(ids_dir):
    """Make TIGER read the semantic IDs exported to ``ids_dir`` (hosts without the text encoder)."""
    from recbole_genrec.model import tiger

    tiger.load_semantic_ids = exported_loader(ids_dir)


def run_one(model, dataset, seed, ids_dir, result_file, extra):
    from recbole_genrec.quick_start import main

    use_exported_ids(ids_dir)
    return main([f"--model={model}", f"--dataset={dataset}", f"--seed={seed}", f"--result_file={result_file}",
                 *extra])


def _result_file(results, model, dataset, seed):
    """Where ``run`` writes (and ``table`` reads) one run's result JSON."""
    return f"{results}/{model}-{dataset}-seed{seed}.json"


def _mean_std(values):
    """Mean and sample standard deviation (0.0 for one value)."""
    vals = torch.tensor(values, dtype=torch.float64)
    return vals.mean().item(), vals.std().item() if len(vals) > 1 else 0.0


def _config_files(config_dir, model):
    """``config_dir/common.yaml`` and ``config_dir/<model>.yaml``, those that exist, space-separated."""
    if not config_dir:
        return ""
    names = [os.path.join(config_dir, n) for n in ("common.yaml", f"{model}.yaml")]
    return " ".join(n for n in names if os.path.exists(n))


def summary(files):
    rows = [json.load(open(f)) for f in files]
    keys = sorted({k for r in rows for k in r["test_result"]})
    out = {"seeds": [r["seed"] for r in rows], "epochs": [r["timings"]["epochs_trained"] for r in rows],
           "fit_seconds": [round(r["timings"]["fit_seconds"], 1) for r in rows],
           "stopped_by_time_budget": [r["timings"].get("stopped_by_time_budget") for r in rows]}
    for k in keys:
        vals = [float(r["test_result"][k]) for r in rows if k in r["test_result"]]
        if vals:
            mean, std = _mean_std(vals)
            out[k] = {"mean": round(mean, 4), "std": round(std, 4), "values": [round(v, 4) for v in vals]}
    print(json.dumps(out))
    return out


def table(results, models, dataset, seeds, columns):
    """Markdown table, one row per model: mean +- std over the seeds' result JSONs of each column."""
    print("| model | seeds | epochs | fit s | " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(columns))
    for m in models:
        files = [_result_file(results, m, dataset, s) for s in seeds]
        rows = [json.load(open(f)) for f in files if os.path.exists(f)]
        if not rows:
            continue
        missing = [c for c in columns if any(c not in r["test_result"] for r in rows)]
        if missing:
            raise SystemExit(f"--columns: {missing} not in every {m} result; they hold {sorted(rows[0]['test_result'])}")
        cells = ["{:.4f} +- {:.4f}".format(*_mean_std([float(r["test_result"][c]) for r in rows])) for c in columns]
        epochs = "/".join(str(r["timings"]["epochs_trained"]) for r in rows)
        fit = round(sum(r["timings"]["fit_seconds"] for r in rows) / len(rows))
        print(f"| {m} | {len(rows)} | {epochs} | {fit} | " + " | ".join(cells) + " |")


def main():
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "summary":
        summary(args)
        return 0
    opts = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    dataset = opts.pop("dataset", "ml-100k")
    model = opts.pop("model", "TIGER")
    seeds = [int(s) for s in opts.pop("seeds", "2020,2021,2022").split(",")]
    if mode == "export":
        out = opts.pop("out", "shared_ids")
        export(dataset, seeds, out, model, [f"--{k}={v}" for k, v in opts.items()])
        return 0
    if mode == "table":
        columns = opts.pop("columns", "hit@5,ndcg@5,hit@10,ndcg@10").split(",")
        table(opts.pop("results", "results/seeds"), model.split(","), dataset, seeds, columns)
        return 0
    if mode == "run_one":
        seed = int(opts.pop("seed"))
        ids_dir, result = opts.pop("ids"), opts.pop("result_file")
        return run_one(model, dataset, seed, ids_dir, result, [f"--{k}={v}" for k, v in opts.items()])
    if mode == "run":
        ids_dir, results = opts.pop("ids", "shared_ids"), opts.pop("results", "results/seeds")
        logs = opts.pop("logs", results)
        config_dir = opts.pop("config_dir", None)
        parallel = opts.pop("parallel", "0")
        if not parallel.isdigit():
            raise SystemExit(f"--parallel must be a whole number of runs at a time, got {parallel!r}")
        parallel = int(parallel) or len(seeds)
        if config_dir and not os.path.isdir(config_dir):
            raise SystemExit(f"--config_dir={config_dir} is not a directory: point it at e.g. benchmarks/cpu_budget")
        os.makedirs(results, exist_ok=True)
        os.makedirs(logs, exist_ok=True)
        jobs = [(m, s) for m in model.split(",") for s in seeds]
        running, codes = [], []
        for m, seed in jobs:  # a queue of (model, seed) runs, at most `parallel` at a time
            while len(running) >= parallel:  # wait for whichever run ends first
                done = [p for p in running if p.poll() is not None]
                for p in done:
                    running.remove(p)
                    codes.append(p.returncode)
                if not done:
                    time.sleep(5)
            files = _config_files(config_dir, m)
            cmd = [sys.executable, __file__, "run_one", f"--model={m}", f"--dataset={dataset}", f"--seed={seed}",
                   f"--ids={ids_dir}", f"--result_file={_result_file(results, m, dataset, seed)}",
                   *([f"--config_files={files}"] if files else []), *[f"--{k}={v}" for k, v in opts.items()]]
            log = open(f"{logs}/{m}-{dataset}-seed{seed}.log", "w")
            running.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
        codes += [p.wait() for p in running]
        for m in model.split(","):
            files = [_result_file(results, m, dataset, s) for s in seeds]
            print(m, flush=True)
            summary([f for f in files if os.path.exists(f)])
        return max(codes)
    raise SystemExit(f"unknown mode {mode!r}: export | run | run_one | summary | table")


if __name__ == "__main__":
    sys.exit(main())
