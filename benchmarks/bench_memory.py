"""Peak resident memory of TIGER training steps under each allocator setting, one fresh process per setting.

    OMP_NUM_THREADS=2 python benchmarks/bench_memory.py [--dataset=ml-100k] [--steps=6] [--batch_size=512]
        [--settings=reuse+thp,reuse,thp,plain] [--recipe=] [--key=value ...]

Settings: ``reuse`` = ``malloc_reuse: True`` (glibc keeps freed memory: no mmap for large blocks, trim above
``malloc_trim_threshold_mib``); ``thp`` = ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch puts tensors >= 2 MiB on
transparent huge pages); ``plain`` = neither. Each setting runs in its own interpreter (the allocator is
process-wide), builds TIGER, runs ``--steps`` training steps and prints the peak RSS (``ru_maxrss``), the RSS
after the steps, the page faults and the seconds per step. ``--key=value`` settings go to the model config
(e.g. ``--malloc_trim_threshold_mib=64``).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, {root!r})
import torch
from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data
cfg = json.loads({cfg!r})
steps = int(cfg.pop("_steps"))
config = load_config("TIGER", cfg.pop("_dataset"), config_dict=cfg)
_, train, _, _ = prepare_data(config)
model, trainer = build_model_and_trainer(config, train)
model.train()
loss_fn = trainer._autocast_loss(model.calculate_loss)
it = iter(train)
before = resource.getrusage(resource.RUSAGE_SELF)
t = time.perf_counter()
for _ in range(steps):
    batch = next(it)
    trainer.optimizer.zero_grad()
    loss_fn(batch).backward()
    trainer.optimizer.step()
sec = (time.perf_counter() - t) / steps
after = resource.getrusage(resource.RUSAGE_SELF)
rss_now = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
print("RESULT " + json.dumps({{"peak_rss_mib": after.ru_maxrss / 1024, "rss_after_mib": rss_now,
                              "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
                              "seconds_per_step": sec}}))
"""


def main():
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    settings = args.pop("settings", "reuse+thp,reuse,thp,plain").split(",")
    steps = int(args.pop("steps", 6))
    dataset = args.pop("dataset", "ml-100k")
    batch = int(args.pop("batch_size", 512))
    extra = {}
    for k, v in args.items():
        try:
            extra[k] = json.loads(v)
        except ValueError:
            extra[k] = v
    results = {}
    for setting in settings:
        parts = set(setting.split("+"))
        env = dict(os.environ, THP_MEM_ALLOC_ENABLE="1" if "thp" in parts else "0")
        cfg = {"show_progress": False, "state": "WARNING", "train_batch_size": batch, "malloc_reuse": "reuse" in parts,
               "_steps": steps, "_dataset": dataset, **extra}
        out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, cfg=json.dumps(cfg))], env=env,
                             capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"{setting}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        results[setting] = r
        print(f"{setting:<10} peak RSS {r['peak_rss_mib']:7.0f} MiB, after steps {r['rss_after_mib']:7.0f} MiB, "
              f"{r['page_faults_per_step']:9.0f} page faults/step, {r['seconds_per_step']:.2f} s/step", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
