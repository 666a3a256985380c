"""ETEGRec (Liu et al., "Generative Recommender with End-to-End Learnable Item Tokenization", SIGIR 2025).

TIGER's T5 recommender plus its RQ-VAE item tokenizer as a submodule, trained in alternating phases
(:class:`~recbole_genrec.trainer.alternating.AlternatingTrainer`) and tied by two alignment losses:

* **SIA**, sequence-item alignment (paper Eq. 14-15): the mean-pooled encoder output of the history,
  projected into the tokenizer's latent space (``seq_projector``, Eq. 14), and the target item's latent
  get per-layer code distributions ``P(k | v_l) = softmax_k(-||v_l - e^l_k||^2)`` (residual ``v_l`` of the
  RQ-VAE's residual quantisation, Eq. 4-6); the loss is the symmetric KL
  ``KL(P_item || P_seq) + KL(P_seq || P_item)`` (Eq. 15 sums it over the L layers; here it is averaged
  over layers and the batch's distinct targets, as the official code's ``kl_div(..., 'batchmean')`` over
  ``[N*L, K]`` rows, whose weights are calibrated to that).
* **PSA**, preference-semantic alignment (Eq. 16): the decoder's first hidden state ``h_D`` (the
  "preference" that predicts the first code), projected to the text-embedding size
  (``pref_projector``), against the RQ-VAE reconstruction ``x_hat`` of the target's text embedding:
  symmetric in-batch InfoNCE with cosine similarity and temperature ``psa_temperature`` (0.07) over
  the batch's distinct targets.

Phase losses: recommender phase ``L_GR = L_REC + mu * SIA + lambda * PSA`` (Eq. 18, tokenizer frozen;
``mu = sia_weight``, ``lambda = psa_weight``); tokenizer phase
``L_IT = vq_weight * L_SQ + mu * SIA + lambda * PSA`` (Eq. 17, L_SQ = Eq. 8-10) over the batch's
distinct target items (recommender frozen, run in eval mode). SIA/PSA start after
``align_warmup_epochs`` (official ``warm_epoch: 10``).

IDs: the tokenizer is an RQ-VAE pretrained on the item text embeddings of the semantic-ID pipeline (the
paper feeds 256-d SASRec embeddings instead, Sec. 4.1.4)
(the fitted weights are cached under ``cache_dir/etegrec``); collisions get an appended index token as in
the official code. That last layer's size is fixed at ``collision_layer_size`` (default: ``codebook_size``)
so the vocabulary never changes; a refresh that needs more is a ``GenRecError``. The codes are a
persistent buffer (``item_codes``), so a checkpoint restores exactly the IDs it was validated with;
``load_state_dict`` re-installs them into the layout and the trie.
"""
import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.model.learnable_ids import LearnableTokenizerMixin, code_log_probs, first_occurrence
from recbole_genrec.model.tiger import TIGER
from recbole_genrec.tokenizer.rqvae import residual_quantise
from recbole_genrec.trainer.alternating import AlternatingTrainer
from recbole_genrec.utils import GenRecError

__all__ = ["ETEGRec", "code_log_probs", "first_occurrence", "psa_loss", "sia_loss"]


# ---- losses (pure functions, tested by hand) ---------------------------------------------------
def sia_loss(seq_log_probs, item_log_probs):
    """Symmetric KL between the code distributions of sequences and target items, ``[N, L, K]`` log-probs,
    averaged over N and L (paper Eq. 15, which sums over L; official code's reduction)."""
    p_seq, p_item = seq_log_probs.exp(), item_log_probs.exp()
    kl_item_seq = (p_item * (item_log_probs - seq_log_probs)).sum(-1)
    kl_seq_item = (p_seq * (seq_log_probs - item_log_probs)).sum(-1)
    return (kl_item_seq + kl_seq_item).mean()


def psa_loss(preference, semantic, temperature=0.07):
    """Symmetric in-batch InfoNCE between preference ``[N, d]`` and semantic embeddings ``[N, d]`` with cosine
    similarity / ``temperature``: row i's positive is row i (paper Eq. 16)."""
    sim = F.normalize(preference, dim=-1) @ F.normalize(semantic, dim=-1).t() / temperature
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)


