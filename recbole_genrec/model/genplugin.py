"""GenPlugin (Yang et al., "GenPlugin: A Plug-and-Play Framework for Long-Tail Generative Recommendation with
Exposure Bias Mitigation", DASFAA 2026): ``TIGER++`` and ``LETTER++``.

The plug-in wraps a TIGER-family model (its layout, T5 backbone, token loss and trie beam search are reused
as they are) with:

* **Dual encoders, one shared decoder** (Sec. 3.1): the backbone's T5 encoder over the history's ID tokens
  (ID view) and :class:`LanguageSemanticsEncoder`, a second T5 encoder of the same size over the history's
  frozen item-text embeddings, each projected by a two-layer FFN. The backbone's decoder decodes both.
  ``L_lan`` and ``L_id`` are the backbone's own token loss (TIGER: cross-entropy; LETTER: ranking-guided).
* **Contrastive alignment** (Eq. 1-3): :func:`info_nce` both ways at item level (ID representation = sum of
  the item's token states; language representation = the item's language state; negatives = the other
  items of the batch's sequences) and at user level (mean-pooled encoder outputs ``q_u``, ``p_u``).
* **Semantic-substitution guidance** (Sec. 3.2): with probability ``1 - p1`` a batch takes the guidance path,
  where each teacher-forced decoder input token of the ID view is replaced, with probability ``1 - p2``, by
  :func:`semantic_substitutes` (softmax over the language view's top-``q`` logits, weighted embedding).
* **Distributional alignment** (Eq. 4-5): :func:`symmetric_kl` of the ``phi``-tempered views.
* **Loss** (Eq. 6): ``L_lan + L_id + lambda1 L_item + lambda2 L_user + lambda3 L_kl``.
* **Retrieval-augmented fine-tuning and inference** (Sec. 3.3): after pre-training,
  :class:`GenPluginTrainer` builds the dual-path retrieval (:mod:`recbole_genrec.data.retrieval`), re-ranks
  by ``q``, caches every user's ``q``, freezes both encoders and the token embeddings, and fine-tunes the
  decoder on the encoder states with the ``v`` retrieved users' ``q`` appended; inference does the same.

Ablations (Table 4): ``use_dsa`` (the two contrastive losses), ``use_ssg`` (substitution and L_kl),
``use_rar`` (the second stage); a loss weight of 0 also drops its term.
"""
import time
from logging import getLogger

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_genrec import distributed
from recbole_genrec.model.letter import LETTER
from recbole_genrec.model.seq2seq import set_dropout_sites, set_gradient_checkpointing, t5_config
from recbole_genrec.model.tiger import TIGER
from recbole_genrec.trainer import Trainer
from recbole_genrec.utils import GenRecError, bool_setting, int_setting, number_setting, seconds_setting


# ---- losses (pure functions, tested by hand) -------------------------------------------------------------
def info_nce(u, v, tau, groups=None):
    """One direction of Eq. 1: ``mean_i -log( exp(<u_i, v_i>/tau) / sum_j exp(<u_i, v_j>/tau) )``.

    ``u, v``: ``[N, d]``; row ``i`` of ``v`` is ``u_i``'s positive, every row of another group a negative (the
    denominator runs over the positive and those rows, as cross-entropy). Inner product, temperature ``tau``.
    ``groups`` ``[N]`` (``None``: every row its own group): rows ``j != i`` of ``i``'s group are left out of the
    denominator, because Eq. 1-3's negatives are *other* items / users, and RecBole's prefix augmentation puts
    the same item (in several sequences) and the same user (several prefixes) in one batch many times.
    """
    logits = (u.float() @ v.float().t()) / tau
    if groups is not None:
        same = groups[:, None] == groups[None, :]
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(u.shape[0], device=u.device))


def bidirectional_info_nce(a, b, tau, groups=None):
    """Eq. 2 / Eq. 3: ``l(a, b) + l(b, a)`` with :func:`info_nce` (same ``groups`` both ways)."""
    return info_nce(a, b, tau, groups) + info_nce(b, a, tau, groups)


