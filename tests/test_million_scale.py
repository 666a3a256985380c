"""The memory-bounded paths used at a million items give the same results as the plain computations they replace
(benchmarks/bench_million.py, docs/performance.md#a-million-items)."""
import torch

from recbole_genrec.tokenizer.base import kmeans, nearest, soft_assign, sq_distances


def _old_nearest(x, c):
    d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]
    dist, idx = d.min(1)
    return idx, dist.clamp_min_(0.0)


def test_nearest_and_soft_assign_match_the_plain_formula():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(1000, 24, generator=g), torch.randn(16, 24, generator=g)
    idx, dist = _old_nearest(x, c)
    for chunk in (None, 7, 1000):
        # one chunk is the plain computation bitwise; smaller chunks change only the matmul's blocking, whose
        # rounding depends on the row count and the thread count
        a, b = nearest(x, c, chunk=chunk)
        exact = chunk is None or chunk >= len(x)
        assert torch.equal(a, idx) and (torch.equal(b, dist) if exact else torch.allclose(b, dist, atol=1e-4))
        a, b = nearest(x, c, chunk=chunk, x_sq=(x * x).sum(1))
        assert torch.equal(a, idx) and (torch.equal(b, dist) if exact else torch.allclose(b, dist, atol=1e-4))
    plain = torch.softmax(-sq_distances(x, c) / 0.7, dim=1)
    assert torch.allclose(soft_assign(x, c, 0.7, chunk=33), plain, rtol=1e-4, atol=1e-7)


def _old_rqkmeans(x, num_layers, k, iters, seed):
    """The residual k-means loop before the memory changes (residual copy, full gather of the centres)."""
    from recbole_genrec.tokenizer.rqkmeans import RQKMeansTokenizer

    residual = x.clone()
    codes = []
    for layer in range(num_layers):
        fit_rows = RQKMeansTokenizer._ambiguous_rows(codes) if layer else None
        gen = torch.Generator().manual_seed(seed + layer)
        if fit_rows is not None and len(fit_rows) >= k:
            centers, _, _ = kmeans(residual[fit_rows], k, iters, gen)
            assign, _ = _old_nearest(residual, centers)
        else:
            centers, assign, _ = kmeans(residual, k, iters, gen)
        residual = residual - centers[assign]
        codes.append(assign)
    return torch.stack(codes, 1)


def test_rqkmeans_codes_unchanged_by_the_in_place_residuals(monkeypatch):
    import recbole_genrec.tokenizer.rqkmeans as rq
    from recbole_genrec.tokenizer import make_tokenizer

    monkeypatch.setattr(rq, "ROW_CHUNK", 37)  # several residual-update chunks
    g = torch.Generator().manual_seed(1)
    x = torch.randn(600, 12, generator=g) + 4 * torch.randn(6, 12, generator=g)[torch.randint(6, (600,), generator=g)]
    tok = make_tokenizer("rqkmeans", num_layers=3, codebook_size=8, seed=5, kmeans_iters=6, keep_soft=True)
    codes = tok.fit(x)
    assert torch.equal(codes, _old_rqkmeans(x, 3, 8, 6, 5))
    assert [s.shape for s in tok.soft_probs] == [(600, 8)] * 3
    # the last layer's inputs are the residuals after two layers (used by collision=reassign)
    r = x - tok.codebooks[0][codes[:, 0]]
    r = r - tok.codebooks[1][codes[:, 1]]
    assert torch.allclose(tok._last_inputs, r, atol=1e-5)


def _old_dispersion(embeddings, codes):
    from recbole_genrec.data.semantic_ids import prefix_group_ids

    embeddings = embeddings.double()
    n = codes.shape[0]
    sq = (embeddings * embeddings).sum(1)
    out = []
    for g in prefix_group_ids(codes):
        G = int(g.max()) + 1
        cnt = torch.bincount(g, minlength=G).double()
        mean = torch.zeros(G, embeddings.shape[1], dtype=torch.float64).index_add_(0, g, embeddings) / cnt[:, None]
        mean_sq = torch.zeros(G, dtype=torch.float64).index_add_(0, g, sq) / cnt
        out.append(float(((mean_sq - (mean * mean).sum(1)).clamp_min(0.0) * cnt).sum() / n))
    return out


def test_prefix_dispersion_in_column_blocks(monkeypatch):
    import recbole_genrec.data.semantic_ids as S

    g = torch.Generator().manual_seed(2)
    emb = torch.randn(500, 10, generator=g)
    codes = torch.randint(0, 4, (500, 3), generator=g)
    old = _old_dispersion(emb, codes)
    assert S.prefix_dispersion(emb, codes, skip_padding=False) == old  # one block: the same computation
    monkeypatch.setattr(S, "_DISPERSION_ELEMS", 500 * 3)  # blocks of 3 columns
    blocked = S.prefix_dispersion(emb, codes, skip_padding=False)
    assert all(abs(a - b) <= 1e-12 * max(1.0, abs(b)) for a, b in zip(blocked, old))


