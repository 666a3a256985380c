"""Ask a trained model what it recommends: top-K items for users of the dataset or for a given history.

    python -m recbole_genrec.recommend --checkpoint=saved/TIGER-....pth --user=42 [--user=7 ...] [--topk=10]
    python -m recbole_genrec.recommend --checkpoint=saved/SASRec-....pth --history="50 172 133" [--topk=10]
        [--split=test|valid] [--device=cpu] [--json=out.json] [--key=value ...]

or from Python: ``recommend(checkpoint, users=["42"], topk=10)`` -> one dict per user (or for the history).

Works for every plugin model and for stock RecBole sequential and general models, from checkpoints that
``recbole_genrec`` wrote (read with ``weights_only=True``; RecBole's own pickled checkpoints are refused).
The run's config comes back from the checkpoint (as :mod:`recbole_genrec.beam_analysis` does), the dataset
is filtered as in training, the model is rebuilt (semantic IDs come back from the cache) and loaded.

* ``--user=TOKEN``: the user's history is every interaction the dataset holds for them, in time order
  (the last ``MAX_ITEM_LIST_LENGTH`` are the model's input), so the ranking is "what comes next".
  ``--split=test`` (``valid``) instead uses the history that split's evaluation used: the top-K then
  equals the evaluation's ranking for that user.
* ``--history="item tokens"``: rank after that history, oldest first (sequential models; no user token).

Items are shown by token, with the title when the dataset's item file has a ``*title*`` field. Generative
models (semantic IDs) also show each item's score (TIGER family: the beam's sequence log-probability,
``-`` for an item outside the beam; SimGR: the softmax logit) and its semantic ID. As in the evaluation,
already seen items are not removed for sequential models (repeats are legitimate next items); for general
models (BPR, ...) the user's known items are removed, as RecBole's evaluation does with training items.
An unknown user or item token is a one-line error (exit status 2).
"""
import argparse
import sys

import torch

from recbole_genrec.utils import GenRecError

SHOWN_HISTORY = 10  # last items printed per user


def _item_codes(model):
    """``[n_items, L]`` semantic IDs of a generative model (None for other models)."""
    layout = getattr(model, "layout", None)
    if layout is not None and getattr(layout, "codes", None) is not None:
        return layout.codes.detach().cpu()
    codes = getattr(model, "item_codes", None)
    return codes.detach().cpu() if isinstance(codes, torch.Tensor) else None


def _title_field(dataset):
    if dataset.item_feat is None:
        return None
    names = [f for f in dataset.item_feat.columns if f != dataset.iid_field and "title" in f.lower()]
    return sorted(names, key=lambda f: (f.lower() != "title", f))[0] if names else None


