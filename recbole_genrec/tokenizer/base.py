"""The one tokenizer interface, and k-means in torch shared by all tokenizers.

A tokenizer maps item embeddings ``[n, d]`` to codes ``[n, L]`` (``fit``), and keeps per layer the soft
assignment probabilities ``p_l(k | x) = softmax_k(-||r_l(x) - c_{l,k}||^2 / T_l)`` where ``r_l`` is the
vector quantised at layer ``l`` and ``T_l`` that layer's mean squared quantisation error (a scale-free
temperature).
"""
import torch

_CHUNK_ELEMS = 2**24  # distance matrix chunk: 16M floats (64 MB)
ROW_CHUNK = 1 << 16  # rows gathered or updated at a time (kmeans(rows=...), rq-kmeans' residual update)


def sq_distances(x, c):
    """``||x_i - c_k||^2`` for all pairs, ``[n, K]`` (clamped at 0)."""
    return ((x * x).sum(1, keepdim=True) - 2.0 * (x @ c.T) + (c * c).sum(1)[None, :]).clamp_min_(0.0)


def nearest(x, c, chunk=None, x_sq=None, rows=None):
    """``(argmin_k, min_k)`` of ``||x_i - c_k||^2`` in row chunks, so ``[n, K]`` is never held at once.

    ``x_sq`` (optional ``[n]``, ``(x * x).sum(1)``) saves recomputing the row norms when ``x`` is reused
    (k-means' iterations). ``rows`` (optional LongTensor): use ``x[rows]`` (gathered a chunk at a time, no copy of
    the whole subset; ``x_sq`` then has one entry per row of ``rows``). The chunk's distances are combined in place in the order of :func:`sq_distances`
    (``(||x||^2 - 2 x.c) + ||c||^2``), so the result does not depend on ``x_sq`` being given, and on ``chunk`` only
    through the matmul's rounding (its blocking follows the row count)."""
    chunk = chunk or max(1, _CHUNK_ELEMS // max(1, c.shape[0]))
    n = x.shape[0] if rows is None else rows.shape[0]
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    c_sq = (c * c).sum(1)
    ct = c.T
    for s in range(0, n, chunk):
        xb = x[s:s + chunk] if rows is None else x[rows[s:s + chunk]]
        xb_sq = (xb * xb).sum(1, keepdim=True) if x_sq is None else x_sq[s:s + chunk, None]
        d = (xb @ ct).mul_(-2.0).add_(xb_sq).add_(c_sq[None, :])  # bitwise the same as xb_sq - 2 xc + c_sq
        # not torch.min(out=...): under bf16 autocast d is bf16 and the out buffers are the input's dtype
        dist[s:s + chunk], idx[s:s + chunk] = d.min(1)
    return idx, dist.clamp_min_(0.0)


def soft_assign(x, c, temperature, chunk=None):
    """``softmax(-||x - c_k||^2 / T)`` over the codebook, ``[n, K]`` (filled chunk by chunk, no second copy)."""
    chunk = chunk or max(1, _CHUNK_ELEMS // max(1, c.shape[0]))
    t = max(float(temperature), 1e-12)
    out = x.new_empty(x.shape[0], c.shape[0])
    for s in range(0, x.shape[0], chunk):
        out[s:s + chunk] = torch.softmax(-sq_distances(x[s:s + chunk], c) / t, dim=1)
    return out


def kmeans_pp_init(x, k, generator, max_sample=20000, rows=None):
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on a random subsample of at most ``max_sample`` rows
    (of ``x[rows]`` when ``rows`` is given)."""
    n = x.shape[0] if rows is None else rows.shape[0]
    if n > max_sample:
        pick = torch.randperm(n, generator=generator, device="cpu")[:max_sample].to(x.device)
        x = x[pick if rows is None else rows[pick]]
        n = max_sample
    elif rows is not None:
        x = x[rows]
    centers = x.new_empty(k, x.shape[1])
    x_sq = (x * x).sum(1)
    dist_to = lambda c: (x_sq - 2.0 * (x @ c) + (c * c).sum()).clamp_min_(0.0)  # noqa: E731
    first = int(torch.randint(n, (1,), generator=generator))
    centers[0] = x[first]
    d2 = dist_to(centers[0])
    for j in range(1, k):
        cum = torch.cumsum(d2.double().cpu(), 0)
        total = float(cum[-1])
        if total <= 0:  # fewer distinct points than k: repeat a point (later rows never win argmin ties)
            centers[j:] = centers[0]
            break
        u = float(torch.rand(1, generator=generator, dtype=torch.float64)) * total
        pick = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64), right=True)), n - 1)
        centers[j] = x[pick]
        d2 = torch.minimum(d2, dist_to(centers[j]))
    return centers


def kmeans(x, k, iters=30, generator=None, tol=1e-6, rows=None):
    """Lloyd's k-means in torch with k-means++ seeding and empty-cluster re-seeding.

    Returns ``(centroids [k, d], assignment [n], sq_distance [n])``. Empty clusters are re-seeded at the
    points farthest from their centroid, so every code stays in use when ``n >= k``. Deterministic given
    ``generator`` (a seeded CPU ``torch.Generator``).

    ``rows`` (optional LongTensor): cluster ``x[rows]`` without copying that subset (it is gathered a chunk at a
    time); the result is the same as ``kmeans(x[rows], ...)``, and ``assignment``/``sq_distance`` follow ``rows``.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    d = x.shape[1]
    n = x.shape[0] if rows is None else rows.shape[0]
    centers = kmeans_pp_init(x, k, generator, rows=rows)
    step = ROW_CHUNK
    if rows is None:
        x_sq = (x * x).sum(1)
    else:
        x_sq = torch.cat([(xb * xb).sum(1) for xb in (x[rows[s:s + step]] for s in range(0, n, step))])
    prev = None
    for _ in range(max(1, iters)):
        assign, dist = nearest(x, centers, x_sq=x_sq, rows=rows)
        counts = torch.bincount(assign, minlength=k)
        if rows is None:
            sums = x.new_zeros(k, d).index_add_(0, assign, x)
        else:  # in row order, a chunk at a time
            sums = x.new_zeros(k, d)
            for s in range(0, n, step):
                sums.index_add_(0, assign[s:s + step], x[rows[s:s + step]])
        nonempty = counts > 0
        centers[nonempty] = sums[nonempty] / counts[nonempty, None].to(x.dtype)
        empty = (~nonempty).nonzero().flatten()
        if len(empty) and n >= k:
            far = torch.topk(dist, min(len(empty), n)).indices
            centers[empty[:len(far)]] = x[far] if rows is None else x[rows[far]]
        inertia = float(dist.sum())
        if prev is not None and len(empty) == 0 and abs(prev - inertia) <= tol * max(prev, 1e-12):
            break
        prev = inertia
    assign, dist = nearest(x, centers, x_sq=x_sq, rows=rows)
    return centers, assign, dist


class Tokenizer:
    """Base class: ``fit(embeddings [n, d], cf_embeddings=None) -> codes LongTensor [n, L]``.

    ``cf_embeddings`` (optional ``[n, d_cf]``, row-aligned with ``embeddings``) are collaborative item
    embeddings; a tokenizer with ``needs_cf_embeddings = True`` (LETTER) requires them, the others ignore them.

    After ``fit``: ``soft_probs`` (list of L ``[n, K_l]`` tensors, or ``None`` when ``keep_soft=False``),
    ``codebook_sizes`` (list of L ints), ``stats`` (JSON-able dict), and
    ``last_layer_distances(rows) -> [len(rows), K_L]`` used by collision ``reassign``.
    """

    name = "base"
    needs_cf_embeddings = False

    def __init__(self, num_layers=3, codebook_size=256, seed=2020, device="cpu", kmeans_iters=30,
                 keep_soft=True, **kwargs):
        self.num_layers = int(num_layers)
        self.codebook_size = int(codebook_size)
        self.codebook_sizes = [self.codebook_size] * self.num_layers
        self.seed = int(seed)
        self.device = torch.device(device)
        self.kmeans_iters = int(kmeans_iters)
        self.keep_soft = keep_soft
        self.soft_probs = None
        self.stats = {}
        self._last_inputs = None  # the vectors quantised at the last layer, [n, d_L]
        self._last_codebook = None  # [K_L, d_L]

    def generator(self, offset=0):
        return torch.Generator().manual_seed(self.seed + offset)

    def fit(self, embeddings, cf_embeddings=None):
        raise NotImplementedError

    def last_layer_distances(self, rows):
        """Squared distances from the given items' last-layer vectors to every last-layer code."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self._last_inputs.device)
        return sq_distances(self._last_inputs[rows], self._last_codebook).cpu()

    def config(self):
        """Hyperparameters that determine the codes (part of the cache key)."""
        return {"tokenizer": self.name, "num_codebooks": self.num_layers, "codebook_size": self.codebook_size,
                "seed": self.seed, "kmeans_iters": self.kmeans_iters}
