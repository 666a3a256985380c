"""A TIGER-family model that holds its item tokenizer (an RQ-VAE) and trains it in alternating phases.

Shared by ETEGRec and SODA (SODA-T, SODA-L, SODA-E): :class:`LearnableTokenizerMixin` goes in front of
:class:`~recbole_genrec.model.tiger.TIGER` (or a TIGER subclass such as LETTER) and implements the
model side of :class:`~recbole_genrec.trainer.alternating.AlternatingTrainer`:

* the RQ-VAE is pre-trained on the item text embeddings of the semantic-ID pipeline (``tokenizer: rqvae``,
  TIGER's Eq. 2 loss; ``tokenizer: letter`` adds LETTER's collaborative and diversity regularisers and needs
  SASRec item embeddings), cached under ``cache_dir/semantic_ids/<dataset>/``;
* item IDs are the RQ-VAE's residual codes plus an appended collision index whose layer size is fixed at
  ``collision_layer_size`` (default ``codebook_size``) so the vocabulary never changes; ``refresh_item_ids``
  re-derives them after each tokenizer epoch; the codes are a persistent buffer (``item_codes``) so a
  checkpoint restores the IDs it was validated with;
* ``phase_parameters`` / ``set_phase`` split the parameters into the tokenizer (the RQ-VAE) and the
  recommender (everything else) and freeze the other phase (which also runs in eval mode);
* :meth:`LearnableTokenizerMixin.phase_loss_parts`: the default phase losses, TIGER's (or the backbone's)
  ``token_loss`` in recommender epochs, ``L_token`` (+ LETTER's regularisers) over the batch's distinct
  target items in tokenizer epochs. ETEGRec overrides it with its own (SIA/PSA).
"""
import hashlib
from logging import getLogger
from types import SimpleNamespace

import torch

from recbole_genrec.tokenizer.collision import append_index
from recbole_genrec.tokenizer.trie import PrefixTrie
from recbole_genrec.trainer.alternating import PHASES, AlternatingTrainer
from recbole_genrec.utils import GenRecError, int_setting


def code_log_probs(residuals, codebooks, temperature=1.0):
    """``log P(k | v_l)`` ``[N, L, K]`` from residuals ``[L, N, d]`` and codebooks ``[L, K, d]``:
    ``log_softmax_k(-||v_l - e^l_k||^2 / temperature)`` (ETEGRec Eq. 6 with temperature 1; SODA Eq. 8).
    Computed in float32 whatever the inputs' dtype (and outside autocast)."""
    with torch.autocast(device_type=residuals.device.type, enabled=False):
        r, c = residuals.float(), codebooks.float()
        sq = ((r * r).sum(-1, keepdim=True) - 2.0 * r @ c.transpose(1, 2) + (c * c).sum(-1)[:, None, :])
        return torch.log_softmax(-sq.clamp_min(0.0) / temperature, dim=-1).transpose(0, 1)


def first_occurrence(ids):
    """Row indices of the first occurrence of each distinct value of ``ids`` (sorted by value)."""
    uniq, inverse = torch.unique(ids, return_inverse=True)
    pos = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, pos, reduce="amin")


def load_cf_embeddings(config, dataset):
    """Collaborative (SASRec) item embeddings ``[n_items, rqvae_latent_dim]`` for the letter tokenizer (cached;
    a module function so tests can substitute their own)."""
    from recbole_genrec.data.collab_embeddings import collab_item_embeddings
    from recbole_genrec.data.semantic_ids import cache_folder

    return collab_item_embeddings(config, dataset, cache_folder(config))[0]


