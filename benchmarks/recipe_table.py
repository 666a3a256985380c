"""Mean +- std table of result JSONs, one row per model (the figures in docs/results.md).

    python benchmarks/recipe_table.py results/recipe/*.json [--columns=hit@10,ndcg@10,tailhit@10]

Each file is one run (run_recbole_genrec.py --result_file=...). Files named ``<label>-s<seed>.json`` are pooled by
``<label>`` (``SODA-T-s2020.json`` and ``SODA-T-s2021.json`` make the row ``SODA-T``, ``SODA-T-woloss-s2020.json``
the row ``SODA-T-woloss``); other files by their model.
"""
import json
import os
import re
import sys
from collections import defaultdict

import numpy as np

DEFAULT_COLUMNS = "hit@5,ndcg@5,hit@10,ndcg@10,hit@20,ndcg@20,headhit@10,tailhit@10,coverage@10,entropy@10"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    columns = DEFAULT_COLUMNS.split(",")
    files = []
    for arg in argv:
        if arg.startswith("--columns="):
            columns = arg.split("=", 1)[1].split(",")
        else:
            files.append(arg)
    if not files:
        print(__doc__)
        return 2
    runs = defaultdict(list)
    for path in files:
        with open(path) as f:
            record = json.load(f)
        match = re.fullmatch(r"(.+)-s\d+\.json", os.path.basename(path))
        runs[match.group(1) if match else record["model"]].append(record)
    print("| model | seeds | " + " | ".join(columns) + " | epochs | fit min |")
    print("|---|---|" + "---:|" * (len(columns) + 2))
    for model, records in runs.items():
        cells = []
        for column in columns:
            values = [float(r["test_result"][column]) for r in records if column in r["test_result"]]
            if not values:
                cells.append("")
            elif len(values) == 1:
                cells.append(f"{values[0]:.4f}")
            else:
                cells.append(f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}")
        seeds = ",".join(str(r["seed"]) for r in records)
        epochs = "/".join(str(r["timings"]["epochs_trained"]) for r in records)
        minutes = "/".join(f"{r['timings']['fit_seconds'] / 60:.0f}" for r in records)
        print(f"| {model} | {seeds} | " + " | ".join(cells) + f" | {epochs} | {minutes} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