class _Catalogue:
    """Item id -> token and title."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.iid_field = dataset.iid_field
        self.title_field = _title_field(dataset)

    def token(self, iid):
        return str(self.dataset.id2token(self.iid_field, int(iid)))

    def title(self, iid):
        if self.title_field is None:
            return None
        value = self.dataset.item_feat[self.title_field][int(iid)]
        if not self.dataset.field2type[self.title_field].value.endswith("seq"):
            return str(self.dataset.id2token(self.title_field, int(value))) if value.numel() == 1 else None
        ids = [int(v) for v in value.view(-1).tolist() if int(v) != 0]
        if self.dataset.field2type[self.title_field].name == "TOKEN_SEQ":
            return " ".join(str(t) for t in self.dataset.id2token(self.title_field, ids)) if ids else ""
        return None

    def item(self, iid):
        entry = {"item": self.token(iid)}
        if self.title_field is not None:
            entry["title"] = self.title(iid)
        return entry


def _to_id(dataset, field, token, what):
    try:
        return int(dataset.token2id(field, str(token)))
    except ValueError:
        raise GenRecError(f"unknown {what} {str(token)!r}: not in dataset {dataset.dataset_name!r} after its "
                          f"filtering (field {field})") from None


def _full_history(dataset, uid, seq_field=None, len_field=None):
    """Internal item ids of every interaction of ``uid``, in time order.

    A sequential dataset holds one augmented row per interaction after the first (history list, target
    item), so there the history is its last row's list plus that row's target (as many items as
    ``MAX_ITEM_LIST_LENGTH`` + 1 at most, more than the model reads)."""
    inter = dataset.inter_feat
    rows = (inter[dataset.uid_field] == uid).nonzero(as_tuple=True)[0]
    if dataset.time_field and dataset.time_field in inter:
        rows = rows[torch.sort(inter[dataset.time_field][rows], stable=True).indices]
    if seq_field is not None and seq_field in inter:
        if rows.numel() == 0:
            return []
        last = int(rows[-1])
        length = int(inter[len_field][last])
        return inter[seq_field][last][:length].tolist() + [int(inter[dataset.iid_field][last])]
    return inter[dataset.iid_field][rows].tolist()


def _split_history(split_data, model, uid, split):
    """The history the evaluation of ``split`` used for ``uid`` (its last row for that user)."""
    data = split_data._dataset
    rows = (data.inter_feat[data.uid_field] == uid).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        raise GenRecError(f"user has no interaction in the {split} split: rank without --split")
    row = int(rows[-1])
    length = int(data.inter_feat[model.ITEM_SEQ_LEN][row])
    return data.inter_feat[model.ITEM_SEQ][row][:length].tolist()


def load_recommender(checkpoint, device=None, overrides=None):
    """``(config, dataset, (train, valid, test), model)`` rebuilt from a checkpoint this package wrote."""
    from recbole.utils import init_logger, init_seed

    from recbole_genrec.beam_analysis import config_from_checkpoint
    from recbole_genrec.quick_start import prepare_data
    from recbole_genrec.trainer import load_checkpoint

    state = load_checkpoint(checkpoint)
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise GenRecError(f"checkpoint {str(checkpoint)!r} holds no config and weights: use a checkpoint "
                          "written by recbole_genrec")
    overrides = dict(overrides or {})
    if device:
        overrides["device"] = device
    overrides.setdefault("state", "WARNING")
    overrides.setdefault("show_progress", False)
    config = config_from_checkpoint(state["config"], overrides)
    init_logger(config)
    dataset, train, valid, test = prepare_data(config)
    init_seed(config["seed"] + config["local_rank"], config["reproducibility"])
    model = config.model_class(config, train._dataset).to(config["device"])
    model.load_state_dict(state["state_dict"])
    model.load_other_parameter(state.get("other_parameter"))
    model.eval()
    return config, dataset, (train, valid, test), model


@torch.no_grad()
def _rank(model, config, dataset, uid, history, topk, sequential):
    from recbole.data.interaction import Interaction

    device = config["device"]
    fields = {}
    if uid is not None:
        fields[dataset.uid_field] = torch.tensor([uid])
    if sequential:
        seq = history[-model.max_seq_length:]
        padded = torch.zeros(1, model.max_seq_length, dtype=torch.long)
        padded[0, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        fields[model.ITEM_SEQ] = padded
        fields[model.ITEM_SEQ_LEN] = torch.tensor([len(seq)])
    scores = model.full_sort_predict(Interaction(fields).to(device)).view(1, -1).float().cpu()
    scores[:, 0] = float("-inf")
    if not sequential and history:
        scores[0, torch.tensor(history)] = float("-inf")
    k = min(int(topk), scores.shape[1] - 1)
    values, items = torch.topk(scores[0], k)
    return items.tolist(), values.tolist()


def recommend(checkpoint, users=None, history=None, topk=10, split=None, device=None, overrides=None,
              loaded=None):
    """Top-``topk`` items per user token in ``users``, or for ``history`` (item tokens, oldest first).

    Returns one dict per user (one for the history): ``user``, ``history`` (the input items, oldest first:
    ``{"item", "title"?}``) and ``recommendations`` (best first: ``{"rank", "item", "title"?, "score"?,
    "semantic_id"?}``). ``loaded``: the tuple :func:`load_recommender` returned (reused across calls).
    """
    from recbole.utils import ModelType

    if (users is None) == (history is None):
        raise GenRecError("pass either users (user tokens) or history (item tokens), not both")
    if int(topk) < 1:
        raise GenRecError(f"topk must be >= 1, got {topk}")
    if split not in (None, "test", "valid"):
        raise GenRecError(f"split must be test or valid, got {split!r}")
    config, dataset, (train, valid, test), model = loaded or load_recommender(checkpoint, device, overrides)
    sequential = config["MODEL_TYPE"] == ModelType.SEQUENTIAL
    if config["MODEL_TYPE"] not in (ModelType.SEQUENTIAL, ModelType.GENERAL):
        raise GenRecError(f"{config['model']} is a {config['MODEL_TYPE'].name.lower()} model: recommend serves "
                          "sequential and general models")
    catalogue = _Catalogue(dataset)
    codes = _item_codes(model)

    requests = []
    if history is not None:
        if not sequential:
            raise GenRecError(f"{config['model']} ranks by user, not by history: pass --user=TOKEN")
        tokens = history.split() if isinstance(history, str) else [str(t) for t in history]
        if not tokens:
            raise GenRecError("history is empty: pass item tokens, oldest first")
        requests.append((None, None, [_to_id(dataset, dataset.iid_field, t, "item") for t in tokens]))
        if split is not None:
            raise GenRecError("split applies to --user, not to --history")
    else:
        for token in ([users] if isinstance(users, str) else list(users)):
            uid = _to_id(dataset, dataset.uid_field, token, "user")
            if split is not None and sequential:
                items = _split_history(test if split == "test" else valid, model, uid, split)
            else:
                items = _full_history(dataset, uid, getattr(model, "ITEM_SEQ", None),
                                      getattr(model, "ITEM_SEQ_LEN", None))
            requests.append((str(token), uid, items))

    results = []
    for token, uid, items in requests:
        ranked, scores = _rank(model, config, dataset, uid, items, topk, sequential)
        recs = []
        for rank, (iid, score) in enumerate(zip(ranked, scores), 1):
            entry = {"rank": rank, **catalogue.item(iid)}
            if codes is not None:
                entry["score"] = _shown_score(model, score)
                entry["semantic_id"] = [int(c) for c in codes[iid].tolist()]
            recs.append(entry)
        results.append({"user": token, "history": [catalogue.item(i) for i in items], "recommendations": recs})
    return results


def _shown_score(model, score):
    """The model's score; ``None`` for an item outside the beam of a beam-search model (fill score)."""
    if hasattr(model, "beam_search"):
        from recbole_genrec.evaluator.scores import FOUND_FLOOR

        if score <= FOUND_FLOOR:
            return None
    return float(score)


