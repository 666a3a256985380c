"""Code run inside the processes that tests/test_distributed.py spawns (2 ranks, gloo, CPU): importable by
module path, so that torch.multiprocessing's spawn can start it."""
import json
import os

import torch


class OneBatch:
    """A loader of one batch (RecBole's training loop reads ``shuffle`` and iterates)."""

    shuffle = False

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        return iter([self.batch])

    def __len__(self):
        return 1


def first_step_state(model_name, config_dict):
    """Weights after one optimizer step on the first global batch (``shuffle=False``): in a multi-process run
    rank r's first batch holds rows r, r + W, ... of it."""
    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data, shard_loaders

    config = load_config(model_name, config_dict["dataset"], config_dict={k: v for k, v in config_dict.items()
                                                                           if k != "dataset"})
    _, train, valid, test = prepare_data(config)
    shard_loaders(config, train, valid, test)
    model, trainer = build_model_and_trainer(config, train)
    batch = next(iter(train))
    trainer._train_epoch(OneBatch(batch), 0)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, len(batch)


def averaged_toy_gradients(rank):
    from recbole_genrec.distributed import average_gradients

    params = {name: torch.nn.Parameter(torch.zeros(2)) for name in ("untouched", "rank0_only", "both")}
    if rank == 0:
        params["rank0_only"].grad = torch.full((2,), 2.0)
    params["both"].grad = torch.full((2,), 1.0 + 2.0 * rank)
    average_gradients(list(params.values()))
    return {name: (p.grad.tolist() if p.grad is not None else None) for name, p in params.items()}


def rank_main(local_rank, launch, jobs, step_job, out_dir):
    from recbole_genrec.quick_start import run_recbole_genrec

    records = {}
    for name, model, config_dict in jobs:
        record = run_recbole_genrec(model=model, dataset=config_dict["dataset"],
                                    config_dict={**{k: v for k, v in config_dict.items() if k != "dataset"},
                                                 "local_rank": local_rank, **launch},
                                    result_file=os.path.join(out_dir, f"{name}.json"))
        records[name] = {"test_result": {k: float(v) for k, v in record["test_result"].items()},
                         "checkpoint": record["checkpoint"], "result_file": record["result_file"]}
    records["_grads"] = averaged_toy_gradients(local_rank)
    if step_job is not None:
        state, rows = first_step_state(step_job[0], {**step_job[1], "local_rank": local_rank, **launch})
        if local_rank == 0:
            torch.save(state, os.path.join(out_dir, "step_state.pt"))
        records["_step_rows"] = rows
    with open(os.path.join(out_dir, f"rank{local_rank}.json"), "w") as f:
        json.dump(records, f)
    torch.distributed.destroy_process_group()
