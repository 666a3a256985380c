"""Fit ``rqkmeans`` on N random d-dim vectors, resolve collisions, build the prefix trie; print time and peak RSS.

    OMP_NUM_THREADS=2 python benchmarks/bench_rqkmeans_1m.py [--n=1000000] [--dim=64] [--layers=3]
        [--codebook_size=256] [--iters=30] [--collision=append] [--threads=2]

Soft assignment probabilities are not kept (``keep_soft=False``): at 1M items they alone would be 3 GB.
"""
import argparse
import json
import resource
import time

import torch


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--codebook_size", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--collision", default="append", choices=["append", "reassign"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=2020)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from recbole_genrec.tokenizer import make_tokenizer
    from recbole_genrec.tokenizer.collision import append_index, assert_unique, collision_stats, reassign_last
    from recbole_genrec.tokenizer.trie import PrefixTrie

    x = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(args.seed))
    rss_data = peak_rss_mib()
    tok = make_tokenizer("rqkmeans", num_layers=args.layers, codebook_size=args.codebook_size, seed=args.seed,
                         kmeans_iters=args.iters, keep_soft=False)
    t0 = time.perf_counter()
    raw = tok.fit(x)
    sizes = list(tok.codebook_sizes)
    if args.collision == "append":  # same steps as recbole_genrec.data.semantic_ids.fit_codes
        codes, extra = append_index(raw)
        sizes.append(extra)
    else:
        codes, _ = reassign_last(raw, tok.last_layer_distances, sizes[-1])
    assert_unique(codes)
    t1 = time.perf_counter()
    trie = PrefixTrie.from_codes(codes, torch.arange(1, args.n + 1), sizes)
    t2 = time.perf_counter()
    assert (trie.lookup(codes[:10000]) == torch.arange(1, 10001)).all()
    figures = {
        "n": args.n, "dim": args.dim, "layers": args.layers, "codebook_size": args.codebook_size,
        "kmeans_iters": args.iters, "threads": torch.get_num_threads(), "collision": args.collision,
        "fit_and_collision_seconds": round(t1 - t0, 1), "trie_seconds": round(t2 - t1, 1),
        "total_seconds": round(t2 - t0, 1), "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_after_data_mib": round(rss_data, 1), "id_length": codes.shape[1], "codebook_sizes": sizes,
        "collision_rate_before": round(collision_stats(raw)["collision_rate"], 4),
        "trie_nodes_per_depth": [c.shape[0] for c in trie.children] + [trie.leaf_item.shape[0]],
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