class LearnableTokenizerMixin:
    """Put in front of TIGER (or a subclass) in the bases; its ``__init__`` runs the backbone's, then sets up
    the tokenizer (``rqvae``, ``item_text_emb``, ``item_codes``, ...)."""

    learnable_tokenizers = ("rqvae",)  # tokenizer names this model accepts (``tokenizer`` config key)
    tokenizer_cache_kind = "learnable_rqvae"  # cache key kind and file-name prefix of the pre-trained RQ-VAE
    tokenizer_cache_prefix = "learnable-rqvae"
    frozen_tokenizer = False  # True: AlternatingTrainer never runs a tokenizer epoch (decoupled training)
    trainer_class = AlternatingTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)  # the backbone's __init__ calls _load_semantic_ids (below)
        self._init_learnable_tokenizer(config)

    def _init_learnable_tokenizer(self, config):
        sids = self.semantic_ids
        self.rqvae = sids.rqvae
        self.tokenizer_name = sids.tokenizer_settings["tokenizer"]
        self.tokenizer_settings = sids.tokenizer_settings
        self.commitment = float(sids.tokenizer_settings.get("commitment", 0.25))
        self.register_buffer("item_text_emb", sids.embeddings.float().clone(), persistent=False)
        self.register_buffer("item_codes", self.layout.codes.clone())  # persistent: checkpoints carry the IDs
        if sids.cf is not None:
            self.register_buffer("item_cf_emb", sids.cf.float().clone(), persistent=False)
        self.collision_layer_size = sids.codebook_sizes[-1]
        seed = int(config["seed"] if config["seed"] is not None else 2020)
        self._cluster_gen = torch.Generator().manual_seed(seed + 2000)  # LETTER's re-clustering (as its tokenizer)
        self._positive_gen = torch.Generator().manual_seed(seed + 1000)
        self._cluster_labels = None
        self.phase, self.epoch = "recommender", 0
        self.refresh_log = []

    # ---- item IDs from the tokenizer ---------------------------------------------------------
    def _load_semantic_ids(self, config, dataset):
        from recbole_genrec.data.semantic_ids import tokenizer_settings

        name = type(self).__name__
        sids = super()._load_semantic_ids(config, dataset)  # the text embeddings (its codes are not used)
        settings, collision = tokenizer_settings(config)
        if settings["tokenizer"] not in self.learnable_tokenizers:
            raise GenRecError(f"{name} learns an RQ-VAE tokenizer end to end: set --tokenizer="
                              f"{self.learnable_tokenizers[0]} (got {settings['tokenizer']!r})")
        if collision != "append":
            raise GenRecError(f"{name} resolves collisions with an appended index token: set --collision=append")
        emb = torch.as_tensor(sids.embeddings, dtype=torch.float32).cpu()
        if emb.dim() != 2 or emb.shape[0] != self.n_items:
            raise GenRecError(f"{name} needs item embeddings [{self.n_items}, d], got {list(emb.shape)}: "
                              "delete the stale semantic-ID cache under cache_dir and rerun")
        layer_size = int_setting(config, "collision_layer_size", settings["codebook_size"])
        cf = None
        if settings["tokenizer"] == "letter":
            cf = torch.as_tensor(load_cf_embeddings(config, dataset), dtype=torch.float32).cpu()
            if cf.shape != (self.n_items, settings["latent_dim"]):
                raise GenRecError(f"collaborative embeddings must be [{self.n_items}, {settings['latent_dim']}] "
                                  f"(items x rqvae_latent_dim), got {list(cf.shape)}")
        rqvae = self._pretrained_rqvae(config, emb, settings, cf)
        sizes = [settings["codebook_size"]] * settings["num_layers"] + [layer_size]
        codes = self._tokenize_items(rqvae, emb, layer_size)
        trie = PrefixTrie.from_codes(codes[1:], torch.arange(1, self.n_items), sizes)
        return SimpleNamespace(codes=codes, codebook_sizes=sizes, num_layers=len(sizes), embeddings=emb,
                               report=dict(getattr(sids, "report", {}) or {}), trie=trie, rqvae=rqvae, cf=cf,
                               tokenizer_settings=settings)

    def _pretrained_rqvae(self, config, emb, settings, cf=None):
        """The RQ-VAE fitted on the item text embeddings (real items; the letter tokenizer also on ``cf``),
        cached as safetensors."""
        from recbole_genrec.data.cache import load_tensors, save_tensors, stable_hash
        from recbole_genrec.data.semantic_ids import cache_folder
        from recbole_genrec.tokenizer import make_tokenizer
        from recbole_genrec.tokenizer.rqvae import RQVAE

        meta = {"kind": self.tokenizer_cache_kind, "settings": settings,
                "embeddings_sha256": hashlib.sha256(emb.numpy().tobytes()).hexdigest()}
        if cf is not None:
            meta["cf_sha256"] = hashlib.sha256(cf.numpy().tobytes()).hexdigest()
        file = cache_folder(config) / f"{self.tokenizer_cache_prefix}-{stable_hash(meta)}.safetensors"
        model = RQVAE(emb.shape[1], settings["hidden_dims"], settings["latent_dim"], settings["num_layers"],
                      settings["codebook_size"])
        hit = None if config["rebuild_semantic_ids"] else load_tensors(file, meta)
        if hit is not None:
            model.load_state_dict(hit[0])
            return model
        kwargs = {k: v for k, v in settings.items() if k != "tokenizer"}
        device = config["device"] if config["device"] is not None else "cpu"
        tok = make_tokenizer(settings["tokenizer"], device=device, keep_soft=False, **kwargs)
        tok.fit(emb[1:], cf_embeddings=cf[1:] if cf is not None else None)
        model.load_state_dict({k: v.cpu() for k, v in tok.model.state_dict().items()})
        save_tensors(file, model.state_dict(), meta)
        getLogger().info(f"{type(self).__name__}: {settings['tokenizer']} tokenizer pretrained on "
                         f"{emb.shape[0] - 1} item embeddings, cached at {file}")
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

    def compute_item_ids(self):
        """Every item's ID from the current tokenizer: a long tensor shaped like ``item_codes``."""
        return self._tokenize_items(self.rqvae, self.item_text_emb, self.collision_layer_size)

    def refresh_item_ids(self, codes=None):
        """Re-derive every item's ID from the current tokenizer (or install ``codes``, the result of
        :meth:`compute_item_ids` on another rank); returns how many items changed ID."""
        if codes is None:
            codes = self.compute_item_ids()
        differs = codes.to(self.item_codes.device) != self.item_codes  # [n_items, L]
        changed = int(differs.any(1).sum())
        self._install_codes(codes)
        # per token position (codebook levels, then the collision index): the coarse levels are what the
        # recommender's first decoding steps depend on; the finest level churns most (docs/soda.md#id-churn)
        self.refresh_log.append({"epoch": self.epoch, "items_changed": changed,
                                 "changed_per_level": [int(c) for c in differs.sum(0)]})
        return changed

    def load_state_dict(self, state_dict, strict=True, assign=False):
        """Load weights and install the checkpoint's codes (``item_codes``) into the layout and trie."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._install_codes(self.item_codes.clone())
        recomputed = self._tokenize_items(self.rqvae, self.item_text_emb, self.collision_layer_size)
        differ = int((recomputed.to(self.item_codes.device) != self.item_codes).any(1).sum())
        if differ:
            getLogger().warning(f"{type(self).__name__}: {differ} item IDs in the checkpoint differ from what its "
                                "tokenizer computes now; using the checkpoint's IDs (those it was validated with)")
        return result

    # ---- phases (AlternatingTrainer protocol) --------------------------------------------------
    def tokenizer_trains_in_recommender_phase(self):
        """Whether the recommender phase also updates the tokenizer (SODA's ``soda_tokenizer_grad``)."""
        return False

    def phase_parameters(self, phase):
        if phase not in PHASES:
            raise GenRecError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        tokenizer = {id(p) for p in self.rqvae.parameters()}
        if phase == "tokenizer":
            return [p for p in self.parameters() if id(p) in tokenizer]
        both = self.tokenizer_trains_in_recommender_phase()
        return [p for p in self.parameters() if both or id(p) not in tokenizer]

    def set_phase(self, phase, epoch=0):
        """Freeze the other phase's parameters and select the phase's loss (``epoch`` lets models schedule)."""
        if phase not in PHASES:
            raise GenRecError(f"phase must be one of {list(PHASES)}, got {phase!r}")
        self.phase, self.epoch = phase, int(epoch)
        trained = {id(p) for p in self.phase_parameters(phase)}
        for p in self.parameters():
            p.requires_grad_(id(p) in trained)
        if phase == "tokenizer" and self._letter_weight("div_weight") > 0:
            self._recluster_codebooks()
        self.train(self.training)

    def train(self, mode=True):
        """The frozen half runs in eval mode (no dropout in the targets it provides)."""
        super().train(mode)
        if mode and getattr(self, "phase", None) == "tokenizer":
            for module in self.children():
                if module is not self.rqvae:
                    module.eval()
        elif mode and hasattr(self, "rqvae"):
            self.rqvae.eval()
        return self

    # ---- losses ----------------------------------------------------------------------------------
    def _tokenizer_forward(self, x):
        """RQ-VAE pass for target items: residuals ``[L, N, d]``, reconstruction ``x_hat`` and ``L_token``
        (reconstruction + quantisation loss: TIGER Eq. 2, ETEGRec Eq. 8-10, SODA Eq. 4)."""
        out = self.rqvae(x, self.commitment)
        return out.residuals, out.x_hat, out.recon + out.q_loss

    def _letter_weight(self, key):
        return float(self.tokenizer_settings.get(key, 0.0)) if getattr(self, "tokenizer_name", None) == "letter" \
            else 0.0

    @torch.no_grad()
    def _recluster_codebooks(self):
        """LETTER's diversity regulariser re-clusters each layer's code vectors before every tokenizer epoch."""
        from recbole_genrec.tokenizer.letter import balanced_kmeans

        s = self.tokenizer_settings
        self._cluster_labels = [balanced_kmeans(book.detach(), s["clusters"], s["cluster_iters"], self._cluster_gen)
                                for book in self.rqvae.codebooks]

    def tokenizer_loss(self, items):
        """``(L_token, LETTER regularisers)`` over ``items`` ``[N]`` (distinct ids): Eq. 4 of SODA; for the letter
        tokenizer also ``alpha * L_CF + beta * L_Div`` (as in its pre-training; 0 for plain RQ-VAE)."""
        from recbole_genrec.tokenizer.letter import cf_alignment_loss, diversity_loss, sample_cluster_positives

        out = self.rqvae(self.item_text_emb[items], self.commitment)
        reg = out.recon.new_zeros(())
        cf_w, div_w = self._letter_weight("cf_weight"), self._letter_weight("div_weight")
        if cf_w > 0 and items.shape[0] > 1:
            reg = reg + cf_w * cf_alignment_loss(out.z_st, self.item_cf_emb[items])
        if div_w > 0:
            if self._cluster_labels is None:
                self._recluster_codebooks()
            books = self.rqvae.codebooks
            terms = [diversity_loss(books[l], out.codes[:, l], sample_cluster_positives(
                out.codes[:, l], self._cluster_labels[l].to(out.codes.device), self._positive_gen))
                for l in range(books.shape[0])]
            reg = reg + div_w * torch.stack(terms).mean()
        return out.recon + out.q_loss, reg

    def phase_loss_parts(self, interaction):
        """``(parts, encoder_hidden, encoder_mask)`` of this phase for an already sampled batch.

        Recommender phase: parts ``(L_rec, 0, 0)`` with the backbone's ``token_loss`` (TIGER: CE, LETTER: its
        ranking-guided loss); tokenizer phase: ``(0, L_token, regularisers)`` over the batch's distinct
        target items, and no recommender forward (``encoder_hidden`` is then ``None``).
        """
        target = interaction[self.POS_ITEM_ID]
        if self.phase == "tokenizer":
            token, reg = self.tokenizer_loss(target[first_occurrence(target)])
            return (token.new_zeros(()), token, reg), None, None
        input_ids, mask = self.encoder_input(interaction)
        codes = self.layout.target_codes(target)
        encoder_hidden = self.backbone.encode(input_ids, mask)
        decoder_hidden, _ = self.backbone.decode(self.layout.decoder_input(codes), encoder_hidden, mask)
        rec = self.token_loss(self.backbone.layer_logits(decoder_hidden), codes, interaction)
        zero = rec.new_zeros(())
        return (rec, zero, zero), encoder_hidden, mask

    def calculate_loss(self, interaction):
        return self.phase_loss_parts(self._sample_prefixes(interaction))[0]

    def result_extras(self):
        out = super().result_extras()
        out["learnable_tokenizer"] = {"tokenizer": self.tokenizer_name, "collision_layer_size": self.collision_layer_size,
                                      "frozen": bool(self.frozen_tokenizer), "id_refreshes": self.refresh_log}
        return out
