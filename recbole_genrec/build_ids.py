"""``python -m recbole_genrec.build_ids --dataset=NAME [--tokenizer=rqvae|letter|rqkmeans|pq] [--k=v ...]``

Builds (or loads from the cache) the semantic IDs of a dataset's items, prints the quality report and
exits 0; exits 1 if two items share an ID, 2 with a one-line ``error: ...`` on bad input. ``--model``
only selects which model's config layers apply (default SASRec).
"""
import logging
import sys

from recbole_genrec.config import parse_cmd_args
from recbole_genrec.utils import GenRecError, set_show_progress, to_jsonable


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_cmd_args(argv)
        config_files = args.pop("config_files", "").split() or None
        report_file = args.pop("report_file", None)
        model = args.pop("model", "SASRec")
        dataset = args.pop("dataset", None)
        if dataset is None:
            raise GenRecError("no dataset given: pass --dataset=NAME (e.g. --dataset=ml-100k)")
        from recbole.data import create_dataset
        from recbole.utils import init_logger, init_seed

        from recbole_genrec.data.semantic_ids import build_semantic_ids, format_report, tokenizer_settings
        from recbole_genrec.quick_start import check_dataset_files, load_config
        from recbole_genrec.tokenizer.collision import collision_stats
        from recbole_genrec.utils import atomic_write_json

        config = load_config(model=model, dataset=dataset, config_file_list=config_files,
                             cmd_args=[f"--{k}={v}" for k, v in args.items()])
        tokenizer_settings(config)  # bad tokenizer settings fail before the dataset is read
        init_logger(config)
        set_show_progress(config["show_progress"])
        logging.getLogger().setLevel(logging.WARNING)  # keep the report, not RecBole's dataset dump
        check_dataset_files(config)
        init_seed(config["seed"], config["reproducibility"])
        dataset_obj = create_dataset(config)
        sids = build_semantic_ids(config, dataset_obj)
    except GenRecError as err:
        logging.shutdown()
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(sids.report))
    print(f"built in {sids.report['seconds']:.2f} s ({'cache' if sids.report['from_cache'] else 'fresh'}); "
          f"codes: {sids.report['cache_file']}")
    if report_file:
        atomic_write_json(report_file, to_jsonable(sids.report))
    stats = collision_stats(sids.codes[1:])
    if stats["unique_codes"] != sids.codes.shape[0] - 1:
        print(f"error: {stats['colliding_items']} items share a semantic ID", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
