"""Token weights for TokenWeightedTIGER (pure functions on tensors; no model state).

Paper: "Token-Weighted Multi-Target Learning for Generative Recommenders with Curriculum Learning", Sec. 4.
Every per-target weight vector returned here sums to L (the ID length) unless stated otherwise.
"""
import math

import torch


def normalise_to_length(w, eps=0.0):
    """Rows of ``w [..., L]`` rescaled to sum to L; an all-zero row becomes all ones."""
    w = torch.as_tensor(w, dtype=torch.float64)
    L = w.shape[-1]
    total = w.sum(-1, keepdim=True)
    ones = torch.ones_like(w)
    return torch.where(total > eps, w / total.clamp_min(1e-300) * L, ones)


# ---- Front-Greater (Sec. 4.1.1) -----------------------------------------------------------------
def front_greater_from_dispersion(mu):
    """``mu = [mu_0..mu_L]`` -> ``w_k ~ max(mu_{k-1} - mu_k, 0)``, k = 1..L, summing to L."""
    mu = torch.as_tensor(mu, dtype=torch.float64)
    delta = (mu[:-1] - mu[1:]).clamp_min(0.0)
    return normalise_to_length(delta)


def front_greater_weights(embeddings, codes, skip_padding=None):
    """``(weights [L], mu [L+1])`` from item embeddings and their semantic IDs (any tokenizer)."""
    from recbole_genrec.data.semantic_ids import prefix_dispersion

    mu = prefix_dispersion(embeddings, codes, skip_padding=skip_padding)
    return front_greater_from_dispersion(mu), torch.tensor(mu, dtype=torch.float64)


# ---- Frequency (Sec. 4.1.2) ---------------------------------------------------------------------
def token_counts(target_codes, codebook_sizes):
    """``n [L, K_max]``: how often code c of layer d occurs among the training targets ``[N, L]``."""
    target_codes = torch.as_tensor(target_codes).long()
    L, K = len(codebook_sizes), max(codebook_sizes)
    n = torch.zeros(L, K, dtype=torch.float64)
    for d in range(L):
        n[d] = torch.bincount(target_codes[:, d], minlength=K)[:K].double()
    return n


def effective_number(n, beta=0.99):
    """``E_n = (1 - beta^n) / (1 - beta)`` (elementwise)."""
    n = torch.as_tensor(n, dtype=torch.float64)
    return (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n)) / (1.0 - beta)


def frequency_weights(codes, counts, beta=0.99):
    """Per-target weights ``[N, L]``: ``w ~ 1/E_n`` of each target token, each row summing to L.

    ``codes [N, L]`` are the targets to weight, ``counts [L, K_max]`` from :func:`token_counts`. A token
    never seen in training (n = 0) is treated as seen once (E_1 = 1, the largest raw weight)."""
    codes = torch.as_tensor(codes).long()
    raw = 1.0 / effective_number(counts.clamp_min(1.0), beta)  # [L, K]
    per = raw[torch.arange(codes.shape[1])[None, :], codes]  # [N, L]
    return normalise_to_length(per)


# ---- baselines (Table 3) ------------------------------------------------------------------------
def position_weights(L):
    """Pos: linearly decreasing with position, ``w_k ~ L - k`` (k = 0..L-1), summing to L."""
    return normalise_to_length(torch.arange(L, 0, -1, dtype=torch.float64))


def cft_weights(L, front_tokens=1, front_weight=2.0):
    """CFT-style front upweighting: the first ``front_tokens`` tokens weigh ``front_weight`` times the
    rest, then normalised to sum to L."""
    w = torch.ones(L, dtype=torch.float64)
    w[: max(0, min(int(front_tokens), L))] = float(front_weight)
    return normalise_to_length(w)


def _entropy_of_groups(group, p):
    """Per group: Shannon entropy (nats) of the item distribution ``p`` restricted to and renormalised in it."""
    G = int(group.max()) + 1
    mass = torch.zeros(G, dtype=torch.float64).index_add_(0, group, p)
    q = p / mass[group].clamp_min(1e-300)
    plogp = torch.where(q > 0, q * q.clamp_min(1e-300).log(), torch.zeros_like(q))
    return -torch.zeros(G, dtype=torch.float64).index_add_(0, group, plogp)


def information_gain_weights(codes, item_freq=None, floor=1e-3):
    """IGD-style weights ``[n, L]`` per item (row i = item i of ``codes [n, L]``).

    Token k of item i gets its Shannon information gain about the item given its prefix:
    ``IG_k(i) = H(I | prefix_{<k}(i)) - H(I | prefix_{<=k}(i))``, where I is distributed as ``item_freq``
    (training target counts; uniform if None) within each prefix group. Rows are floored at ``floor`` and
    normalised to sum to L. Rows with zero frequency still get weights from their groups.
    """
    from recbole_genrec.data.semantic_ids import prefix_group_ids

    codes = torch.as_tensor(codes).long()
    n, L = codes.shape
    p = torch.ones(n, dtype=torch.float64) if item_freq is None else torch.as_tensor(item_freq, dtype=torch.float64)
    p = p + 1e-9  # unseen items keep a tiny mass so that their groups are defined
    groups = prefix_group_ids(codes)
    H = [_entropy_of_groups(g, p)[g] for g in groups]  # [n] each, k = 0..L
    ig = torch.stack([(H[k] - H[k + 1]).clamp_min(0.0) for k in range(L)], 1)
    return normalise_to_length(ig + floor)


# ---- schedules (Sec. 4.2.2 and the Table 4 linear baselines) ------------------------------------
def curriculum_factors(t, c):
    """``(g_fg, g_fr, g_or)`` = ``(e^{-ct}, 1 - e^{-ct}, e^{-ct})`` multiplying ``lambda_j``."""
    d = math.exp(-float(c) * float(t))
    return d, 1.0 - d, d


def normalised_alphas(lambdas, factors=(1.0, 1.0, 1.0)):
    """``alpha_j = lambda'_j / sum lambda'``, ``lambda'_j = factor_j * lambda_j`` (tensor in, tensor out)."""
    lam = lambdas * torch.as_tensor(factors, dtype=lambdas.dtype, device=lambdas.device)
    return lam / lam.sum().clamp_min(1e-12)


def linear_progress(t, total_steps):
    return 1.0 if total_steps <= 0 else min(max(float(t) / float(total_steps), 0.0), 1.0)


def linear_fg_schedule(w_fg, progress):
    """Table 4 row 'Front-Greater': from ``w_fg`` linearly to plain CE (all ones) over training."""
    return (1.0 - progress) * w_fg + progress * torch.ones_like(w_fg)


def linear_fg_fr_schedule(w_fg, w_fr, progress):
    """Table 4 row '+ Frequency': Front-Greater -> plain CE over the first half, CE -> Frequency over the
    second half. ``w_fg [L]`` (or ``[B, L]``), ``w_fr [B, L]``."""
    if progress <= 0.5:
        s = progress / 0.5
        return ((1.0 - s) * w_fg + s * torch.ones_like(w_fg)).expand_as(w_fr)
    s = (progress - 0.5) / 0.5
    return (1.0 - s) * torch.ones_like(w_fr) + s * w_fr
