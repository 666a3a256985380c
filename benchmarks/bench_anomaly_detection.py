"""Cost of the anomaly detection that importing RecBole's SINE switches on for the whole process.

python benchmarks/bench_anomaly_detection.py [--steps=5]

Times SASRec training steps (forward + backward + Adam, batch 2048, ml-100k) with
``torch.autograd.set_detect_anomaly`` on (RecBole's import-time state) and off (the plugin's default).
"""
import sys
import time
import warnings

import torch

from recbole_genrec.config import parse_cmd_args
from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data


def time_steps(model, optimizer, batches):
    start = time.perf_counter()
    for batch in batches:
        loss = model.calculate_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / len(batches)


def main():
    warnings.filterwarnings("ignore")
    steps = int(parse_cmd_args(sys.argv[1:]).get("steps", 5))
    config = load_config("SASRec", "ml-100k", config_dict={"show_progress": False, "state": "WARNING"})
    _, train_data, _, _ = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train_data)
    batches = [b for _, b in zip(range(steps), train_data)]
    time_steps(model, trainer.optimizer, batches[:1])  # warm-up
    for anomaly in (True, False):
        torch.autograd.set_detect_anomaly(anomaly)
        seconds = time_steps(model, trainer.optimizer, batches)
        print(f"detect_anomaly={anomaly!s:5}  {seconds:.3f} s per training step "
              f"(batch {config['train_batch_size']}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
