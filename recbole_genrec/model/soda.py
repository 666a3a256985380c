"""SODA (Xue et al., "SODA: Semantic-Oriented Distributional Alignment for Generative Recommendation").

A plug-in objective for a generative recommender with an RQ-VAE tokenizer: soft code distributions over the
tokenizer's L codebooks stand in for the discrete IDs, and a BPR loss over a symmetric-KL score asks the
user's history to match the target item's distribution better than the other users' histories do.
Equation numbers are the paper's:

* ``h^y`` (Eq. 8): the target item's semantic embedding goes through the tokenizer's encoder; at each layer
  ``l`` the residual ``v_l`` of residual quantisation (Eq. 2, hard codes choose the path) gets the soft
  assignment ``p_{l,k} = softmax_k(-||v_l - e_l^k||^2 / tau)``.
* ``h^+`` (Eq. 9-10): ``r_x = MLP(AvgPool(E_R(X)))``, the recommender encoder's states mean-pooled over the
  history (padding excluded) and projected into the tokenizer's latent space, then the same soft
  quantisation. ``h^-``: per layer, the average of the ``h^+`` of the *other users'* rows in the batch.
* ``s(a, b) = -(KL(a||b) + KL(b||a)) / 2`` (Eq. 7), summed over the L layers (the KL of the product of the
  per-layer distributions); ``L_SODA = -log sigmoid(beta (s(h^+, h^y) - s(h^-, h^y)))`` (Eq. 6), averaged
  over the batch; the recommender's loss is ``L_rec + lambda L_SODA`` (Eq. 11) plus the backbone's own
  auxiliary losses.

All of it runs in float32 with autocast off, in log space (``log_softmax``; the mixture ``h^-`` by a
max-shifted matrix product), vectorised over the batch and the codebook; only the L layers of the residual
path are a loop. The pieces are pure functions (tested by hand) and one module, :class:`SODAObjective`
(the MLP plus the loss), that :class:`SODAMixin` puts on three backbones: :class:`SODAT` (TIGER + its
RQ-VAE trained in alternation), :class:`SODAL` (LETTER + the letter tokenizer trained in alternation) and
:class:`SODAE` (ETEGRec). Choices the paper leaves open are listed in ``docs/soda.md``.
"""

import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.model.etegrec import ETEGRec
from recbole_genrec.model.learnable_ids import LearnableTokenizerMixin, code_log_probs
from recbole_genrec.model.letter import LETTER
from recbole_genrec.model.tiger import TIGER
from recbole_genrec.tokenizer.rqvae import residual_quantise
from recbole_genrec.utils import GenRecError, bool_setting, number_setting


# ---- settings ------------------------------------------------------------------------------------
def _number(config, key, default, low, inclusive):
    return number_setting(config, key, default, low=low, low_open=not inclusive)


_flag = bool_setting


def soda_settings(config):
    """The SODA keys of ``config``, checked (each bad value is a one-line :class:`GenRecError`)."""
    hidden = config["soda_mlp_hidden"]
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise GenRecError(f"soda_mlp_hidden must be a positive integer or ~ (d_model), got {hidden!r}")
    return {"weight": _number(config, "soda_weight", 1e-3, 0.0, True),
            "tau": _number(config, "soda_tau", 0.1, 0.0, False),
            "beta": _number(config, "soda_beta", 10.0, 0.0, False),
            "negatives": _flag(config, "soda_negatives", True),
            "alternate": _flag(config, "soda_alternate", True),
            "tokenizer_grad": _flag(config, "soda_tokenizer_grad", False),
            "mlp_hidden": hidden}


# ---- the objective (pure functions) ------------------------------------------------------------------
def soft_code_log_probs(latent, codebooks, tau):
    """Soft code distributions in log space, ``[N, L, K]`` (Eq. 8): ``latent`` ``[N, d]`` is quantised residually
    with ``codebooks`` ``[L, K, d]`` (hard nearest codes choose the residual path, Eq. 2), and each layer's
    residual ``v_l`` gets ``log softmax_k(-||v_l - e_l^k||^2 / tau)``. Float32, autocast off. Gradients reach
    ``latent`` and (unless detached by the caller) ``codebooks``."""
    if not tau > 0:
        raise GenRecError(f"soda_tau must be > 0, got {tau}")
    with torch.autocast(device_type=latent.device.type, enabled=False):
        books = codebooks.float()
        residuals = torch.stack(residual_quantise(latent.float(), books)[2])  # [L, N, d]
        return code_log_probs(residuals, books, temperature=tau)