def symmetric_kl(logits_a, logits_b, phi):
    """Eq. 4-5: ``KL(P_a || P_b) + KL(P_b || P_a)`` with ``P = softmax(z / phi)`` over the last axis, summed
    over classes and averaged over the other axes (positions of every example).

    ``logits_*``: ``[..., K]``; ``-inf`` columns (a layer with fewer codes) are absent from both distributions.
    """
    la = torch.log_softmax(logits_a.float() / phi, dim=-1)
    lb = torch.log_softmax(logits_b.float() / phi, dim=-1)
    valid = torch.isfinite(la) & torch.isfinite(lb)
    diff = torch.where(valid, la - lb, torch.zeros_like(la))
    kl = torch.where(valid, (la.exp() - lb.exp()) * diff, torch.zeros_like(la)).sum(-1)  # KL(a|b) + KL(b|a)
    return kl.mean()


def masked_mean(hidden, mask):
    """Mean of ``hidden [B, T, d]`` over the ``mask [B, T]`` positions -> ``[B, d]`` (average pooling, Eq. 3)."""
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def semantic_substitutes(lan_logits, vocab_rows, embedding, q):
    """The semantic substitute of every decoder position (Sec. 3.2): softmax over the language view's top-``q``
    logits, then the weighted mean of those tokens' input embeddings.

    Args:
        lan_logits: ``[B, P, K_max]`` per-layer logits of the language view (``-inf`` padding columns).
        vocab_rows: ``[P, K_max]`` vocabulary row of (layer, code) for those positions.
        embedding: ``[V, d]`` decoder input embedding table.
        q: tokens fused per position (capped at ``K_max``; ``-inf`` candidates get weight 0).

    Returns ``[B, P, d]``.
    """
    k = min(int(q), lan_logits.shape[-1])
    top, idx = lan_logits.topk(k, dim=-1)  # [B, P, k]
    weights = torch.softmax(top.float(), dim=-1).to(embedding.dtype)
    rows = vocab_rows[None].expand(lan_logits.shape[0], -1, -1).gather(2, idx)  # [B, P, k] token ids
    return (weights[..., None] * embedding[rows]).sum(2)


def substitute_tokens(gold, substitutes, replace_prob, generator=None):
    """Replace each of ``gold [B, P, d]``'s positions by ``substitutes [B, P, d]`` with probability
    ``replace_prob`` (= ``1 - p2``), independently per token. Returns ``(mixed [B, P, d], replaced [B, P])``."""
    replaced = torch.rand(gold.shape[:2], device=gold.device, generator=generator) < replace_prob
    return torch.where(replaced[..., None], substitutes, gold), replaced


# ---- settings ------------------------------------------------------------------------------------------
def _number(config, key, default, low, high, low_open=False, high_open=False):
    return number_setting(config, key, default, low, high, low_open, high_open)


_flag = bool_setting


