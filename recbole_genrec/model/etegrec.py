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
import hashlib
from logging import getLogger
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from recbole_genrec.model.tiger import TIGER
from recbole_genrec.tokenizer.collision import append_index
from recbole_genrec.tokenizer.trie import PrefixTrie
from recbole_genrec.trainer.alternating import PHASES, AlternatingTrainer
from recbole_genrec.utils import GenRecError, int_setting


# ---- losses (pure functions, tested by hand) ---------------------------------------------------
def code_log_probs(residuals, codebooks):
    """``log P(k | v_l)`` ``[N, L, K]`` from residuals ``[L, N, d]`` and codebooks ``[L, K, d]``:
    ``log_softmax_k(-||v_l - e^l_k||^2)`` (paper Eq. 6; the official code feeds the raw distances, sign
    flipped, to its softmax)."""
    sq = ((residuals * residuals).sum(-1, keepdim=True) - 2.0 * residuals @ codebooks.transpose(1, 2)
          + (codebooks * codebooks).sum(-1)[:, None, :])
    return torch.log_softmax(-sq, dim=-1).transpose(0, 1)


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


def first_occurrence(ids):
    """Row indices of the first occurrence of each distinct value of ``ids`` (sorted by value)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, pos, reduce="amin")


class ETEGRec(TIGER):
    trainer_class = AlternatingTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # calls _load_semantic_ids: fits/loads the RQ-VAE, derives the codes
        get = lambda k, d: d if config[k] is None else config[k]  # noqa: E731
        self.sia_weight = float(get("sia_weight", 1e-4))
        self.psa_weight = float(get("psa_weight", 3e-4))
        self.psa_temperature = float(get("psa_temperature", 0.07))
        self.vq_weight = float(get("vq_weight", 1.0))
        self.commitment = float(get("rqvae_commitment", 0.25))
        self.align_warmup_epochs = int(get("align_warmup_epochs", 10))
        if self.psa_temperature <= 0:
            raise GenRecError(f"psa_temperature must be positive, got {self.psa_temperature}")
        if min(self.sia_weight, self.psa_weight, self.vq_weight) < 0 or self.align_warmup_epochs < 0:
            raise GenRecError("sia_weight, psa_weight, vq_weight and align_warmup_epochs must be >= 0")
        sids = self.semantic_ids
        self.rqvae = sids.rqvae
        self.register_buffer("item_text_emb", sids.embeddings.float().clone(), persistent=False)
        self.register_buffer("item_codes", self.layout.codes.clone())  # persistent: checkpoints carry the IDs
        self.collision_layer_size = sids.codebook_sizes[-1]
        d_model = int(config["d_model"])
        self.seq_projector = nn.Linear(d_model, self.rqvae.codebooks.shape[-1])  # enc_adapter (SIA)
        self.pref_projector = nn.Linear(d_model, self.item_text_emb.shape[1])  # dec_adapter (PSA)
        self.phase, self.epoch = "recommender", 0
        self.refresh_log = []
        self.set_phase("recommender", 0)

    # ---- item IDs from the tokenizer ---------------------------------------------------------
    def _load_semantic_ids(self, config, dataset):
        from recbole_genrec.data.semantic_ids import tokenizer_settings

        sids = super()._load_semantic_ids(config, dataset)  # the text embeddings (its codes are not used)
        settings, collision = tokenizer_settings(config)
        if settings["tokenizer"] != "rqvae":
            raise GenRecError(f"ETEGRec learns an RQ-VAE tokenizer end to end: set --tokenizer=rqvae "
                              f"(got {settings['tokenizer']!r})")
        if collision != "append":
            raise GenRecError("ETEGRec resolves collisions with an appended index token: set --collision=append")
        emb = torch.as_tensor(sids.embeddings, dtype=torch.float32).cpu()
        if emb.dim() != 2 or emb.shape[0] != self.n_items:
            raise GenRecError(f"ETEGRec needs item embeddings [{self.n_items}, d], got {list(emb.shape)}: "
                              "delete the stale semantic-ID cache under cache_dir and rerun")
        layer_size = int_setting(config, "collision_layer_size", settings["codebook_size"])
        rqvae = self._pretrained_rqvae(config, emb, settings)
        sizes = [settings["codebook_size"]] * settings["num_layers"] + [layer_size]
        codes = self._tokenize_items(rqvae, emb, layer_size)
        trie = PrefixTrie.from_codes(codes[1:], torch.arange(1, self.n_items), sizes)
        return SimpleNamespace(codes=codes, codebook_sizes=sizes, num_layers=len(sizes), embeddings=emb,
                               report=dict(getattr(sids, "report", {}) or {}), trie=trie, rqvae=rqvae)

    def _pretrained_rqvae(self, config, emb, settings):
        """The RQ-VAE fitted on the item text embeddings (real items), cached as safetensors."""
        from recbole_genrec.data.cache import load_tensors, save_tensors, stable_hash
        from recbole_genrec.data.semantic_ids import cache_folder
        from recbole_genrec.tokenizer.rqvae import RQVAE, RQVAETokenizer

        meta = {"kind": "etegrec_rqvae", "settings": settings,
                "embeddings_sha256": hashlib.sha256(emb.numpy().tobytes()).hexdigest()}
        file = cache_folder(config) / f"etegrec-rqvae-{stable_hash(meta)}.safetensors"
        model = RQVAE(emb.shape[1], settings["hidden_dims"], settings["latent_dim"], settings["num_layers"],
                      settings["codebook_size"])
        hit = None if config["rebuild_semantic_ids"] else load_tensors(file, meta)
        if hit is not None:
            model.load_state_dict(hit[0])
            return model
        kwargs = {k: v for k, v in settings.items() if k != "tokenizer"}
        device = config["device"] if config["device"] is not None else "cpu"
        tok = RQVAETokenizer(device=device, keep_soft=False, **kwargs)
        tok.fit(emb[1:])
        model.load_state_dict({k: v.cpu() for k, v in tok.model.state_dict().items()})
        save_tensors(file, model.state_dict(), meta)
        getLogger().info(f"ETEGRec: RQ-VAE pretrained on {emb.shape[0] - 1} item embeddings, cached at {file}")
        return model

    @staticmethod
    @torch.no_grad()
    def _tokenize_items(rqvae, emb, layer_size):
        """Codes ``[n_items, L+1]`` (row 0 padding) of every item in one batched pass: residual quantisation of
        the RQ-VAE latent, then the collision index (official code: error if it exceeds the layer)."""
        was_training = rqvae.training
        rqvae.eval()
        device = rqvae.codebooks.device
        raw = rqvae.quantise(rqvae.encoder(emb[1:].to(device)))[0].cpu()
        rqvae.train(was_training)
        codes, needed = append_index(raw)
        if needed > layer_size:
            raise GenRecError(f"{needed} items share one semantic ID but the collision layer has {layer_size} "
                              f"slots: set --collision_layer_size={needed} or more (or a larger codebook_size)")
        return torch.cat([codes.new_zeros(1, codes.shape[1]), codes])

    def _install_codes(self, codes):
        """Make ``codes`` the IDs everywhere: layout codes/tokens (encoder inputs, targets), the persistent
        copy, and the trie (the per-device copies are dropped and rebuilt on next use)."""
        codes = codes.to(self.item_codes.device)
        self.layout.set_codes(codes)
        self.item_codes.copy_(codes)
        self._trie_cpu = PrefixTrie.from_codes(codes[1:].cpu(), torch.arange(1, self.n_items),
                                               self.layout.codebook_sizes)
        self._trie_by_device = {}

    def refresh_item_ids(self):
        """Re-derive every item's ID from the current tokenizer; returns how many items changed ID."""
        codes = self._tokenize_items(self.rqvae, self.item_text_emb, self.collision_layer_size)
        changed = int((codes.to(self.item_codes.device) != self.item_codes).any(1).sum())
        self._install_codes(codes)
        self.refresh_log.append({"epoch": self.epoch, "items_changed": changed})
        return changed

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load weights and install the checkpoint's codes (``item_codes``) into the layout and trie."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._install_codes(self.item_codes.clone())
        recomputed = self._tokenize_items(self.rqvae, self.item_text_emb, self.collision_layer_size)
        differ = int((recomputed.to(self.item_codes.device) != self.item_codes).any(1).sum())
        if differ:
            getLogger().warning(f"ETEGRec: {differ} item IDs in the checkpoint differ from what its tokenizer "
                                "computes now; using the checkpoint's IDs (those it was validated with)")
        return result

    # ---- phases (AlternatingTrainer protocol) --------------------------------------------------
    def phase_parameters(self, phase):
        if phase not in PHASES:
            raise GenRecError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        tokenizer = {id(p) for p in self.rqvae.parameters()}
        return [p for p in self.parameters() if (id(p) in tokenizer) == (phase == "tokenizer")]

    def set_phase(self, phase, epoch=0):
        """Freeze the other phase's parameters and select the phase's loss (``epoch`` gates SIA/PSA)."""
        if phase not in PHASES:
            raise GenRecError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        self.phase, self.epoch = phase, int(epoch)
        for name in PHASES:
            for p in self.phase_parameters(name):
                p.requires_grad_(name == phase)
        self.train(self.training)

    def train(self, mode=True):
        """The frozen half runs in eval mode (no dropout in the targets it provides)."""
        super().train(mode)
        if mode and getattr(self, "phase", None) == "tokenizer":
            for module in (self.backbone, self.seq_projector, self.pref_projector):
                module.eval()
        elif mode and hasattr(self, "rqvae"):
            self.rqvae.eval()
        return self

    # ---- training ------------------------------------------------------------------------------
    def _tokenizer_forward(self, x):
        """RQ-VAE pass for target items: residuals ``[L, N, d]``, reconstruction ``x_hat`` and L_SQ (Eq. 8-10)."""
        out = self.rqvae(x, self.commitment)
        return out.residuals, out.x_hat, out.recon + out.q_loss

    def sequence_code_log_probs(self, encoder_hidden, mask):
        """SIA's sequence side: ``z_E = MLP(mean_pool(H_E))`` (Eq. 14) -> per-layer code log-probs ``[N, L, K]``."""
        m = mask.unsqueeze(-1).to(encoder_hidden.dtype)
        pooled = (encoder_hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        latent = self.seq_projector(pooled)
        residuals = torch.stack(self.rqvae.quantise(latent)[2])
        return code_log_probs(residuals, self.rqvae.codebooks)

    def calculate_loss(self, interaction):
        """``(ce, vq, sia, psa)`` weighted parts of the phase's loss (RecBole sums and logs them)."""
        interaction = self._sample_prefixes(interaction)
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
                item_lp = code_log_probs(item_residuals, self.rqvae.codebooks)
                seq_lp = self.sequence_code_log_probs(encoder_hidden[rows], mask[rows])
                sia = self.sia_weight * sia_loss(seq_lp, item_lp)
                psa = self.psa_weight * psa_loss(self.pref_projector(decoder_hidden[rows, 0]), x_hat,
                                                 self.psa_temperature)
        return ce, vq, sia, psa

    def result_extras(self):
        out = super().result_extras()
        out["etegrec"] = {"sia_weight": self.sia_weight, "psa_weight": self.psa_weight,
                          "psa_temperature": self.psa_temperature, "vq_weight": self.vq_weight,
                          "align_warmup_epochs": self.align_warmup_epochs,
                          "collision_layer_size": self.collision_layer_size, "id_refreshes": self.refresh_log}
        return out
