"""Beam-size analysis of one trained generative-retrieval checkpoint (SimGR paper, Table 1).

    python -m recbole_genrec.beam_analysis --checkpoint=saved/TIGER-....pth [--beam_sizes=5,10,20,50]
        [--split=test] [--device=cpu] [--json=beam_analysis.json] [--key=value ...]

Rebuilds the run's config from the checkpoint (a plain dict; the semantic IDs come back from the
cache), re-creates the same split, and for each beam size reports NDCG@10 and Hit@10 (leave-one-out:
one target per user), the overlap of each user's top-5 with the top-5 of the largest beam, and the
evaluation time (beam search + score tensor + ranking, all users of the split). Extra ``--key=value``
settings override the stored config (e.g. ``--beam_batch_size=128``).
"""
import argparse
import os
import sys
import time

import torch

from recbole_genrec.distributed import LAUNCH_KEYS
from recbole_genrec.utils import GenRecError

# Keys RecBole derives itself; passing them back in would fight its own logic.
_DERIVED = {"model", "dataset", "device", "MODEL_TYPE", "MODEL_INPUT_TYPE", "eval_type", "single_spec",
            "local_rank", "is_parallel", "gpu_id", "train_neg_sample_args", "valid_neg_sample_args",
            "test_neg_sample_args", "eval_neg_sample_args", "data_path", "checkpoint_dir",
            *LAUNCH_KEYS}  # how a multi-process run was started: a checkpoint is evaluated in one process


def config_from_checkpoint(stored, overrides=None):
    """A :class:`~recbole_genrec.config.Config` equal in effect to the one the checkpoint was trained with."""
    from recbole_genrec.quick_start import load_config

    data_path = stored.get("data_path")
    if data_path and os.path.basename(os.path.normpath(data_path)) == str(stored["dataset"]):
        data_path = os.path.dirname(os.path.normpath(data_path))  # RecBole appends the dataset name itself
    base = load_config(stored["model"], stored["dataset"], config_dict={"data_path": data_path})
    keep = {}
    for key, value in stored.items():
        if key in _DERIVED:
            continue
        if key not in base.final_config_dict:  # a user setting without a default (text_fields on own data): keep it
            keep[key] = value
            continue
        default = base.final_config_dict[key]
        if value == default or isinstance(default, torch.device):
            continue
        if value is not None and default is not None and type(default) is not type(value) and not (
                isinstance(default, float) and isinstance(value, int)):
            continue  # stored as text (enums, tuples) and equal in effect; RecBole re-derives them
        keep[key] = value
    keep["data_path"] = data_path
    keep.update(overrides or {})
    return load_config(stored["model"], stored["dataset"], config_dict=keep)


@torch.no_grad()
def rank_all(model, data, device):
    """Top-10 items and the target of every user of an eval dataloader; returns (top10, target, seconds)."""
    tops, targets = [], []
    start = time.perf_counter()
    for interaction, _history, _pos_u, pos_i in data:
        interaction = interaction.to(device)
        scores = model.full_sort_predict(interaction).view(len(interaction), -1)
        scores[:, 0] = float("-inf")
        tops.append(torch.topk(scores, 10, dim=1).indices.cpu())
        targets.append(pos_i.cpu())
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(tops), torch.cat(targets), time.perf_counter() - start


def analyse(checkpoint, beam_sizes, split="test", device=None, overrides=None):
    from recbole.utils import init_logger

    from recbole_genrec.quick_start import build_model_and_trainer, prepare_data
    from recbole_genrec.trainer import load_checkpoint

    state = load_checkpoint(checkpoint)
    overrides = dict(overrides or {})
    if device:
        overrides["device"] = device
    overrides.setdefault("state", "WARNING")
    overrides.setdefault("show_progress", False)
    config = config_from_checkpoint(state["config"], overrides)
    init_logger(config)
    beam_sizes = sorted(set(int(b) for b in beam_sizes))
    max_k = max(config["topk"])
    if beam_sizes[0] < 10:
        raise GenRecError(f"beam sizes must be >= 10 (NDCG@10 is reported), got {beam_sizes}")
    config["beam_size"] = max(beam_sizes[-1], max_k)
    _, train, valid, test = prepare_data(config)
    model, _ = build_model_and_trainer(config, train)
    model.load_state_dict(state["state_dict"])
    model.eval()
    data = test if split == "test" else valid
    rows, reference = [], None
    for beam in reversed(beam_sizes):  # largest first: it is the overlap reference
        model.beam_size = beam
        top, target, seconds = rank_all(model, data, config["device"])
        hit_rank = (top == target[:, None]).float()
        ndcg = (hit_rank / torch.log2(torch.arange(2, 12).float())).sum(1).mean().item()
        hit = hit_rank.sum(1).mean().item()
        if reference is None:
            reference = top[:, :5]
        overlap = torch.tensor([len(set(a.tolist()) & set(b.tolist())) / 5.0
                                for a, b in zip(top[:, :5], reference)]).mean().item()
        rows.append({"beam_size": beam, "ndcg@10": ndcg, "hit@10": hit, "top5_overlap_with_largest": overlap,
                     "eval_seconds": seconds, "users": int(top.shape[0])})
    rows.reverse()
    return {"checkpoint": str(checkpoint), "split": split, "model": config["model"], "dataset": config["dataset"],
            "device": str(config["device"]), "largest_beam": beam_sizes[-1], "rows": rows}


def format_table(result):
    lines = [f"{result['model']} on {result['dataset']} ({result['split']}, {result['rows'][0]['users']} users, "
             f"{result['device']}); overlap = top-5 shared with beam {result['largest_beam']}",
             f"{'beam':>6} {'NDCG@10':>9} {'Hit@10':>8} {'top5 overlap':>13} {'eval s':>8}"]
    for r in result["rows"]:
        lines.append(f"{r['beam_size']:>6} {r['ndcg@10']:>9.4f} {r['hit@10']:>8.4f} "
                     f"{r['top5_overlap_with_largest']:>13.3f} {r['eval_seconds']:>8.2f}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m recbole_genrec.beam_analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--beam_sizes", default="10,20,50")
    parser.add_argument("--split", choices=["test", "valid"], default="test")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args(argv)
    try:
        from recbole_genrec.config import parse_override_args

        overrides = parse_override_args(rest)
        result = analyse(args.checkpoint, [b for b in args.beam_sizes.split(",") if b.strip()], args.split,
                         args.device, overrides)
    except GenRecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        from recbole_genrec.utils import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
