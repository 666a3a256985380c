"""TIGER (Rajput et al., NeurIPS 2023): generative retrieval over semantic IDs with a T5 encoder-decoder.

Input: the user's last ``MAX_ITEM_LIST_LENGTH`` items, each replaced by its L semantic-ID tokens (one
token range per layer), after an optional hashed user token. Target: the next item's L tokens,
teacher-forced cross-entropy per layer. Evaluation: trie-constrained beam search (only valid IDs),
turned into a ``[batch, n_items]`` score tensor for RecBole's metrics.

Extension points for TIGER++ / TokenWeightedTIGER / SODA / LETTER:
``encoder_input(interaction)``, ``target_codes(interaction)``, ``compute_token_logits(interaction)``
(``[B, L, K_max]``), ``token_loss(logits, codes, interaction)``, ``beam_search(input_ids, mask, beam_size)``.
"""
import time

import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_genrec.evaluator.beam_search import constrained_beam_search
from recbole_genrec.evaluator.scores import beam_scores_to_full, fill_scores, tie_order
from recbole_genrec.model.seq2seq import Seq2SeqBackbone, SemanticTokenLayout, token_cross_entropy
from recbole_genrec.trainer import Trainer
from recbole_genrec.utils import GenRecError


def load_semantic_ids(config, dataset):
    """The semantic-ID layer (helper module; cached on disk). Kept as a module function so tests and
    derived models can substitute their own codes."""
    from recbole_genrec.data.semantic_ids import build_semantic_ids

    return build_semantic_ids(config, dataset)