def test_soft_probs_dropped_above_the_size_limit(tmp_path, monkeypatch):
    import recbole_genrec.data.semantic_ids as S

    emb = torch.cat([torch.zeros(1, 6), torch.randn(80, 6, generator=torch.Generator().manual_seed(3))])
    settings = {"tokenizer": "rqkmeans", "num_layers": 2, "codebook_size": 4, "seed": 1, "kmeans_iters": 3}
    meta = {"kind": "test"}
    codes, _, soft, _, _ = S._cached_or_fitted_codes(tmp_path / "a", meta, emb, 81, settings, "append", "cpu", True)
    assert soft is not None and soft[0].shape == (81, 4)
    monkeypatch.setattr(S, "SOFT_PROBS_MAX_BYTES", 4 * 80 * 2 * 4 - 1)
    codes2, _, soft2, _, _ = S._cached_or_fitted_codes(tmp_path / "b", meta, emb, 81, settings, "append", "cpu", True)
    assert soft2 is None and torch.equal(codes, codes2)


def _brute_topk(scores, k, order):
    """Sort each row by (score descending, tie rank ascending)."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    out = []
    for row in scores.tolist():
        idx = sorted(range(len(row)), key=lambda i: (-row[i], rank[i].item()))
        out.append(idx[:k])
    return torch.tensor(out)


def test_tie_broken_topk_sparse_path_equals_the_dense_one():
    from recbole_genrec.evaluator.scores import _tie_broken_topk_dense, tie_broken_topk

    g = torch.Generator().manual_seed(4)
    for trial in range(30):
        B, n, k = 6, 40, int(torch.randint(1, 12, (1,), generator=g))
        scores = torch.randint(0, 6, (B, n), generator=g).float()  # many ties
        scores[0] = torch.randn(n, generator=g)  # none
        scores[1, :] = 2.0  # all tied (dense path)
        scores[2, : n // 2] = float("-inf")
        if trial % 5 == 0:
            scores[3, 5] = float("nan")
        order = torch.randperm(n, generator=g)
        got = tie_broken_topk(scores, k, order)
        assert torch.equal(got, _tie_broken_topk_dense(scores, k, order))
        if trial % 5:
            assert torch.equal(got, _brute_topk(scores, k, order))
        few = scores[[0, 4, 5]]  # rows without a tie at the k-th score: the candidate path
        few[1] = torch.randn(n, generator=g)
        assert torch.equal(tie_broken_topk(few, k, order), _brute_topk(few, k, order))


def test_sparse_trie_levels_answer_like_dense_tables(monkeypatch):
    import recbole_genrec.tokenizer.trie as T
    from recbole_genrec.evaluator.beam_search import trie_beam_search
    from recbole_genrec.tokenizer.collision import append_index

    g = torch.Generator().manual_seed(6)
    raw = torch.randint(0, 5, (300, 3), generator=g)
    codes, extra = append_index(raw)
    sizes = [5, 5, 5, extra]
    items = torch.arange(1, 301)
    dense = T.PrefixTrie.from_codes(codes, items, sizes)
    monkeypatch.setattr(T, "DENSE_MAX_ENTRIES", 0)
    sparse = T.PrefixTrie.from_codes(codes, items, sizes)
    assert all(isinstance(c, T.SparseLevel) for c in sparse.children)
    assert sparse.nbytes() < dense.nbytes()
    for d in range(4):
        assert sparse.children[d].shape == dense.children[d].shape
        assert sparse.children[d].tolist() == dense.children[d].tolist()
        nodes = torch.randint(0, dense.children[d].shape[0], (7, 3), generator=g)
        assert torch.equal(sparse.children[d][nodes], dense.children[d][nodes])
        assert torch.equal(sparse.valid_mask(nodes[0], d), dense.valid_mask(nodes[0], d))
    probe = torch.cat([codes[::7], torch.randint(0, 5, (40, 4), generator=g)])
    assert torch.equal(sparse.lookup(probe), dense.lookup(probe))
    assert torch.equal(sparse.lookup(codes), items)

    logits = [torch.randn(4 * 6, k, generator=g).log_softmax(-1) for k in sizes]

    def step(depth, last, parent):
        rows = 4 if depth == 0 else parent.numel()
        return logits[depth][:rows]

    a, b = trie_beam_search(step, dense, 4, 6), trie_beam_search(step, sparse, 4, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_kmeans_on_rows_equals_kmeans_on_the_copied_rows(monkeypatch):
    import recbole_genrec.tokenizer.base as base

    monkeypatch.setattr(base, "ROW_CHUNK", 29)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(900, 10, generator=g)
    rows = torch.randperm(900, generator=g)[:500].sort().values
    a = kmeans(x[rows], 12, 8, torch.Generator().manual_seed(1))
    b = kmeans(x, 12, 8, torch.Generator().manual_seed(1), rows=rows)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    seeding = base.kmeans_pp_init
    monkeypatch.setattr(base, "kmeans_pp_init",  # the subsampled seeding path (more rows than max_sample)
                        lambda *a, **k: seeding(*a, **{**k, "max_sample": 100}))
    a = kmeans(x[rows], 12, 8, torch.Generator().manual_seed(2))
    b = kmeans(x, 12, 8, torch.Generator().manual_seed(2), rows=rows)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
