"""TIGER training throughput vs the machine's matmul peak, with stock SASRec beside it.

    OMP_NUM_THREADS=2 python benchmarks/bench_tiger_training.py --dataset=ml-100k [--steps=20] [--device=cpu]
        [--attn=sdpa,eager] [--sasrec] [--loader] [--profile] [--malloc_reuse=0|1] [--batch_size=N] [--json=out.json]

For each configuration it times ``--steps`` optimizer steps on real training batches (RecBole's
dataloader, all-prefix augmentation), counts the FLOPs of one step with
``torch.utils.flop_counter.FlopCounterMode`` (forward + backward), and prints

* seconds/step, seconds/epoch (= seconds/step x batches per epoch), TFLOP per epoch;
* achieved FLOP/s and its share of the measured fp32 matmul peak (``torch.mm`` 2048^3, same threads);
* ``--sasrec``: the same for RecBole's SASRec (its yaml defaults + the shared protocol);
* ``--loader``: the time of one pass over RecBole's training dataloader alone (no model);
* ``THP_MEM_ALLOC_ENABLE=0 ... --malloc_reuse=0``: the allocator left as glibc and PyTorch set it (default:
  huge pages and ``malloc_reuse``, see ``recbole_genrec.utils.keep_freed_memory_for_reuse``); page faults and user/system CPU seconds per step are
  printed for every run, so two processes, one with each value, compare them;
* ``--profile``: the top ops by self CPU time.
"""
import argparse
import json
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def matmul_peak(device, n=2048, reps=10, dtype=torch.float32):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_model(model_name, dataset, steps, device, extra=None, amp=False, profile=False):
    from torch.utils.flop_counter import FlopCounterMode

    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data

    cfg = {"show_progress": False, "state": "WARNING", "device": device, **(extra or {})}
    config = load_config(model_name, dataset, config_dict=cfg)
    _, train, _, _ = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train)
    model.train()
    opt = trainer.optimizer
    it = iter(train)
    batches = [next(it).to(device) for _ in range(min(steps + 2, len(train)))]
    dev_type = torch.device(device).type

    def step(batch):
        opt.zero_grad()
        with torch.autocast(device_type=dev_type, dtype=torch.bfloat16, enabled=amp):
            loss = model.calculate_loss(batch)
        loss.backward()
        opt.step()

    step(batches[0])
    with FlopCounterMode(display=False) as counter:
        step(batches[1])
    flops_step = counter.get_total_flops()
    sync(device)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t = time.perf_counter()
    for b in batches[2:]:
        step(b)
    sync(device)
    timed = max(1, len(batches) - 2)
    sec_step = (time.perf_counter() - t) / timed
    after = resource.getrusage(resource.RUSAGE_SELF)
    kernel = {"page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / timed,
              "user_cpu_seconds_per_step": (after.ru_utime - usage.ru_utime) / timed,
              "system_cpu_seconds_per_step": (after.ru_stime - usage.ru_stime) / timed}
    n_batches = len(train)
    top_ops = None
    if profile:  # where a step's time goes: self time per aten op over two more steps
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches[-2:]:
                step(b)
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events)
        top_ops = [{"op": e.key, "self_share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
                   for e in events[:12]]
    return {
        "top_ops": top_ops, **kernel,
        "model": model_name, "config": extra or {}, "amp_bf16": amp, "train_examples": len(train.dataset),
        "batch_size": config["train_batch_size"], "batches_per_epoch": n_batches,
        "seconds_per_step": sec_step, "seconds_per_epoch_est": sec_step * n_batches,
        "flops_per_step": flops_step, "tflop_per_epoch": flops_step * n_batches / 1e12,
        "achieved_flops_per_s": flops_step / sec_step,
    }


def loader_pass(dataset, device):
    from recbole_genrec.quick_start import load_config, prepare_data

    config = load_config("SASRec", dataset, config_dict={"show_progress": False, "state": "WARNING",
                                                          "device": device})
    _, train, _, _ = prepare_data(config)
    t = time.perf_counter()
    n = 0
    for batch in train:
        n += len(batch)
    return {"loader_seconds_per_epoch": time.perf_counter() - t, "examples": n,
            "batch_size": config["train_batch_size"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--attn", default="sdpa,eager")
    p.add_argument("--amp", action="store_true", help="also time bf16 autocast (CUDA)")
    p.add_argument("--sasrec", action="store_true")
    p.add_argument("--loader", action="store_true")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", action="store_true", help="also print the top ops by self CPU time")
    p.add_argument("--malloc_reuse", type=int, default=1, choices=(0, 1),
                   help="0: glibc's and PyTorch's default allocation (run once with 0, once with 1 to compare)")
    p.add_argument("--batch_size", type=int, default=None, help="override train_batch_size")
    p.add_argument("--ids", default=None, help="semantic IDs exported by benchmarks/tiger_seeds.py (no text encoder)")
    args = p.parse_args()
    if args.ids:
        from benchmarks.tiger_seeds import use_exported_ids

        use_exported_ids(args.ids)
    if args.malloc_reuse:  # before the first large allocation (matmul_peak's)
        from recbole_genrec.utils import keep_freed_memory_for_reuse

        keep_freed_memory_for_reuse()
    peak = matmul_peak(args.device)
    out = {"device": args.device, "threads": torch.get_num_threads(), "matmul_peak_fp32_flops_per_s": peak,
           "runs": []}
    print(f"threads={out['threads']} fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    if torch.device(args.device).type == "cuda":
        out["matmul_peak_bf16_flops_per_s"] = matmul_peak(args.device, n=8192, dtype=torch.bfloat16)
    for attn in args.attn.split(","):
        for amp in ([False, True] if args.amp else [False]):
            reuse = bool(args.malloc_reuse)
            extra = {"attn_implementation": attn, "malloc_reuse": reuse}
            if args.batch_size:
                extra["train_batch_size"] = args.batch_size
            r = bench_model("TIGER", args.dataset, args.steps, args.device, extra, amp=amp, profile=args.profile)
            out["runs"].append(r)
            print(f"TIGER attn={attn} bf16={amp} malloc_reuse={reuse}: {r['seconds_per_step']:.3f} s/step "
                  f"(CPU s/step user {r['user_cpu_seconds_per_step']:.2f} + system "
                  f"{r['system_cpu_seconds_per_step']:.2f}, {r['page_faults_per_step']:.0f} page faults), "
                  f"~{r['seconds_per_epoch_est']:.0f} s/epoch ({r['batches_per_epoch']} batches of "
                  f"{r['batch_size']}), {r['tflop_per_epoch']:.1f} TFLOP/epoch, "
                  f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['achieved_flops_per_s'] / peak:.0f}% "
                  f"of fp32 matmul peak", flush=True)
            for op in r["top_ops"] or []:
                print(f"    {op['op']:<32} {100 * op['self_share']:5.1f}% of self CPU time ({op['calls']} calls)")
    if args.sasrec:
        r = bench_model("SASRec", args.dataset, args.steps, args.device)
        out["runs"].append(r)
        print(f"SASRec: {r['seconds_per_step']:.3f} s/step, ~{r['seconds_per_epoch_est']:.1f} s/epoch "
              f"({r['batches_per_epoch']} batches of {r['batch_size']}), "
              f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s", flush=True)
    if args.loader:
        out["loader"] = loader_pass(args.dataset, args.device)
        print(f"RecBole train dataloader alone: {out['loader']['loader_seconds_per_epoch']:.1f} s/epoch", flush=True)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
