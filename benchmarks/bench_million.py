"""A synthetic million-item catalogue through the whole TIGER pipeline; wall time and peak memory per stage.

    OMP_NUM_THREADS=1 python benchmarks/bench_million.py [--items=1000000] [--dim=384] [--inter_per_item=3]
        [--users=0] [--tokenizer=rqkmeans] [--kmeans_iters=30] [--users_beam=1000] [--beam_size=20] [--topk=10]
        [--train_batch=256] [--model_size=recipe|faithful] [--score_batch=128] [--skip_scoring] [--json=out.json]

Stages (each timed; peak RSS *within* the stage via ``/proc/self/clear_refs``, so a later stage's peak is not hidden
by an earlier one; ``ru_maxrss`` where that is unavailable):

1. ``data``: ``--items`` unit-norm vectors of ``--dim`` (a Gaussian mixture around 1,024 topic centres, float32, the
   size of MiniLM's output) and a RecBole atomic dataset (``.inter`` with Zipf(1) item popularity, ``--inter_per_item``
   interactions per catalogue item on average, users with 5+ interactions; ``.item`` listing every item, so the
   catalogue is all ``--items`` even where Zipf leaves an item without interactions), in a temp dir.
2. ``recbole dataset``: the plugin's ``load_config`` + ``prepare_data`` (RecBole's loading, remapping, all-prefix
   augmentation, leave-one-out split, dataloaders), item 5-core filtering off so every item stays.
3. ``semantic-ID build``: :func:`recbole_genrec.data.semantic_ids._cached_or_fitted_codes` as a fresh
   ``build_semantic_ids`` calls it (the vectors stand in for the text embeddings), with its steps as sub-rows:
   ``tokenizer fit`` (default ``rqkmeans``, 3 x 256), ``collisions`` (``collision: append``), ``ID report``
   (``quality_report``) and ``cache write`` (into the temp dir).
4. ``trie``: :class:`recbole_genrec.tokenizer.trie.PrefixTrie` over the unique IDs.
5. ``TIGER build``: the model built by ``build_model_and_trainer`` from those IDs (``load_semantic_ids`` returns
   them, as tests substitute their own codes).
6. ``train step``: one optimizer step (``calculate_loss``, backward, the trainer's optimizer) on RecBole's first
   training batch of ``--train_batch`` prefixes.
7. ``beam search``: ``TIGER.beam_search`` (trie-constrained, ``BeamDecoder``) for ``--users_beam`` test users,
   beam ``--beam_size``, top ``--topk`` kept; checks every returned item is a real item.
8. ``full-sort scoring`` (RecBole's protocol, unless ``--skip_scoring``): ``full_sort_predict`` (beam items ->
    ``[users, n_items]`` scores) and ``tie_broken_topk``, ``--score_batch`` users at a time; memory is
    ``O(score_batch x n_items)``.

Measured figures: docs/performance.md#a-million-items.
"""
import argparse
import gc
import json
import os
import re
import resource
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- memory -------------------------------------------------------------------------------------
def _reset_peak():
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mib(key):
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) / 1024.0 if m else None
    except OSError:
        return None


class Stages:
    """Timed stages; a stage run inside another (``wrap``) is a sub-row, and the outer stage's peak is the largest
    of its own and its sub-stages' (each stage resets the high-water mark when it starts)."""

    def __init__(self):
        self.rows = []
        self.can_reset = _reset_peak()
        self.open = []  # running peak of each enclosing stage

    def _hwm(self):
        if self.can_reset:
            return _status_mib("VmHWM") or 0.0
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def run(self, name, fn, note=""):
        if not self.open:
            gc.collect()
        if self.open:  # the enclosing stage's peak so far, before this stage resets the mark
            self.open[-1] = max(self.open[-1], self._hwm())
        self.can_reset = _reset_peak() and self.can_reset
        depth = len(self.open)
        row = {"stage": "  " * depth + name, "depth": depth, "note": ""}
        self.rows.append(row)
        self.open.append(0.0)
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        peak = max(self.open.pop(), self._hwm())
        if self.open:
            self.open[-1] = max(self.open[-1], peak)
        row.update(seconds=round(seconds, 2), peak_rss_mib=round(peak, 1),
                   rss_after_mib=round(_status_mib("VmRSS") or 0.0, 1))
        row["note"] = note(out) if callable(note) else note
        print(f"  {row['stage']:<22} {seconds:8.1f} s   peak {row['peak_rss_mib']:8.0f} MiB   {row['note']}",
              flush=True)
        return out

    def wrap(self, obj, attr, name, note=""):
        """Time every call of ``obj.attr`` (the library's own function) as a sub-stage ``name``."""
        fn = getattr(obj, attr)
        setattr(obj, attr, lambda *a, **k: self.run(name, lambda: fn(*a, **k), note))
        return fn

    def table(self):
        lines = ["| stage | seconds | peak RSS (MiB) | RSS after (MiB) | note |", "|---|---:|---:|---:|---|"]
        for r in self.rows:
            name = r["stage"].strip() if r["depth"] == 0 else "&nbsp;&nbsp;" * r["depth"] + r["stage"].strip()
            lines.append(f"| {name} | {r['seconds']:.1f} | {r['peak_rss_mib']:,.0f} | "
                         f"{r['rss_after_mib']:,.0f} | {r['note']} |")
        top = [r for r in self.rows if r["depth"] == 0]
        total = sum(r["seconds"] for r in top)
        peak = max(r["peak_rss_mib"] for r in top)
        lines.append(f"| **total** | **{total:.1f}** | **{peak:,.0f}** | | |")
        return "\n".join(lines), total, peak


