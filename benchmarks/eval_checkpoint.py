"""Evaluate a checkpoint this package wrote on the test (or valid) split, with any metrics.

    python benchmarks/eval_checkpoint.py --checkpoint=saved/TIGER-....pth [--split=test]
        [--metrics="['Hit','NDCG','HeadHit','TailHit','Coverage','Entropy']"] [--json=out.json] [--key=value ...]

For adding metrics to a finished run (e.g. head/tail or coverage) without training again: the config is rebuilt
from the checkpoint (``recbole_genrec.beam_analysis.config_from_checkpoint``), the data prepared with the same
protocol and seed, the weights loaded (``weights_only``), and RecBole's evaluator run once.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    from recbole_genrec.beam_analysis import config_from_checkpoint
    from recbole_genrec.config import parse_override_args
    from recbole_genrec.quick_start import build_model_and_trainer, prepare_data
    from recbole_genrec.trainer import load_checkpoint
    from recbole_genrec.utils import GenRecError, atomic_write_json, to_jsonable

    args = parse_override_args(sys.argv[1:] if argv is None else argv)
    try:
        checkpoint = args.pop("checkpoint")
    except KeyError:
        sys.exit("error: pass --checkpoint=PATH")
    split = args.pop("split", "test")
    out = args.pop("json", None)
    args.setdefault("show_progress", False)
    try:
        stored = load_checkpoint(checkpoint)
        config = config_from_checkpoint(stored["config"], args)
        _, train, valid, test = prepare_data(config)
        _, trainer = build_model_and_trainer(config, train)
        trainer.eval_collector.data_collect(train)  # item counts for head/tail metrics (RecBole's fit does this)
        result = trainer.evaluate(test if split == "test" else valid, model_file=checkpoint)
    except GenRecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {k: float(v) for k, v in dict(result).items()}
    print(json.dumps(result, indent=2))
    if out:
        atomic_write_json(out, {"checkpoint": checkpoint, "split": split, "result": result,
                                "config": to_jsonable(config.final_config_dict)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
