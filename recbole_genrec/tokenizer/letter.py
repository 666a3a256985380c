"""LETTER tokenizer (Wang et al., "Learnable Item Tokenization for Generative Recommendation", CIKM 2024).

The RQ-VAE of :mod:`recbole_genrec.tokenizer.rqvae` (LETTER's "semantic regularisation", L_Sem) plus two
regularisers, added through RQ-VAE's ``epoch_start`` / ``extra_losses`` hooks (LETTER's overall tokenizer loss,
Sec. 3.1; equation labels below are descriptive, the paper's numbering was not re-checked offline):

    L_LETTER = L_Sem + alpha * L_CF + beta * L_Div

* collaborative regularisation (L_CF, :func:`cf_alignment_loss`): in-batch contrastive alignment of each
  item's quantised latent ``z_hat_i`` (straight-through, so the gradient reaches the encoder) with its
  collaborative embedding ``h_i`` (a SASRec's item embedding, fixed):
  ``L_CF = -1/B sum_i log( exp(<z_hat_i, h_i>) / sum_j exp(<z_hat_i, h_j>) )``;
* diversity regularisation (L_Div, :func:`diversity_loss`): the code vectors of each layer are clustered
  (size-constrained k-means, re-run at the start of every epoch); for an item with code ``c`` the code
  vector ``e_c`` is pulled toward a random other code ``e_+`` of its cluster and pushed from every other
  code: ``L_Div = -1/B sum_i log( exp(<e_c, e_+>) / sum_{j != c} exp(<e_c, e_j>) )``, averaged over layers.
  Only the codebooks receive its gradient. This spreads items over more codes (higher utilisation).

Defaults follow the official code's training script (``RQ-VAE/train_tokenizer.sh``): alpha = 0.01,
beta = 0.0001, 10 clusters, 10 k-means iterations per re-clustering; the CF embeddings come from a SASRec
whose hidden size equals the RQ-VAE latent size (the official ``Instruments-32d-sasrec.pt`` with
``e_dim = 32``).
"""
import torch
import torch.nn.functional as F

from recbole_genrec.tokenizer.base import kmeans_pp_init, sq_distances
from recbole_genrec.tokenizer.rqvae import RQVAETokenizer
from recbole_genrec.utils import GenRecError


# ---- losses ----------------------------------------------------------------------------------------
def cf_alignment_loss(quantised, cf_embeddings):
    """LETTER's L_CF (collaborative regularisation): in-batch softmax of ``<z_hat_i, h_j>`` with the item's
    own CF embedding as the target.

    ``quantised`` ``[B, d]`` (gradient flows), ``cf_embeddings`` ``[B, d]`` (row i = item i; treated as data).
    """
    logits = quantised @ cf_embeddings.detach().T
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def diversity_loss(codebook, codes, positives):
    """LETTER's L_Div (diversity regularisation) for one layer: ``codebook`` ``[K, d]``, the items' codes
    ``[B]`` and one positive code per item ``[B]`` (same cluster, not the item's own code). Logits
    ``<e_c, e_j>`` over all codes ``j != c`` (the own code is masked out), cross-entropy against the positive;
    the gradient reaches only the codebook (``e_c`` is the code vector itself, not a straight-through latent)."""
    chosen = codebook[codes]  # [B, d]
    logits = chosen @ codebook.T  # [B, K]
    own = F.one_hot(codes, codebook.shape[0]).bool()
    return F.cross_entropy(logits.masked_fill(own, float("-inf")), positives)


def sample_cluster_positives(codes, labels, generator):
    """For each code in ``codes`` ``[B]`` a uniformly drawn other code of its cluster (``labels`` ``[K]``
    gives each code's cluster; every cluster needs at least two codes). Vectorised."""
    K = labels.shape[0]
    order = torch.argsort(labels, stable=True)  # codes grouped by cluster
    sizes = torch.bincount(labels, minlength=int(labels.max()) + 1)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.empty(K, dtype=torch.long, device=labels.device)
    rank[order] = torch.arange(K, device=labels.device) - starts[labels[order]]  # position inside its cluster
    cl = labels[codes]
    u = torch.rand(codes.shape[0], generator=generator).to(codes.device)
    pick = (u * (sizes[cl] - 1).to(u.dtype)).long().clamp_max(sizes[cl] - 2)  # 0..size-2
    pick = pick + (pick >= rank[codes]).long()  # skip the item's own code
    return order[starts[cl] + pick]