class GenPluginSettings:
    """The validated GenPlugin keys (defaults and sources: ``properties/model/TIGER++.yaml``)."""

    def __init__(self, config):
        inf = float("inf")
        self.use_dsa = _flag(config, "use_dsa", True)
        self.use_ssg = _flag(config, "use_ssg", True)
        self.use_rar = _flag(config, "use_rar", True)
        self.tau = _number(config, "cl_temperature", 0.9, 0.0, inf, low_open=True)
        self.phi = _number(config, "kl_temperature", 0.85, 0.0, inf, low_open=True)
        self.item_weight = _number(config, "item_cl_weight", 0.1, 0.0, inf)
        self.user_weight = _number(config, "user_cl_weight", 0.1, 0.0, inf)
        self.kl_weight = _number(config, "kl_weight", 0.5, 0.0, inf)
        self.lan_weight = _number(config, "lan_loss_weight", 1.0, 0.0, inf)
        self.p1 = _number(config, "ssg_p1", 0.5, 0.0, 1.0)
        self.p2 = _number(config, "ssg_p2", 0.8, 0.0, 1.0)
        self.top_q = int_setting(config, "ssg_top_q", 5, 1)
        self.ssg_start_epoch = int_setting(config, "ssg_start_epoch", 10, 0)
        self.proj_hidden = int_setting(config, "lan_proj_hidden", None, 1)
        self.rar_z = int_setting(config, "rar_z", 20, 1)
        self.rar_v = int_setting(config, "rar_v", 5, 1)
        if self.rar_v > self.rar_z:
            raise GenRecError(f"rar_v={self.rar_v} exceeds rar_z={self.rar_z}: set --rar_v to at most rar_z")
        self.bm25_k1 = _number(config, "rar_bm25_k1", 1.5, 0.0, inf)
        self.bm25_b = _number(config, "rar_bm25_b", 0.75, 0.0, 1.0)
        self.rar_epochs = int_setting(config, "rar_epochs", None, 1)
        lr = config["rar_learning_rate"]
        self.rar_learning_rate = None if lr is None else _number(config, "rar_learning_rate", None, 0.0, inf,
                                                                 low_open=True)
        self.sasrec = {"model": "SASRec", "epochs": int_setting(config, "rar_sasrec_epochs", 50, 1),
                       "hidden_size": int_setting(config, "rar_sasrec_hidden", 64, 1),
                       "train_time_budget": seconds_setting(config, "rar_sasrec_time_budget")}
        encoder = config["lan_text_encoder"]
        if encoder is not None and not isinstance(encoder, str):
            raise GenRecError(f"lan_text_encoder must be a model directory or ~, got {encoder!r}")
        self.text_encoder = encoder

    def as_dict(self):
        return {k: v for k, v in vars(self).items()}


# ---- modules -------------------------------------------------------------------------------------------
class LanguageSemanticsEncoder(nn.Module):
    """Language-semantics encoder (Sec. 3.1): frozen item text embeddings ``e_i`` -> two-layer FFN ``e^_i``
    -> a T5 encoder with the backbone's size keys (``d_model``, ``d_ff``, ``num_heads``, ``d_kv``,
    ``num_encoder_layers``, ``dropout_rate``, ``attention_dropout``, ``ffn_dropout``) -> ``H_u [B, m, d_model]``.

    Args:
        text_embeddings: ``[n_items, d_text]`` (row 0 = padding), kept frozen and out of the state dict.
        hidden: width of the FFN's hidden layer.
    """

    def __init__(self, text_embeddings, config, hidden):
        super().__init__()
        from transformers import T5EncoderModel

        d_text = text_embeddings.shape[1]
        self.register_buffer("text_embeddings", text_embeddings.float(), persistent=False)
        self.projection = nn.Sequential(nn.Linear(d_text, hidden), nn.ReLU(), nn.Linear(hidden, config["d_model"]))
        cfg = t5_config(2, config)
        cfg.is_encoder_decoder = False
        cfg.use_cache = False
        self.encoder = set_gradient_checkpointing(set_dropout_sites(
            T5EncoderModel._from_config(cfg, attn_implementation=config["attn_implementation"]), config), config)

    def forward(self, items, mask):
        """``items [B, m]`` (internal item ids, 0 = padding), ``mask [B, m]`` -> ``[B, m, d_model]``."""
        x = self.projection(self.text_embeddings[items])
        return self.encoder(inputs_embeds=x, attention_mask=mask).last_hidden_state