# ---- synthetic data -----------------------------------------------------------------------------
def item_vectors(n, dim, seed, topics=1024, chunk=1 << 17):
    """``[n, dim]`` float32 unit vectors: a mixture around ``topics`` random centres (text embeddings cluster)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(topics, dim, generator=g)
    centres /= centres.norm(dim=1, keepdim=True)
    out = torch.empty(n, dim)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        topic = torch.randint(topics, (m,), generator=g)
        x = centres[topic] + 0.6 * torch.randn(m, dim, generator=g) / dim ** 0.5 * 4
        out[s:s + m] = x / x.norm(dim=1, keepdim=True)
    return out


def write_dataset(root, name, n_items, n_users, inter_per_item, seed, zipf_a=1.0):
    """RecBole atomic files: Zipf item popularity, 5+ interactions per user. Returns ``(#interactions, #users)``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    total = int(n_items * inter_per_item)
    if not n_users:
        n_users = max(1000, total // 30)
    # per-user lengths: 5 + geometric, scaled so they sum to about `total`
    mean_extra = max(total / n_users - 5, 0.5)
    lengths = 5 + rng.geometric(1.0 / (1.0 + mean_extra), n_users) - 1
    n = int(lengths.sum())
    # Zipf(a) over a random permutation of the items (rank r -> item perm[r])
    p = 1.0 / np.arange(1, n_items + 1) ** zipf_a
    cdf = np.cumsum(p / p.sum())
    rank = np.minimum(np.searchsorted(cdf, rng.random(n)), n_items - 1)
    items = rng.permutation(n_items)[rank] + 1
    users = np.repeat(np.arange(1, n_users + 1), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    ts = users.astype(np.int64) * 10_000 + (np.arange(n) - starts)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    pd.DataFrame({"user_id:token": users, "item_id:token": items, "timestamp:float": ts}).to_csv(
        os.path.join(folder, f"{name}.inter"), sep="\t", index=False)
    pd.DataFrame({"item_id:token": np.arange(1, n_items + 1)}).to_csv(
        os.path.join(folder, f"{name}.item"), sep="\t", index=False)
    return n, n_users, int(np.unique(items).size)


# ---- main ---------------------------------------------------------------------------------------
def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--inter_per_item", type=float, default=3.0)
    p.add_argument("--users", type=int, default=0, help="0: one user per 30 interactions (at least 1,000)")
    p.add_argument("--tokenizer", default="rqkmeans")
    p.add_argument("--num_codebooks", type=int, default=3)
    p.add_argument("--codebook_size", type=int, default=256)
    p.add_argument("--kmeans_iters", type=int, default=30)
    p.add_argument("--users_beam", type=int, default=1000)
    p.add_argument("--beam_size", type=int, default=20)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--train_batch", type=int, default=256)
    p.add_argument("--model_size", default="recipe", choices=["recipe", "faithful"],
                   help="recipe: --recipe=cpu's 2+2-layer d_model 64 T5; faithful: TIGER.yaml's 4+4, d_model 128")
    p.add_argument("--score_batch", type=int, default=128)
    p.add_argument("--skip_scoring", action="store_true")
    p.add_argument("--seed", type=int, default=2020)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from recbole_genrec.tokenizer.trie import PrefixTrie, SparseLevel

    threads = torch.get_num_threads()
    print(f"{args.items:,} items, dim {args.dim}, {threads} torch thread(s); tokenizer {args.tokenizer} "
          f"{args.num_codebooks}x{args.codebook_size} + collision append", flush=True)
    st = Stages()
    tmp = tempfile.TemporaryDirectory(prefix="bench_million_")
    name = "million"
    info = {}

    def data():
        x = item_vectors(args.items, args.dim, args.seed)
        info["interactions"], info["users"], info["items_with_interactions"] = write_dataset(
            tmp.name, name, args.items, args.users, args.inter_per_item, args.seed)
        return x

    emb = st.run("data", data, lambda _: f"{info['interactions']:,} interactions, {info['users']:,} users, "
                                       f"{info['items_with_interactions']:,} items interacted")

    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data

    cfg = {"data_path": tmp.name, "show_progress": False, "state": "WARNING", "seed": args.seed,
           "load_col": {"inter": ["user_id", "item_id", "timestamp"], "item": ["item_id"]},
           "item_inter_num_interval": "[0,inf)", "user_inter_num_interval": "[5,inf)",
           "train_batch_size": args.train_batch, "eval_batch_size": args.score_batch,
           "beam_size": args.beam_size, "topk": [args.topk], "metrics": ["Hit", "NDCG"], "valid_metric": "NDCG@10",
           "cache_dir": os.path.join(tmp.name, "cache"), "checkpoint_dir": os.path.join(tmp.name, "saved"),
           "tokenizer": args.tokenizer, "num_codebooks": args.num_codebooks, "codebook_size": args.codebook_size,
           "kmeans_iters": args.kmeans_iters, "collision": "append", "precision": "fp32"}
    if args.model_size == "recipe":
        cfg["recipe"] = "cpu"
        cfg["precision"] = "fp32"

    def recbole_data():
        config = load_config("TIGER", name, config_dict=cfg)
        return config, prepare_data(config)

    config, (dataset, train_data, valid_data, test_data) = st.run(
        "recbole dataset", recbole_data, lambda o: f"{o[1][0].item_num - 1:,} items, {len(o[1][1].dataset):,} "
                                                 f"training prefixes")
    if dataset.item_num - 1 != args.items:
        raise SystemExit(f"RecBole kept {dataset.item_num - 1} items, expected {args.items}")

    # The semantic-ID builder as a fresh TIGER run calls it (build_semantic_ids minus the text encoder: the vectors
    # stand in for the text embeddings): fit, collisions, quality report, padding row, cache write.
    import recbole_genrec.data.semantic_ids as S
    from recbole_genrec.tokenizer.collision import collision_stats

    settings, collision = S.tokenizer_settings(config)
    folder = S.cache_folder(config)
    code_meta = {"kind": "semantic_ids", "codes_version": S.CODES_VERSION, "embeddings": "bench_million",
                 "num_items": args.items + 1, "tokenizer": settings, "collision": collision}
    seen = {}

    def item_rows():
        """Vectors in RecBole's item order, row 0 = padding (as ``item_embeddings`` returns them)."""
        raw = torch.tensor([int(t) for t in dataset.field2id_token[dataset.iid_field][1:]], dtype=torch.long)
        out = emb.new_zeros(args.items + 1, emb.shape[1])
        torch.index_select(emb, 0, raw - 1, out=out[1:])
        return out

    def build():
        nonlocal emb
        emb = item_rows()
        return S._cached_or_fitted_codes(folder, code_meta, emb, args.items + 1, settings, collision, "cpu", True)

    def make_tokenizer(*a, **k):
        tok = make_tokenizer_orig(*a, **k)
        seen["tok"] = tok
        st.wrap(tok, "fit", "tokenizer fit", lambda raw: (
            seen.__setitem__("stats", collision_stats(raw)) or
            f"{tok.name} {args.num_codebooks}x{args.codebook_size}, {args.kmeans_iters} iters, soft probs "
            f"{'kept' if tok.keep_soft else 'not kept'}"))
        return tok

    make_tokenizer_orig = S.make_tokenizer
    S.make_tokenizer = make_tokenizer
    st.wrap(S, "append_index", "collisions", lambda o: (
        f"{100 * seen['stats']['collision_rate']:.1f}% of items collide, largest group "
        f"{seen['stats']['max_items_per_code']} -> sizes {list(seen['tok'].codebook_sizes) + [o[1]]}"))
    st.wrap(S, "quality_report", "ID report", "quality_report (dispersion, utilisation, ...)")
    st.wrap(S, "save_tensors", "cache write", lambda _: "codes (+ soft probabilities when kept), safetensors")
    codes, sizes, soft, report, _ = st.run(
        "semantic-ID build", build,
        lambda o: f"_cached_or_fitted_codes, {o[0].shape[0] - 1:,} unique IDs of length {o[0].shape[1]}")
    S.make_tokenizer = make_tokenizer_orig
    stats = seen["stats"]
    trie = st.run("trie", lambda: PrefixTrie.from_codes(codes[1:], torch.arange(1, args.items + 1), sizes),
                  lambda t: "nodes per depth " + str([c.shape[0] for c in t.children] + [t.leaf_item.shape[0]])
                            + f", {t.nbytes() / 2**20:.0f} MiB, levels " + "/".join(
                                "sparse" if isinstance(c, SparseLevel) else "dense" for c in t.children))
    sids = S.SemanticIDs(codes, sizes, emb, soft, report, trie)
    del seen["tok"]

    import recbole_genrec.model.tiger as tiger_module

    tiger_module.load_semantic_ids = lambda config, dataset: sids

    model, trainer = st.run("TIGER build", lambda: build_model_and_trainer(config, train_data),
                            lambda o: f"{sum(p.numel() for p in o[0].parameters()) / 1e6:.2f} M parameters, "
                                      f"vocab {o[0].layout.vocab_size}")

    def train_step():
        model.train()
        batch = next(iter(train_data)).to(config["device"])
        trainer.optimizer.zero_grad()
        loss = model.calculate_loss(batch)
        loss.backward()
        trainer.optimizer.step()
        return float(loss.detach()), len(batch)

    loss, n_batch = st.run("train step", train_step, lambda o: f"batch {o[1]}, loss {o[0]:.3f}")

    # the first --users_beam test users, as the evaluation's dataloader yields them
    batches, n = [], 0
    for interaction, *_ in test_data:
        batches.append(interaction)
        n += len(interaction)
        if n >= args.users_beam:
            break
    inter = batches[0].__class__({k: torch.cat([b[k] for b in batches])[:args.users_beam] for k in batches[0].columns})
    model.eval()

    def beam():
        ids, mask = model.encoder_input(inter)
        items, scores = model.beam_search(ids, mask)
        return items[:, :args.topk], scores[:, :args.topk]

    items, scores = st.run("beam search", beam,
                           lambda _: f"{len(inter)} users, beam {args.beam_size}, top {args.topk}, "
                                   f"{len(inter) / st.rows[-1]['seconds']:.0f} users/s")
    found = torch.isfinite(scores)
    assert bool(((items > 0) & (items <= args.items))[found].all()), "beam search returned a non-item"

    if not args.skip_scoring:
        from recbole_genrec.evaluator.scores import tie_broken_topk, tie_order

        order = tie_order(dataset.field2id_token[dataset.iid_field], config["seed"])  # as the trainer sets it

        def scoring():
            agree = 0
            for s in range(0, len(inter), args.score_batch):
                part = inter[torch.arange(s, min(s + args.score_batch, len(inter)))]
                full = model.full_sort_predict(part)
                top = tie_broken_topk(full, args.topk, order)
                agree += int((top == items[s:s + args.score_batch]).all(1).sum())
                del full
            return agree

        agree = st.run("full-sort scoring", scoring,
                       lambda agree: f"full_sort_predict + tie_broken_topk, {args.score_batch} users x {args.items:,} "
                               f"items at a time; top {args.topk} = beam's on {agree}/{len(inter)} users")

    table, total, peak = st.table()
    print()
    print(f"items {args.items:,}, dim {args.dim}, {info['interactions']:,} interactions, {info['users']:,} users, "
          f"{threads} thread(s), model {args.model_size}")
    print(table)
    print(f"total {total:.1f} s ({total / 60:.1f} min), peak RSS {peak:,.0f} MiB ({peak / 1024:.2f} GiB)")
    out = {"args": vars(args), "threads": threads, "data": info, "stages": st.rows, "total_seconds": round(total, 1),
           "peak_rss_mib": round(peak, 1), "collisions_before": stats, "codebook_sizes": sizes,
           "peak_reset_per_stage": st.can_reset}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    tmp.cleanup()


if __name__ == "__main__":
    main()