def format_results(results, model_name=""):
    lines = []
    for res in results:
        head = f"user {res['user']}" if res["user"] is not None else "given history"
        hist = res["history"]
        lines.append(f"{head}: model input of {len(hist)} items (the most recent, up to MAX_ITEM_LIST_LENGTH), "
                     f"last {min(len(hist), SHOWN_HISTORY)} shown (oldest first)")
        hist_width = max([len(e["item"]) for e in hist[-SHOWN_HISTORY:]] + [1])
        for entry in hist[-SHOWN_HISTORY:]:
            lines.append(f"    {entry['item']:<{hist_width}}  {entry.get('title') or ''}".rstrip())
        recs = res["recommendations"]
        generative = bool(recs) and "semantic_id" in recs[0]
        lines.append(f"  top-{len(recs)}{' from ' + model_name if model_name else ''}:")
        width = max([len(r["item"]) for r in recs] + [4])
        header = f"  {'rank':>4}  {'item':<{width}}"
        if generative:
            header += f"  {'score':>10}  {'semantic ID':<14}"
        lines.append(header + ("  title" if recs and "title" in recs[0] else ""))
        for r in recs:
            line = f"  {r['rank']:>4}  {r['item']:<{width}}"
            if generative:
                score = "-" if r["score"] is None else f"{r['score']:.4f}"
                line += f"  {score:>10}  {'-'.join(str(c) for c in r['semantic_id']):<14}"
            if r.get("title") is not None:
                line += f"  {r['title']}"
            lines.append(line.rstrip())
    return "\n".join(lines)


def main(argv=None):
    """CLI; exit 0 on success, 2 with a one-line error on bad input."""
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m recbole_genrec.recommend", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", action="append", help="a user token (repeat for several users)")
    who.add_argument("--history", help="item tokens, oldest first, separated by spaces")
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--split", choices=["test", "valid"], default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", default=None, help="also write the results as JSON to this file")
    args, rest = parser.parse_known_args(argv)
    try:
        from recbole_genrec.config import parse_override_args

        overrides = parse_override_args(rest)
        loaded = load_recommender(args.checkpoint, args.device, overrides)
        results = recommend(args.checkpoint, users=args.user, history=args.history, topk=args.topk,
                            split=args.split, loaded=loaded)
    except GenRecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_results(results, loaded[0]["model"]))
    if args.json:
        from recbole_genrec.utils import atomic_write_json

        atomic_write_json(args.json, {"checkpoint": str(args.checkpoint), "model": loaded[0]["model"],
                                      "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