# ---- the plug-in ---------------------------------------------------------------------------------------
class GenPluginTrainer(Trainer):
    """Two stages (Sec. 3.3): pre-training with Eq. 6, then (``use_rar``) retrieval-augmented fine-tuning of the
    decoder; each stage is RecBole's ``fit`` with early stopping on the valid metric, the second starting from
    the first's best checkpoint, with its own checkpoint file and optimizer (trainable parameters only).
    ``rar_epochs`` (default ``epochs``) and ``rar_learning_rate`` (default ``learning_rate``) set stage 2;
    ``train_time_budget`` applies to each stage. Checkpoints record the stage, so a stage-2 checkpoint resumes
    in stage 2 (``resume_checkpoint``)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.stage = "pretrain"
        self.stage_results = {}
        self.pretrain_model_file = self.saved_model_file

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        self.model.current_epoch = epoch_idx
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        terms = getattr(self.model, "last_loss_terms", None)
        if terms:
            self.logger.info(f"epoch {epoch_idx} [{self.stage}] last batch loss terms: "
                             + ", ".join(f"{k}={v:.4f}" for k, v in terms.items()))
        return loss

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        kwargs = dict(verbose=verbose, saved=saved, show_progress=show_progress, callback_fn=callback_fn)
        if self.stage == "pretrain":
            start = time.perf_counter()
            result = super().fit(train_data, valid_data, **kwargs)
            self.stage_results["pretrain"] = self._stage_record(result, start)
            if not self.model.gp.use_rar:
                self.model.genplugin_report["stages"] = self.stage_results
                return result
            if saved:
                if self.distributed:
                    distributed.barrier()  # rank 0 has written the stage-1 checkpoint
                self.load_model_weights(self.saved_model_file)
            self.enter_rar_stage(train_data, saved)
        start = time.perf_counter()
        result = super().fit(train_data, valid_data, **kwargs)
        self.stage_results["rar"] = self._stage_record(result, start)
        self.model.genplugin_report["stages"] = self.stage_results
        return result

    def _stage_record(self, result, start):
        return {"best_valid_score": float(result[0]) if result[0] is not None else None,
                "best_valid_result": dict(result[1] or {}), "seconds": round(time.perf_counter() - start, 3),
                "checkpoint": self.saved_model_file}

    def enter_rar_stage(self, train_data=None, saved=True, build=True):
        """Build retrieval and cached user states (unless resuming), freeze, fresh optimizer and early stopping."""
        gp = self.model.gp
        if build:  # several processes: rank 0 trains and caches the retrieval SASRec, the others read the cache
            with distributed.rank_zero_first():
                self.model.build_retrieval(train_data._dataset if train_data is not None else None)
        self.model.freeze_for_rar()
        self.stage = "rar"
        params = [p for p in self.model.parameters() if p.requires_grad]
        lr = gp.rar_learning_rate if gp.rar_learning_rate is not None else self.learning_rate
        self.optimizer = self._build_optimizer(params=params, learning_rate=lr)
        if getattr(self, "lr_scheduler", None) is not None:  # the trainer's LR schedule, if any: a fresh one
            self.lr_scheduler = None                           # for the new optimizer over the stage-2 epochs
        self.epochs = gp.rar_epochs if gp.rar_epochs is not None else self.config["epochs"]
        self.eval_step = min(self.config["eval_step"], self.epochs)
        self.start_epoch, self.cur_step = 0, 0
        self.best_valid_score = -float("inf") if self.valid_metric_bigger else float("inf")
        self.best_valid_result = None
        if saved:
            stem = self.pretrain_model_file[:-len(".pth")] if self.pretrain_model_file.endswith(".pth") \
                else self.pretrain_model_file
            self.saved_model_file = stem + "-rar.pth"

    def _checkpoint_state(self, epoch):
        state = super()._checkpoint_state(epoch)
        state["genplugin_stage"] = self.stage
        return state

    def resume_checkpoint(self, resume_file):
        from recbole_genrec.trainer import load_checkpoint

        if load_checkpoint(str(resume_file), map_location="cpu").get("genplugin_stage") == "rar":
            self.load_model_weights(str(resume_file))  # restores the cached retrieval state
            self.pretrain_model_file = str(resume_file)[:-len("-rar.pth")] + ".pth"
            self.enter_rar_stage(saved=True, build=False)
        super().resume_checkpoint(resume_file)


class GenPluginMixin:
    """GenPlugin over a TIGER-family model: put it before the backbone class (``class X(GenPluginMixin, TIGER)``).

    Hooks of the backbone it uses: ``layout``, ``backbone`` (``encode``, ``decode``, ``layer_logits``),
    ``encoder_input``, ``target_codes``, ``token_loss`` (L_lan and L_id), ``_sample_prefixes``,
    ``encode_for_decoding`` (retrieval augmentation at inference).
    """

    trainer_class = GenPluginTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.gp = GenPluginSettings(config)
        self.max_seq_length = int(config["MAX_ITEM_LIST_LENGTH"])
        self.eval_batch = int(config["eval_batch_size"] or 256)
        self.current_epoch = 0
        self.last_loss_terms = {}
        self.config_ref = config
        self.train_dataset = dataset  # the training split (retrieval sees nothing else)
        text_emb, text_meta = self._language_item_embeddings(config, dataset)
        hidden = self.gp.proj_hidden or int(config["d_ff"])
        self.lan_encoder = LanguageSemanticsEncoder(text_emb, config, hidden)
        self.rar_active = False
        self.register_buffer("rar_neighbors", torch.zeros(0, self.gp.rar_v, dtype=torch.long), persistent=False)
        self.register_buffer("rar_user_q", torch.zeros(0, int(config["d_model"])), persistent=False)
        self.genplugin_report = {"settings": self.gp.as_dict(), "text_embeddings": text_meta}

    # ---- language view inputs ------------------------------------------------------------------
    def _language_item_embeddings(self, config, dataset):
        """``([n_items, d_text], meta)``: the semantic-ID pipeline's text embeddings when ``lan_text_encoder`` is
        unset, else those of that local encoder directory (cached by the same pipeline). Items without text
        are a one-line error: the language view would see placeholder strings."""
        from recbole_genrec.data.item_text import items_without_text

        missing = items_without_text(config, dataset)
        if missing:
            tokens = [str(t) for t in dataset.id2token(dataset.iid_field, missing[:3])]
            raise GenRecError(f"{len(missing)} of {dataset.item_num - 1} items have no text for TIGER++/LETTER++'s "
                              f"language view (e.g. items {tokens}): add their text to the .item file or "
                              "choose other --text_fields")
        if self.gp.text_encoder is None:
            emb = getattr(self.semantic_ids, "embeddings", None)
            if emb is not None and emb.shape[0] == self.n_items and emb.dim() == 2:
                return torch.as_tensor(emb).float(), {"source": "semantic_ids", "dim": int(emb.shape[1])}
        from recbole_genrec.data.embeddings import item_embeddings
        from recbole_genrec.data.item_text import item_texts, resolve_text_fields
        from recbole_genrec.data.semantic_ids import cache_folder

        fields = resolve_text_fields(config, dataset)
        texts = item_texts(config, dataset, fields)
        tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
        emb, meta = item_embeddings(texts, cache_folder(config), config["dataset"], fields,
                                    self.gp.text_encoder or config["text_encoder"], device=config["device"] or "cpu",
                                    batch_size=int(config["text_batch_size"] or 64), item_tokens=tokens)
        return emb, {"source": "encoder", "dim": int(emb.shape[1]), "path": meta["path"],
                     "from_cache": meta["from_cache"], "encoder": meta["encoder"]}

    def _history(self, interaction):
        """``(items [B, m], item_mask [B, m])``: the history cut as the ID encoder's input (same items)."""
        seq_len = interaction[self.ITEM_SEQ_LEN]
        m = max(int(seq_len.max()) if seq_len.numel() else 1, 1)
        items = interaction[self.ITEM_SEQ][:, :m]
        return items, items != 0

    # ---- pre-training loss (Eq. 6) ----------------------------------------------------------------
    def ssg_active(self):
        return self.gp.use_ssg and self.training and self.current_epoch >= self.gp.ssg_start_epoch

    def loss_terms(self, interaction):
        """The unweighted terms of Eq. 6 present under the current switches: ``lan``, ``id`` (always), ``item``,
        ``user`` (``use_dsa`` and weight > 0), ``kl`` (``use_ssg`` and weight > 0); scalars."""
        gp = self.gp
        backbone = self.backbone
        input_ids, mask = self.encoder_input(interaction)
        codes = self.target_codes(interaction)
        dec_in = self.layout.decoder_input(codes)
        items, item_mask = self._history(interaction)

        enc_id = backbone.encode(input_ids, mask)  # C_u
        enc_lan = self.lan_encoder(items, item_mask)  # H_u
        hid_lan, _ = backbone.decode(dec_in, enc_lan, item_mask)
        logits_lan = backbone.layer_logits(hid_lan)
        terms = {"lan": self.token_loss(logits_lan, codes, interaction)}

        guided = self.ssg_active() and torch.rand(()).item() < 1.0 - gp.p1
        if guided:
            embeds, _ = self.guided_decoder_inputs(dec_in, logits_lan, 1.0 - gp.p2)
            hid_id, _ = backbone.decode(None, enc_id, mask, inputs_embeds=embeds)
        else:
            hid_id, _ = backbone.decode(dec_in, enc_id, mask)
        logits_id = backbone.layer_logits(hid_id)
        terms["id"] = self.token_loss(logits_id, codes, interaction)

        if gp.use_ssg and gp.kl_weight > 0:
            terms["kl"] = symmetric_kl(logits_lan, logits_id, gp.phi)
        if gp.use_dsa and gp.item_weight > 0:  # negatives: other items (Eq. 2), not the same item elsewhere
            g = self.item_id_states(enc_id, items.shape[1])  # [B, m, d]
            terms["item"] = bidirectional_info_nce(enc_lan[item_mask], g[item_mask], gp.tau, items[item_mask])
        if gp.use_dsa and gp.user_weight > 0:  # negatives: other users (Eq. 3), not the same user's other prefixes
            users = interaction[self.USER_ID] if self.USER_ID in interaction else None
            terms["user"] = bidirectional_info_nce(masked_mean(enc_lan, item_mask), masked_mean(enc_id, mask),
                                                   gp.tau, users)
        return terms

    def guided_decoder_inputs(self, dec_in, logits_lan, replace_prob, generator=None):
        """The ID view's decoder input under semantic-substitution guidance (Sec. 3.2).

        ``dec_in [B, P]`` is the teacher-forced input (start token, then the target's codes c_1 .. c_{P-1});
        each code c_j with j >= 2 is replaced, with probability ``replace_prob`` (= 1 - p2) per token, by the
        language view's fused top-q embedding for that position (``logits_lan[:, j-1]`` predicted c_j). The
        start token and the first code c_1 always stay ground truth, as in the official code (its loop starts
        at the second label): the first codebook is the coarsest choice, where the language view guesses worst.
        Returns ``(embeds [B, P, d], replaced [B, P - 2])``."""
        embed = self.backbone.t5.get_decoder().embed_tokens
        gold = embed(dec_in)
        P = dec_in.shape[1]
        if P <= 2:  # a single code: nothing to substitute
            return gold, torch.zeros(dec_in.shape[0], 0, dtype=torch.bool, device=dec_in.device)
        subs = semantic_substitutes(logits_lan[:, 1:P - 1], self.layout.layer_vocab_rows[1:P - 1],
                                    embed.weight, self.gp.top_q)
        mixed, replaced = substitute_tokens(gold[:, 2:], subs, replace_prob, generator=generator)
        return torch.cat([gold[:, :2], mixed], 1), replaced

    def item_id_states(self, enc_id, m):
        """``g_i`` (Eq. 2): the sum of each history item's L token states, ``[B, T, d] -> [B, m, d]``."""
        L = self.layout.num_layers
        tokens = enc_id[:, enc_id.shape[1] - m * L:]  # the user token, if any, comes first
        return tokens.reshape(enc_id.shape[0], m, L, enc_id.shape[-1]).sum(2)

    def combine(self, terms):
        """Eq. 6 from :meth:`loss_terms`' dict."""
        gp = self.gp
        weights = {"lan": gp.lan_weight, "id": 1.0, "item": gp.item_weight, "user": gp.user_weight,
                   "kl": gp.kl_weight}
        return sum(weights[k] * v for k, v in terms.items())

    def calculate_loss(self, interaction):
        interaction = self._sample_prefixes(interaction)
        if self.rar_active:
            terms = {"id_rar": self.rar_token_loss(interaction)}
            loss = terms["id_rar"]
        else:
            terms = self.loss_terms(interaction)
            loss = self.combine(terms)
        self.last_loss_terms = {k: float(v.detach()) for k, v in terms.items()}
        return loss

    # ---- retrieval augmentation (Sec. 3.3) ----------------------------------------------------------
    def augment(self, hidden, mask, users):
        """Append the ``v`` retrieved users' cached ``q`` to the encoder states: ``[B, T, d] -> [B, T + v, d]``
        (and the mask); users without retrieved neighbours (no training history) get masked slots."""
        nb = self.rar_neighbors[users]  # [B, v]
        extra = self.rar_user_q[nb].to(hidden.dtype)
        return torch.cat([hidden, extra], 1), torch.cat([mask, nb > 0], 1)

    def encode_for_decoding(self, input_ids, attention_mask, users=None):
        hidden, mask = super().encode_for_decoding(input_ids, attention_mask, users)
        if self.rar_active:
            if users is None:
                raise GenRecError("TIGER++/LETTER++ after retrieval-augmented fine-tuning decode with retrieved "
                                  "users: pass the batch's user ids (users=...) to beam_search")
            hidden, mask = self.augment(hidden, mask, users)
        return hidden, mask

    def rar_token_loss(self, interaction):
        """Stage-2 loss: the backbone's token loss of the ID view, frozen encoder, retrieved users appended."""
        input_ids, mask = self.encoder_input(interaction)
        codes = self.target_codes(interaction)
        with torch.no_grad():
            hidden = self.backbone.encode(input_ids, mask)
        hidden, mask = self.augment(hidden, mask, interaction[self.USER_ID])
        dec, _ = self.backbone.decode(self.layout.decoder_input(codes), hidden, mask)
        return self.token_loss(self.backbone.layer_logits(dec), codes, interaction)

    @torch.no_grad()
    def user_states(self, seq, seq_len, users):
        """``q_u [U, d]``: mean-pooled ID-encoder output (Eq. 3) of histories ``seq [U, T]`` (eval mode,
        batches of ``eval_batch_size``); rows with ``seq_len = 0`` are zero."""
        was = self.training
        self.eval()
        out = torch.zeros(seq.shape[0], self.rar_user_q.shape[1], device=self.rar_user_q.device)
        rows = (seq_len > 0).nonzero(as_tuple=True)[0]
        for s in range(0, rows.shape[0], self.eval_batch):
            r = rows[s:s + self.eval_batch]
            ids, mask = self.layout.encoder_input(seq[r], seq_len[r], users[r])
            out[r] = masked_mean(self.backbone.encode(ids, mask), mask).float()
        self.train(was)
        return out

    def build_retrieval(self, dataset=None):
        """Dual-path retrieval over training histories, ``q`` for every user, re-ranking; sets the RAR state."""
        from recbole_genrec.data.item_text import item_texts, resolve_text_fields
        from recbole_genrec.data.retrieval import (bm25_topk, cosine_topk, pseudo_documents, rerank_candidates,
                                                   sasrec_user_vectors, training_histories)
        from recbole_genrec.data.semantic_ids import cache_folder

        config, gp, logger = self.config_ref, self.gp, getLogger()
        dataset = dataset if dataset is not None else self.train_dataset
        device = self.rar_user_q.device
        pairs, seq, seq_len = training_histories(dataset, self.max_seq_length)
        n_users = seq.shape[0]
        valid = seq_len > 0
        valid[0] = False
        timings = {}
        start = time.perf_counter()
        texts = item_texts(config, dataset, resolve_text_fields(config, dataset))
        docs = pseudo_documents(texts, pairs, n_users)
        docs[0] = []
        content, _ = bm25_topk(docs, gp.rar_z, gp.bm25_k1, gp.bm25_b)
        timings["bm25_seconds"] = round(time.perf_counter() - start, 3)
        start = time.perf_counter()
        vectors, sas_meta = sasrec_user_vectors(config, dataset, cache_folder(config), seq, seq_len, gp.sasrec)
        collab, _ = cosine_topk(vectors, gp.rar_z, valid)
        timings["sasrec_seconds"] = round(time.perf_counter() - start, 3)
        timings["sasrec_from_cache"] = sas_meta["from_cache"]
        timings["sasrec_train_seconds"] = sas_meta.get("train_seconds")
        start = time.perf_counter()
        users = torch.arange(n_users)
        q = self.user_states(seq.to(device), seq_len.to(device), users.to(device))
        neighbors, both = rerank_candidates(content.to(device), collab.to(device), q, gp.rar_v)
        neighbors = neighbors.masked_fill(~valid.to(device)[:, None], 0)
        timings["rerank_seconds"] = round(time.perf_counter() - start, 3)
        self.set_rar_state(neighbors, q)
        self.genplugin_report["retrieval"] = {
            **timings, "users": int(valid.sum()), "z": gp.rar_z, "v": gp.rar_v,
            "both_paths_share": float(both[valid].float().mean()) if valid.any() else 0.0,
            "content_collab_overlap": float((content[:, :, None] == collab[:, None, :]).any(-1)[valid].float().mean()),
        }
        logger.info(f"GenPlugin retrieval: {self.genplugin_report['retrieval']}")
        return neighbors, q

    def set_rar_state(self, neighbors, user_q):
        """Install the retrieval state (``neighbors [n_users, v]``, ``user_q [n_users, d]``) and switch RAR on."""
        self.rar_neighbors = neighbors.long().to(self.rar_user_q.device)
        self.rar_user_q = user_q.float().to(self.rar_user_q.device)
        self.rar_active = True

    def freeze_for_rar(self):
        """Stage 2 trains the decoder blocks and its final norm (and the output head when it is not the token
        embedding table): both encoders, the projection and the token embeddings, which the encoder shares, stay
        as pre-trained, so the cached ``q`` of retrieved users stay valid."""
        for p in self.parameters():
            p.requires_grad_(False)
        t5 = self.backbone.t5
        dec = t5.get_decoder()
        modules = [*dec.block, dec.final_layer_norm]
        if t5.lm_head.weight is not t5.shared.weight:  # this transformers ties them despite tie_word_embeddings=False
            modules.append(t5.lm_head)
        for module in modules:
            for p in module.parameters():
                p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        if self.rar_active:  # frozen encoders run without dropout, as when the cached q were computed
            self.backbone.t5.get_encoder().eval()
            self.lan_encoder.eval()
        return self

    def other_parameter(self):
        out = dict(super().other_parameter())
        out["rar_active"] = bool(self.rar_active)
        if self.rar_active:
            out["rar_neighbors"] = self.rar_neighbors.cpu()
            out["rar_user_q"] = self.rar_user_q.cpu()
        return out

    def load_other_parameter(self, para):
        para = dict(para or {})
        active = para.pop("rar_active", None)
        neighbors, user_q = para.pop("rar_neighbors", None), para.pop("rar_user_q", None)
        if active and neighbors is not None:
            self.set_rar_state(neighbors, user_q)
        elif active is False:
            self.rar_active = False
        super().load_other_parameter(para)

    def result_extras(self):
        return {**super().result_extras(), "genplugin": self.genplugin_report, "rar_active": self.rar_active}


class TIGERPlusPlus(GenPluginMixin, TIGER):
    """TIGER++: GenPlugin over TIGER (``--model=TIGER++``)."""


class LETTERPlusPlus(GenPluginMixin, LETTER):
    """LETTER++: GenPlugin over LETTER-TIGER (``--model=LETTER++``): LETTER IDs, L_lan and L_id are LETTER's
    ranking-guided loss."""