def symmetric_kl_score(log_a, log_b):
    """``s(a, b) = -(KL(a||b) + KL(b||a)) / 2`` summed over layers (Eq. 7), ``[N]``, from log-probabilities
    ``[N, L, K]``. Symmetric, 0 iff ``a == b``, never the log of 0 (inputs are log-probs)."""
    kl_ab = (log_a.exp() * (log_a - log_b)).sum(-1)
    kl_ba = (log_b.exp() * (log_b - log_a)).sum(-1)
    return -0.5 * (kl_ab + kl_ba).sum(-1)


def in_batch_negative_log_probs(log_p, groups=None):
    """``(log h^-, has_negative)``: for each row, the per-layer average of the distributions of the rows of
    *other* groups (users) in the batch (Sec. 2.2.2), ``[N, L, K]`` in log space, and ``[N]`` whether such a
    row exists. ``groups`` ``[N]`` (user ids; ``None``: every row its own group). Rows of the same user (other
    prefixes of the same history) are never negatives. Computed as a max-shifted ``[N, N] x [N, L*K]``
    product; the log is floored at the smallest normal float only where every other row's mass underflows."""
    n = log_p.shape[0]
    if groups is None:
        groups = torch.arange(n, device=log_p.device)
    other = groups[:, None] != groups[None, :]
    count = other.sum(1)
    weights = other.to(log_p.dtype) / count.clamp_min(1).to(log_p.dtype)[:, None]
    flat = log_p.reshape(n, -1)
    shift = flat.max(0).values.detach()
    mix = weights @ torch.exp(flat - shift)
    log_neg = torch.log(mix.clamp_min(torch.finfo(mix.dtype).tiny)) + shift
    return log_neg.view_as(log_p), count > 0


def soda_bpr_loss(log_pos, log_target, log_neg=None, beta=1.0, has_negative=None):
    """``L_SODA`` (Eq. 6), averaged over rows: ``-log sigmoid(beta (s(h^+, h^y) - s(h^-, h^y)))`` with the
    log-probs ``[N, L, K]`` of ``h^+``, ``h^y`` and ``h^-``. ``log_neg=None`` is the ``w/o neg`` ablation
    (pointwise, Table 3): ``-log sigmoid(beta s(h^+, h^y))``. Rows whose ``has_negative`` is False are left
    out; with none left the loss is 0 (still attached to the graph)."""
    s_pos = symmetric_kl_score(log_pos, log_target)
    if log_neg is None:
        return -F.logsigmoid(beta * s_pos).mean()
    per_row = -F.logsigmoid(beta * (s_pos - symmetric_kl_score(log_neg, log_target)))
    if has_negative is None:
        return per_row.mean()
    if not bool(has_negative.any()):
        return per_row.sum() * 0.0
    return per_row[has_negative].mean()


class SODAObjective(nn.Module):
    """The MLP of Eq. 10 and ``L_SODA`` of a batch.

    Args:
        d_model: width of the recommender encoder's states. latent_dim: the tokenizer's latent size.
        tau, beta: Eq. 8 temperature and Eq. 6 scale. negatives: False = ``w/o neg`` (pointwise).
        mlp_hidden: hidden width of the two-layer ReLU MLP (``None``: ``d_model``).
    """

    def __init__(self, d_model, latent_dim, tau, beta, negatives=True, mlp_hidden=None):
        super().__init__()
        hidden = int(mlp_hidden or d_model)
        self.projector = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, latent_dim))
        self.tau, self.beta, self.negatives = float(tau), float(beta), bool(negatives)

    def history_latent(self, encoder_hidden, mask):
        """``r_x = MLP(AvgPool(E_R(X)))`` (Eq. 9-10): ``[B, T, d_model]`` states and ``[B, T]`` mask -> ``[B, latent]``."""
        with torch.autocast(device_type=encoder_hidden.device.type, enabled=False):
            m = mask.unsqueeze(-1).float()
            pooled = (encoder_hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)
            return self.projector(pooled)

    def forward(self, encoder_hidden, mask, target_latent, codebooks, groups=None):
        """``(L_SODA, rows without a negative)`` for encoder states ``[B, T, d]``, mask ``[B, T]``, the target
        items' tokenizer latents ``[B, latent]``, codebooks ``[L, K, latent]`` and user ids ``[B]``."""
        log_pos = soft_code_log_probs(self.history_latent(encoder_hidden, mask), codebooks, self.tau)
        log_target = soft_code_log_probs(target_latent, codebooks, self.tau)
        if not self.negatives:
            return soda_bpr_loss(log_pos, log_target, None, self.beta), 0
        log_neg, has_negative = in_batch_negative_log_probs(log_pos, groups)
        missing = int((~has_negative).sum())
        return soda_bpr_loss(log_pos, log_target, log_neg, self.beta, has_negative), missing