class ETEGRec(LearnableTokenizerMixin, TIGER):
    """The tokenizer-in-the-model machinery (pre-training, ID refresh, phases, checkpoints) is
    :class:`~recbole_genrec.model.learnable_ids.LearnableTokenizerMixin`; here: SIA, PSA and the phase losses."""

    trainer_class = AlternatingTrainer
    tokenizer_cache_kind = "etegrec_rqvae"  # unchanged since the first ETEGRec: existing caches stay valid
    tokenizer_cache_prefix = "etegrec-rqvae"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # _load_semantic_ids fits/loads the RQ-VAE and derives the codes
        get = lambda k, d: d if config[k] is None else config[k]  # noqa: E731
        self.sia_weight = float(get("sia_weight", 1e-4))
        self.psa_weight = float(get("psa_weight", 3e-4))
        self.psa_temperature = float(get("psa_temperature", 0.07))
        self.vq_weight = float(get("vq_weight", 1.0))
        self.align_warmup_epochs = int(get("align_warmup_epochs", 10))
        if self.psa_temperature <= 0:
            raise GenRecError(f"psa_temperature must be positive, got {self.psa_temperature}")
        if min(self.sia_weight, self.psa_weight, self.vq_weight) < 0 or self.align_warmup_epochs < 0:
            raise GenRecError("sia_weight, psa_weight, vq_weight and align_warmup_epochs must be >= 0")
        d_model = int(config["d_model"])
        self.seq_projector = nn.Linear(d_model, self.rqvae.codebooks.shape[-1])  # enc_adapter (SIA)
        self.pref_projector = nn.Linear(d_model, self.item_text_emb.shape[1])  # dec_adapter (PSA)
        self.set_phase("recommender", 0)

    # ---- training ------------------------------------------------------------------------------
    def sequence_code_log_probs(self, encoder_hidden, mask):
        """SIA's sequence side: ``z_E = MLP(mean_pool(H_E))`` (Eq. 14) -> per-layer code log-probs ``[N, L, K]``.
        The codebooks get SIA's gradient only in tokenizer epochs (in recommender epochs they are frozen, or,
        under SODA's ``soda_tokenizer_grad``, trained by L_SODA alone)."""
        m = mask.unsqueeze(-1).to(encoder_hidden.dtype)
        pooled = (encoder_hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        latent = self.seq_projector(pooled)
        books = self.rqvae.codebooks if self.phase == "tokenizer" else self.rqvae.codebooks.detach()
        return code_log_probs(torch.stack(residual_quantise(latent, books)[2]), books)

    def phase_loss_parts(self, interaction):
        """``((ce, vq, sia, psa), encoder_hidden, mask)``: weighted parts of the phase's loss (RecBole sums and
        logs them) for an already sampled batch, and the encoder states they used."""
        tokenizer_phase = self.phase == "tokenizer"
        align = self.epoch >= self.align_warmup_epochs and (self.sia_weight > 0 or self.psa_weight > 0)
        input_ids, mask = self.encoder_input(interaction)
        target = interaction[self.POS_ITEM_ID]
        codes = self.layout.target_codes(target)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not tokenizer_phase):
            encoder_hidden = self.backbone.encode(input_ids, mask)
            decoder_hidden, _ = self.backbone.decode(self.layout.decoder_input(codes), encoder_hidden, mask)
        zero = decoder_hidden.new_zeros(())
        ce = zero if tokenizer_phase else self.token_loss(self.backbone.layer_logits(decoder_hidden), codes,
                                                          interaction)
        vq = sia = psa = zero
        if tokenizer_phase or align:
            rows = first_occurrence(target)  # distinct targets: no false negatives in PSA (official code)
            with torch.set_grad_enabled(torch.is_grad_enabled() and tokenizer_phase):
                item_residuals, x_hat, rq_loss = self._tokenizer_forward(self.item_text_emb[target[rows]])
            if tokenizer_phase:
                vq = self.vq_weight * rq_loss
            if align:
                books = self.rqvae.codebooks if tokenizer_phase else self.rqvae.codebooks.detach()
                item_lp = code_log_probs(item_residuals, books)
                seq_lp = self.sequence_code_log_probs(encoder_hidden[rows], mask[rows])
                sia = self.sia_weight * sia_loss(seq_lp, item_lp)
                psa = self.psa_weight * psa_loss(self.pref_projector(decoder_hidden[rows, 0]), x_hat,
                                                 self.psa_temperature)
        return (ce, vq, sia, psa), encoder_hidden, mask

    def result_extras(self):
        out = super().result_extras()
        out["etegrec"] = {"sia_weight": self.sia_weight, "psa_weight": self.psa_weight,
                          "psa_temperature": self.psa_temperature, "vq_weight": self.vq_weight,
                          "align_warmup_epochs": self.align_warmup_epochs,
                          "collision_layer_size": self.collision_layer_size, "id_refreshes": self.refresh_log}
        return out

