"""TIGER training steps, fp32 vs bf16, faithful vs CPU-recipe sizes, timed interleaved in one process.

    OMP_NUM_THREADS=2 python benchmarks/bench_precision.py [--dataset=ml-100k] [--steps=4] [--rounds=3]
        [--variants=faithful-fp32,faithful-bf16,faithful-lean-bf16,recipe-fp32,recipe-bf16] [--batch_size=256]
        [--device=cpu] [--json=out.json]

Each variant is a real model and trainer built through the plugin's config (``precision`` key, the trainer's
autocast wrapper, AdamW, gradient clipping as configured); all variants see the same batches. Rounds go through
the variants in turn (``--rounds`` x ``--steps`` timed steps each, after one warm-up step), so a busy machine
slows every variant alike. Printed per variant: median seconds per step over rounds, examples per second and
the speed-up over ``faithful-fp32`` (the TIGER step as the faithful defaults train it in fp32).

Variants: ``faithful`` = ``properties/model/TIGER.yaml``; ``recipe`` = plus ``properties/recipe/cpu.yaml``;
``lean`` = ``attention_dropout: 0, ffn_dropout: 0`` (dropout on residuals and embeddings only; any attention
dropout sends ``sdpa`` to its unfused math path on CPU). The batch size is the same for all (``--batch_size``).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = {
    "faithful-fp32": {"precision": "fp32"},
    "faithful-bf16": {"precision": "bf16"},
    "faithful-lean-fp32": {"precision": "fp32", "attention_dropout": 0.0, "ffn_dropout": 0.0},
    "faithful-lean-bf16": {"precision": "bf16", "attention_dropout": 0.0, "ffn_dropout": 0.0},
    "recipe-fp32": {"recipe": "cpu", "precision": "fp32"},
    "recipe-bf16": {"recipe": "cpu", "precision": "bf16"},
}


def build(name, dataset, device, batch_size):
    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data

    cfg = {"show_progress": False, "state": "WARNING", "device": device, **VARIANTS[name]}
    config = load_config("TIGER", dataset, config_dict=cfg)
    config["train_batch_size"] = batch_size
    _, train, _, _ = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train)
    model.train()
    loss_fn = trainer._autocast_loss(model.calculate_loss)

    def step(batch):
        trainer.optimizer.zero_grad()
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        return loss

    return step, train


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dataset", default="ml-100k")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="faithful-fp32,faithful-bf16,faithful-lean-bf16,recipe-fp32,recipe-bf16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        sys.exit(f"error: unknown variants {unknown}: choose from {sorted(VARIANTS)}")
    from recbole_genrec.utils import keep_freed_memory_for_reuse

    keep_freed_memory_for_reuse()
    steps, batches = {}, None
    for name in names:
        steps[name], train = build(name, args.dataset, args.device, args.batch_size)
        if batches is None:
            it = iter(train)
            batches = [next(it).to(args.device) for _ in range(args.steps + 1)]
    for name in names:  # warm-up (allocator, oneDNN kernels)
        steps[name](batches[0])
    times = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for b in batches[1:]:
                steps[name](b)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t) / args.steps)
    out = {"threads": torch.get_num_threads(), "batch_size": args.batch_size, "variants": {}}
    base = statistics.median(times[names[0]])
    print(f"threads={out['threads']} batch={args.batch_size} steps={args.steps} rounds={args.rounds}")
    for name in names:
        sec = statistics.median(times[name])
        out["variants"][name] = {"seconds_per_step": sec, "examples_per_second": args.batch_size / sec,
                                 "speedup_vs_first": base / sec, "all_rounds": times[name]}
        print(f"{name:<20} {sec:7.3f} s/step  {args.batch_size / sec:8.0f} examples/s  "
              f"x{base / sec:.2f} vs {names[0]}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