# ---- the plug-in -----------------------------------------------------------------------------------
class SODAMixin:
    """Adds ``lambda * L_SODA`` to the recommender phase of a model with a learnable RQ-VAE tokenizer
    (:class:`~recbole_genrec.model.learnable_ids.LearnableTokenizerMixin`: ``rqvae``, ``item_text_emb``,
    ``phase_loss_parts``). ``calculate_loss`` returns the backbone's parts plus ``soda`` (last)."""

    def __init__(self, config, dataset):
        settings = soda_settings(config)  # checked before the (slow) tokenizer pre-training
        super().__init__(config, dataset)
        self.soda_weight = settings["weight"]
        self.soda_tokenizer_grad = settings["tokenizer_grad"]
        self.frozen_tokenizer = not settings["alternate"]
        self.soda_settings = settings
        self.soda = SODAObjective(int(config["d_model"]), self.rqvae.codebooks.shape[-1], settings["tau"],
                                  settings["beta"], settings["negatives"], settings["mlp_hidden"])
        self.soda_log = {"batches": 0, "batches_without_negatives": 0, "rows_without_negatives": 0}
        self.set_phase("recommender", 0)

    def tokenizer_trains_in_recommender_phase(self):
        return bool(getattr(self, "soda_tokenizer_grad", False))

    def soda_loss(self, interaction, encoder_hidden, mask):
        """``L_SODA`` (Eq. 6, unweighted) of a batch whose encoder states are ``encoder_hidden`` ``[B, T, d]``.
        The tokenizer (encoder for ``h^y``, codebooks for all three distributions) gets its gradient only when
        ``soda_tokenizer_grad`` is True."""
        target = interaction[self.POS_ITEM_ID]
        groups = interaction[self.USER_ID] if self.USER_ID in interaction else None
        grad = self.soda_tokenizer_grad
        books = self.rqvae.codebooks if grad else self.rqvae.codebooks.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and grad):
            target_latent = self.rqvae.encoder(self.item_text_emb[target])
        loss, missing = self.soda(encoder_hidden, mask, target_latent, books, groups)
        if self.training:
            self.soda_log["batches"] += 1
            self.soda_log["rows_without_negatives"] += missing
            self.soda_log["batches_without_negatives"] += int(missing == len(target))
        return loss

    def calculate_loss(self, interaction):
        """The backbone's phase parts, then ``lambda * L_SODA`` (recommender phase only, Eq. 11; 0 otherwise)."""
        interaction = self._sample_prefixes(interaction)
        parts, encoder_hidden, mask = self.phase_loss_parts(interaction)
        soda = parts[0].new_zeros(())
        if self.phase == "recommender" and self.soda_weight > 0 and encoder_hidden is not None:
            soda = self.soda_weight * self.soda_loss(interaction, encoder_hidden, mask)
        return (*parts, soda)

    def result_extras(self):
        out = super().result_extras()
        out["soda"] = {**self.soda_settings, **self.soda_log}
        return out


class SODAT(SODAMixin, LearnableTokenizerMixin, TIGER):
    """SODA-T: TIGER (CE over the ID tokens) + its RQ-VAE tokenizer in alternation + ``lambda L_SODA``.
    Tokenizer epochs minimise ``L_token`` (Eq. 4) over the batch's distinct target items."""

    learnable_tokenizers = ("rqvae",)


class SODAL(SODAMixin, LearnableTokenizerMixin, LETTER):
    """SODA-L: LETTER (ranking-guided loss) + the letter tokenizer in alternation + ``lambda L_SODA``.
    Tokenizer epochs minimise ``L_token`` + LETTER's ``alpha L_CF + beta L_Div`` (its own weights)."""

    learnable_tokenizers = ("letter",)


class SODAE(SODAMixin, ETEGRec):
    """SODA-E: ETEGRec (CE + SIA + PSA, its alternation) + ``lambda L_SODA`` in recommender epochs."""