class TIGER(SequentialRecommender):
    input_type = InputType.POINTWISE
    trainer_class = Trainer
    autocast_eval = True  # `precision: bf16` also autocasts beam search; its scores are fp32 log-softmaxes
    accepts_recipes = True  # `--recipe=cpu` (properties/recipe/) applies to TIGER and every model derived from it

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.USER_ID = config["USER_ID_FIELD"]
        self.beam_size = int(config["beam_size"])
        max_k = max(config["topk"]) if config["topk"] else 1
        if self.beam_size < max_k:
            raise GenRecError(
                f"beam_size={self.beam_size} is smaller than max(topk)={max_k}: the beam must return at "
                f"least as many items as the largest K; set --beam_size={max_k} or more"
            )
        self.beam_batch_size = int(config["beam_batch_size"] or 256)
        self.train_prefix_keep = float(config["train_prefix_keep"] if config["train_prefix_keep"] is not None else 1.0)
        if not 0.0 < self.train_prefix_keep <= 1.0:
            raise GenRecError(f"train_prefix_keep must be in (0, 1], got {self.train_prefix_keep}")

        sids = self._load_semantic_ids(config, dataset)
        if sids.codes.shape[0] != self.n_items:
            raise GenRecError(
                f"semantic IDs cover {sids.codes.shape[0]} items but the dataset has {self.n_items}: "
                "delete the stale semantic-ID cache under cache_dir and rerun"
            )
        self.semantic_ids = sids  # kept for derived models (item embeddings, report); not in state_dict
        self.semantic_ids_report = dict(getattr(sids, "report", {}) or {})
        num_user_tokens = int(config["num_user_tokens"] or 0) if config["use_user_token"] else 0
        self.layout = SemanticTokenLayout(sids.codes, sids.codebook_sizes, num_user_tokens)
        self.backbone = Seq2SeqBackbone(self.layout, config)
        self._trie_cpu = sids.trie
        self._trie_by_device = {}
        self.last_eval_seconds = 0.0
        # unfound items are filled in the seeded raw-token order that breaks every model's ties (evaluator/scores.py)
        order = tie_order(dataset.field2id_token[dataset.iid_field], config["seed"])
        self.register_buffer("_tie_fill", fill_scores(self.n_items, order=order), persistent=False)

    def _load_semantic_ids(self, config, dataset):
        """The semantic IDs the layout is built from (called once in ``__init__``); derived models that
        derive their own codes (ETEGRec) override it."""
        return load_semantic_ids(config, dataset)

    # ---- inputs ------------------------------------------------------------------------------
    def encoder_input(self, interaction):
        user = interaction[self.USER_ID] if self.USER_ID in interaction else None
        return self.layout.encoder_input(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN], user)

    def target_codes(self, interaction):
        return self.layout.target_codes(interaction[self.POS_ITEM_ID])

    # ---- training -----------------------------------------------------------------------------
    def _sample_prefixes(self, interaction):
        """Keep a random ``train_prefix_keep`` share of the augmented prefixes of this batch."""
        if not self.training or self.train_prefix_keep >= 1.0:
            return interaction
        n = len(interaction)
        keep = torch.rand(n, device=interaction[self.ITEM_SEQ].device) < self.train_prefix_keep
        if not keep.any():
            keep[0] = True
        return interaction[keep.nonzero(as_tuple=True)[0]]

    def compute_token_logits(self, interaction):
        """Teacher-forced per-layer logits ``[B, L, K_max]`` (layer d's range at position d)."""
        input_ids, mask = self.encoder_input(interaction)
        codes = self.target_codes(interaction)
        return self.backbone(input_ids, mask, self.layout.decoder_input(codes))

    def token_loss(self, logits, codes, interaction=None):
        """The training loss on per-layer logits ``[B, L, K_max]`` and target codes ``[B, L]``; ``interaction``
        (the batch, when called from :meth:`calculate_loss`) lets derived losses read the target items."""
        return token_cross_entropy(logits, codes)

    def calculate_loss(self, interaction):
        interaction = self._sample_prefixes(interaction)
        return self.token_loss(self.compute_token_logits(interaction), self.target_codes(interaction), interaction)

    # ---- evaluation ---------------------------------------------------------------------------
    def trie_on(self, device):
        key = str(device)
        if key not in self._trie_by_device:
            moved = self._trie_cpu.to(device)
            self._trie_by_device[key] = moved if moved is not None else self._trie_cpu
        return self._trie_by_device[key]

    def encode_for_decoding(self, input_ids, attention_mask, users=None):
        """``(hidden [B, T', d], mask [B, T'])``: the encoder states the decoder attends to at inference.
        TIGER: the encoder's output; TIGER++ appends retrieved users' cached states (``users [B]``)."""
        return self.backbone.encode(input_ids, attention_mask), attention_mask

    @torch.no_grad()
    def beam_search(self, input_ids, attention_mask, beam_size=None, users=None):
        """``(items [B, W], scores [B, W])`` best first; users are processed ``beam_batch_size`` at a time.
        ``users [B]`` (optional) are handed to :meth:`encode_for_decoding`."""
        beam_size = int(beam_size or self.beam_size)
        trie = self.trie_on(input_ids.device)
        items, scores = [], []
        for start in range(0, input_ids.shape[0], self.beam_batch_size):
            sl = slice(start, start + self.beam_batch_size)
            hidden, mask = self.encode_for_decoding(input_ids[sl], attention_mask[sl],
                                                    users[sl] if users is not None else None)
            i, s = constrained_beam_search(self.backbone, input_ids[sl], mask, trie, beam_size, encoder_hidden=hidden)
            items.append(i)
            scores.append(s)
        width = max(i.shape[1] for i in items)
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        return torch.cat([pad(i, 0) for i in items]), torch.cat([pad(s, float("-inf")) for s in scores])

    @torch.no_grad()
    def full_sort_predict(self, interaction):
        start = time.perf_counter()
        input_ids, mask = self.encoder_input(interaction)
        users = interaction[self.USER_ID] if self.USER_ID in interaction else None
        items, scores = self.beam_search(input_ids, mask, users=users)
        out = beam_scores_to_full(items, scores, self.n_items, fill=self._tie_fill)
        self.last_eval_seconds += time.perf_counter() - start
        return out

    @torch.no_grad()
    def predict(self, interaction):
        scores = self.full_sort_predict(interaction)
        return scores.gather(1, interaction[self.ITEM_ID].view(-1, 1)).squeeze(1)

    def result_extras(self):
        return {
            "semantic_ids": self.semantic_ids_report,
            "beam_size": self.beam_size,
            "vocab_size": self.layout.vocab_size,
            "codebook_sizes": self.layout.codebook_sizes,
            "num_parameters": sum(p.numel() for p in self.parameters()),
            "train_prefix_keep": self.train_prefix_keep,
        }