# ---- size-constrained k-means of the code vectors ---------------------------------------------------
def balanced_assign(dist, capacity):
    """Assign rows of ``dist`` ``[n, C]`` to columns, column c taking at most ``capacity[c]`` rows
    (``capacity.sum() == n``): each round every free row bids for its nearest open column, each column
    keeps its closest bidders up to its remaining room, full columns close. At most C + 1 rounds."""
    n, C = dist.shape
    labels = torch.full((n,), -1, dtype=torch.long, device=dist.device)
    count = torch.zeros(C, dtype=torch.long, device=dist.device)
    while True:
        free = (labels < 0).nonzero().flatten()
        if len(free) == 0:
            return labels
        d = dist[free].masked_fill((count >= capacity)[None, :], float("inf"))
        best, choice = d.min(1)
        by_dist = torch.argsort(best, stable=True)
        order = by_dist[torch.argsort(choice[by_dist], stable=True)]  # grouped by column, nearest first
        sorted_choice = choice[order]
        bids = torch.bincount(sorted_choice, minlength=C)
        rank = torch.arange(len(order), device=dist.device) - (torch.cumsum(bids, 0) - bids)[sorted_choice]
        accept = order[rank < (capacity - count)[sorted_choice]]
        labels[free[accept]] = choice[accept]
        count += torch.bincount(choice[accept], minlength=C)


def balanced_kmeans(x, k, iters, generator):
    """k-means of ``x`` ``[n, d]`` into ``k`` clusters of (almost) equal size: ``n // k`` or ``n // k + 1``.

    The official code uses ``KMeansConstrained`` with a minimum cluster size; equal sizes give every
    cluster at least two codes, which the diversity loss needs (a positive other than the code itself).
    Returns the cluster label of each row ``[n]``; deterministic given ``generator``.
    """
    n = x.shape[0]
    capacity = torch.full((k,), n // k, dtype=torch.long, device=x.device)
    capacity[: n % k] += 1
    centers = kmeans_pp_init(x, k, generator)
    labels = None
    for _ in range(max(1, iters)):
        new = balanced_assign(sq_distances(x, centers), capacity)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        centers = x.new_zeros(k, x.shape[1]).index_add_(0, labels, x) / capacity[:, None].to(x.dtype)
    return labels


class LETTERTokenizer(RQVAETokenizer):
    """RQ-VAE + LETTER's collaborative (L_CF) and diversity (L_Div) regularisers; ``fit`` needs
    ``cf_embeddings`` ``[n, latent_dim]`` row-aligned with the item embeddings."""

    name = "letter"
    needs_cf_embeddings = True

    def __init__(self, cf_weight=0.01, div_weight=1e-4, clusters=10, cluster_iters=10, **kwargs):
        super().__init__(**kwargs)
        self.cf_weight = float(cf_weight)
        self.div_weight = float(div_weight)
        self.clusters = int(clusters)
        self.cluster_iters = int(cluster_iters)
        if self.cf_weight < 0 or self.div_weight < 0:
            raise GenRecError("letter_cf_weight and letter_div_weight must be >= 0")
        if self.clusters < 1 or 2 * self.clusters > self.codebook_size:
            raise GenRecError(f"letter_clusters must be between 1 and codebook_size // 2 = "
                              f"{self.codebook_size // 2} (each cluster needs two codes), got {self.clusters}")
        self._cf = None
        self._cluster_labels = None

    def config(self):
        return {**super().config(), "cf_weight": self.cf_weight, "div_weight": self.div_weight,
                "clusters": self.clusters, "cluster_iters": self.cluster_iters}

    def fit(self, embeddings, cf_embeddings=None):
        if cf_embeddings is None:
            raise GenRecError("the letter tokenizer needs collaborative item embeddings (cf_embeddings)")
        cf = torch.as_tensor(cf_embeddings).to(self.device, torch.float32)
        if cf.dim() != 2 or cf.shape[0] != embeddings.shape[0] or cf.shape[1] != self.latent_dim:
            raise GenRecError(f"collaborative embeddings must be [{embeddings.shape[0]}, {self.latent_dim}] "
                              f"(items x rqvae_latent_dim), got {list(cf.shape)}")
        self._cf = cf
        self._positive_gen = self.generator(1000)
        self._cluster_gen = self.generator(2000)
        try:
            return super().fit(embeddings)
        finally:
            self._cf = None  # do not keep a reference to the caller's tensor

    @torch.no_grad()
    def epoch_start(self, epoch):
        """Re-cluster every layer's code vectors (the official code re-runs its constrained k-means at the
        start of each epoch)."""
        if self.div_weight > 0:
            self._cluster_labels = [balanced_kmeans(book.detach(), self.clusters, self.cluster_iters,
                                                    self._cluster_gen) for book in self.model.codebooks]

    def extra_losses(self, rows, codes, z_q):
        out = {}
        if self.cf_weight > 0:
            out["cf"] = self.cf_weight * cf_alignment_loss(z_q, self._cf[rows])
        if self.div_weight > 0:
            books = self.model.codebooks
            terms = [diversity_loss(books[l], codes[:, l],
                                    sample_cluster_positives(codes[:, l], self._cluster_labels[l], self._positive_gen))
                     for l in range(books.shape[0])]
            out["div"] = self.div_weight * torch.stack(terms).mean()
        return out
