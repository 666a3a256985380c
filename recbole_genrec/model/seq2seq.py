"""Shared encoder-decoder pieces for semantic-ID generative recommenders (TIGER and its descendants).

Composition, not inheritance: a model holds a :class:`SemanticTokenLayout` (which token id means what),
a :class:`Seq2SeqBackbone` (a T5 built from a config, trained from scratch) and calls
:func:`token_cross_entropy` on the per-layer logits. TIGER++, TokenWeightedTIGER, SODA, LETTER and
ETEGRec reuse them:

* ``layout.encoder_input(item_seq, item_seq_len, user_id)`` -> ``(input_ids, attention_mask)``
* ``layout.target_tokens(item_id)`` / ``layout.decoder_input(codes)``
* ``backbone.layer_logits(decoder_hidden)`` -> ``[B, L, K_max]`` (only layer ``d``'s token range at
  position ``d``; padding columns of a smaller codebook are ``-inf``)
* ``token_cross_entropy(logits, codes, weights=None, temperature=1.0)``

Token layout (vocabulary of the T5)::

    0                      PAD, also the decoder start token
    1                      EOS (reserved; never generated, the ID length is fixed)
    offsets[d] + c         code c of layer d, offsets[0] = 2, offsets[d+1] = offsets[d] + K_d
    user_offset + h        hashed user token h in [0, num_user_tokens)
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole_genrec.utils import GenRecError, bool_setting

PAD_TOKEN = 0
EOS_TOKEN = 1
NUM_SPECIAL_TOKENS = 2


class SemanticTokenLayout(nn.Module):
    """Maps semantic-ID codes to token ids with one token range per layer (and hashed user tokens).

    Args:
        codes: ``LongTensor [n_items, L]``, row = RecBole internal item id, row 0 = padding.
        codebook_sizes: ``K_d`` per layer.
        num_user_tokens: hash buckets for the optional user token (0: no user token).
    """

    def __init__(self, codes, codebook_sizes, num_user_tokens=0):
        super().__init__()
        codes = torch.as_tensor(codes, dtype=torch.long)
        self.codebook_sizes = [int(k) for k in codebook_sizes]
        self.num_layers = len(self.codebook_sizes)
        if codes.dim() != 2 or codes.shape[1] != self.num_layers:
            raise ValueError(f"codes must be [n_items, {self.num_layers}], got {list(codes.shape)}")
        sizes = torch.tensor(self.codebook_sizes, dtype=torch.long)
        if (codes[1:] < 0).any() or (codes[1:] >= sizes).any():
            raise ValueError("a semantic-ID code lies outside its layer's codebook")
        offsets = NUM_SPECIAL_TOKENS + torch.cumsum(sizes, 0) - sizes
        self.max_codebook_size = max(self.codebook_sizes)
        self.user_offset = NUM_SPECIAL_TOKENS + int(sizes.sum())
        self.num_user_tokens = int(num_user_tokens)
        self.vocab_size = self.user_offset + self.num_user_tokens
        item_tokens = codes + offsets
        item_tokens[0] = PAD_TOKEN
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("offsets", offsets, persistent=False)
        self.register_buffer("item_tokens", item_tokens, persistent=False)
        # [L, K_max] vocabulary row of (layer d, code c); columns past K_d point at PAD and are masked.
        rows = offsets[:, None] + torch.arange(self.max_codebook_size)[None, :]
        valid = torch.arange(self.max_codebook_size)[None, :] < sizes[:, None]
        self.register_buffer("layer_vocab_rows", torch.where(valid, rows, torch.zeros_like(rows)), persistent=False)
        self.register_buffer("layer_vocab_valid", valid, persistent=False)

    @torch.no_grad()
    def set_codes(self, codes):
        """Replace every item's codes (and token ids) in place, keeping the vocabulary ranges fixed.

        For models whose tokenizer changes during training (ETEGRec): ``codes`` must have the same shape
        as before and lie inside each layer's codebook; row 0 stays padding. Buffers keep their device.
        """
        codes = torch.as_tensor(codes, dtype=torch.long, device=self.codes.device)
        if codes.shape != self.codes.shape:
            raise ValueError(f"codes must be {list(self.codes.shape)}, got {list(codes.shape)}")
        sizes = torch.tensor(self.codebook_sizes, dtype=torch.long, device=codes.device)
        if (codes[1:] < 0).any() or (codes[1:] >= sizes).any():
            raise ValueError("a semantic-ID code lies outside its layer's codebook")
        item_tokens = codes + self.offsets
        item_tokens[0] = PAD_TOKEN
        self.codes.copy_(codes)
        self.item_tokens.copy_(item_tokens)

    def encoder_input(self, item_seq, item_seq_len, user_id=None):
        """``(input_ids [B, T], attention_mask [B, T])``: optional user token, then each history item's
        L tokens in time order. RecBole's sequences are left-aligned, so the batch is cut at its longest
        history (no padding columns beyond what the batch needs)."""
        max_len = int(item_seq_len.max()) if item_seq_len.numel() else 1
        seq = item_seq[:, :max(max_len, 1)]
        tokens = self.item_tokens[seq].reshape(seq.shape[0], -1)
        if self.num_user_tokens and user_id is not None:
            user_tok = self.user_offset + torch.remainder(user_id.long(), self.num_user_tokens)
            tokens = torch.cat([user_tok[:, None], tokens], dim=1)
        return tokens, tokens != PAD_TOKEN

    def target_codes(self, item_id):
        """Codes ``[B, L]`` (per-layer code indices, not token ids) of the target items."""
        return self.codes[item_id]

    def codes_to_tokens(self, codes):
        """Per-layer codes ``[..., l]`` (first l layers) -> token ids."""
        return codes + self.offsets[: codes.shape[-1]]

    def decoder_input(self, codes):
        """Teacher forcing: ``[PAD, tok_0, ..., tok_{L-2}]`` for target codes ``[B, L]``."""
        tokens = self.codes_to_tokens(codes)
        start = torch.full_like(tokens[:, :1], PAD_TOKEN)
        return torch.cat([start, tokens[:, :-1]], dim=1)


def t5_config(vocab_size, config):
    """The ``T5Config`` of the backbone's keys (``d_model``, ``d_ff``, ``num_heads``, ...); models that add
    a second encoder of the same size (TIGER++'s language encoder) build it from the same config."""
    from transformers import T5Config

    t5_config = T5Config(
        vocab_size=vocab_size,
        d_model=config["d_model"],
        d_kv=config["d_kv"],
        d_ff=config["d_ff"],
        num_layers=config["num_encoder_layers"],
        num_decoder_layers=config["num_decoder_layers"],
        num_heads=config["num_heads"],
        dropout_rate=config["dropout_rate"],
        feed_forward_proj=config["feed_forward_proj"],
        relative_attention_num_buckets=config["relative_attention_num_buckets"],
        relative_attention_max_distance=config["relative_attention_max_distance"],
        pad_token_id=PAD_TOKEN,
        eos_token_id=EOS_TOKEN,
        decoder_start_token_id=PAD_TOKEN,
        tie_word_embeddings=False,
        use_cache=True,
    )
    t5_config.scale_decoder_outputs = False
    return t5_config


def build_t5(vocab_size, config):
    """A T5ForConditionalGeneration built from RecBole config keys (no download, random init)."""
    from transformers import T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration._from_config(t5_config(vocab_size, config),
                                                 attn_implementation=config["attn_implementation"])
    set_dropout_sites(t5, config)
    set_gradient_checkpointing(t5, config)
    return t5


def set_gradient_checkpointing(module, config):
    """``gradient_checkpointing: True``: every T5 block of ``module`` (a transformers ``PreTrainedModel``) keeps
    only its inputs in the forward pass and recomputes its activations in the backward pass (transformers'
    non-reentrant activation checkpointing; the dropout masks are replayed from the saved RNG state, so the
    gradients equal those without it). Trades peak memory for about one more forward per step. Returns ``module``.

    Raises:
        GenRecError: ``gradient_checkpointing`` is not a boolean.
    """
    if "gradient_checkpointing" in config and bool_setting(config, "gradient_checkpointing", False):
        if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x's name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return module


def _rate(config, key):
    value = config[key] if key in config else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise GenRecError(f"{key} must be a number in [0, 1) or ~ (= dropout_rate), got {value!r}")
    return float(value)


def set_dropout_sites(t5, config):
    """T5 applies ``dropout_rate`` at every site; two sites can be set apart (``~`` keeps ``dropout_rate``):

    * ``attention_dropout``: on the attention probabilities ``[B, H, T, T]`` (any rate > 0 also sends
      ``sdpa`` to its unfused math path on CPU);
    * ``ffn_dropout``: on the FFN's inner activations ``[B, T, d_ff]``.

    These two are the largest dropout masks of a step: at ``d_model`` 64 they are about a fifth of a CPU
    training step (``benchmarks/bench_tiger_training.py --profile``), so the CPU recipe can drop them and keep
    the cheap residual/embedding dropout. Returns ``t5``.
    """
    attention, ffn = _rate(config, "attention_dropout"), _rate(config, "ffn_dropout")
    for module in t5.modules():
        name = type(module).__name__
        if attention is not None and name == "T5Attention":
            module.dropout = attention
        elif ffn is not None and name in ("T5DenseActDense", "T5DenseGatedActDense"):
            module.dropout = nn.Dropout(ffn)
    return t5


def _cache_kwarg(decoder):
    """``cache`` (transformers >= 5.x; ``past_key_values`` is deprecated there and removed in 5.40) or
    ``past_key_values`` (older releases): the decoder keyword for a key/value cache."""
    import inspect

    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


class Seq2SeqBackbone(nn.Module):
    """A T5 encoder-decoder plus a per-layer output head over the layout's token ranges."""

    def __init__(self, layout, config):
        super().__init__()
        self.layout = layout
        self.t5 = build_t5(layout.vocab_size, config)

    def encode(self, input_ids, attention_mask):
        return self.t5.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def beam_decoder(self, encoder_hidden, encoder_mask):
        """The incremental decoder :func:`recbole_genrec.evaluator.beam_search.constrained_beam_search` steps."""
        return BeamDecoder(self, encoder_hidden, encoder_mask)

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, past_key_values=None, use_cache=False,
               inputs_embeds=None):
        """Decoder states ``[B, L, d]``; ``inputs_embeds [B, L, d]`` replaces ``decoder_input_ids`` (pass
        ``None`` for the ids) when the decoder inputs are not plain tokens (TIGER++'s semantic substitutes)."""
        decoder = self.t5.get_decoder()
        kwargs = {}
        if past_key_values is not None:  # passed only when there is one, under the name this transformers uses
            kwargs[_cache_kwarg(decoder)] = past_key_values
        out = decoder(
            input_ids=decoder_input_ids,
            inputs_embeds=inputs_embeds,
            encoder_hidden_states=encoder_hidden,
            encoder_attention_mask=encoder_mask,
            use_cache=use_cache,
            **kwargs,
        )
        return out.last_hidden_state, out.get(_cache_kwarg(decoder))  # the output key matches the input name

    def layer_logits(self, hidden, depth=None):
        """Logits restricted to each layer's token range.

        ``hidden [B, L, d]`` (position d predicts layer d) -> ``[B, L, K_max]``; or ``hidden [N, d]``
        with an int ``depth`` -> ``[N, K_depth]``.
        """
        weight = self.t5.lm_head.weight
        if depth is not None:
            start = int(self.layout.offsets[depth])
            return hidden @ weight[start:start + self.layout.codebook_sizes[depth]].t()
        n = hidden.shape[1]
        w = weight[self.layout.layer_vocab_rows[:n]]  # [L, K_max, d]
        logits = torch.einsum("bld,lkd->blk", hidden, w)
        return logits.masked_fill(~self.layout.layer_vocab_valid[:n], float("-inf"))

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        """Teacher-forced per-layer logits ``[B, L, K_max]``."""
        encoder_hidden = self.encode(input_ids, attention_mask)
        hidden, _ = self.decode(decoder_input_ids, encoder_hidden, attention_mask)
        return self.layer_logits(hidden)


def token_cross_entropy(logits, codes, weights=None, temperature=1.0, reduction="mean"):
    """Cross-entropy of per-layer logits ``[B, L, K_max]`` against codes ``[B, L]``.

    ``weights`` (``[L]`` or ``[B, L]``) scales each token's loss (TokenWeightedTIGER); ``temperature``
    divides the logits (LETTER). ``reduction='none'`` returns ``[B, L]``.
    """
    if temperature != 1.0:
        logits = logits / temperature
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1),
                           reduction="none").view(codes.shape)
    if weights is not None:
        loss = loss * weights
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.mean()


class BeamDecoder:
    """Incremental T5 decoding for beam search, written against the T5's own modules (eval mode).

    Why not ``t5.decoder(past_key_values=...)``: HF's cache holds the cross-attention keys/values per
    *row*, so ``B`` users x ``W`` beams would copy each user's encoder keys ``W`` times (and re-copy them on
    every beam reorder). Here the cross-attention keys/values are projected once per user and shared by
    all of that user's beams: the ``W`` beams of a user are the query axis of one attention call
    (``[B, H, W, d_kv] x [B, H, S, d_kv]``). Only the decoder's own self-attention cache (at most L tokens)
    is per beam and is reordered with the surviving parents. Numerically this is the same computation as
    ``t5.decoder`` (checked against it and against ``generate`` in the tests and the benchmark).

    ``step(depth, last_codes, parent)`` matches :func:`recbole_genrec.evaluator.beam_search.trie_beam_search`:
    it returns log-probabilities ``[B * w, K_depth]`` normalised over layer ``depth``'s token range.
    """

    def __init__(self, backbone, encoder_hidden, encoder_mask):
        self.backbone = backbone
        self.layout = backbone.layout
        dec = backbone.t5.get_decoder()
        self.dec = dec
        self.batch_size = encoder_hidden.shape[0]
        cfg = backbone.t5.config
        self.n_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        neg = torch.finfo(encoder_hidden.dtype).min
        self.cross_mask = torch.zeros(encoder_mask.shape, dtype=encoder_hidden.dtype,
                                      device=encoder_hidden.device).masked_fill(~encoder_mask, neg)[:, None, None, :]
        self.cross_kv = []
        for block in dec.block:
            attn = block.layer[1].EncDecAttention
            self.cross_kv.append((self._heads(attn.k(encoder_hidden)), self._heads(attn.v(encoder_hidden))))
        self.self_kv = [None] * len(dec.block)
        self.position_bias = dec.block[0].layer[0].SelfAttention.compute_bias(
            self.layout.num_layers, self.layout.num_layers, device=encoder_hidden.device)  # [1, H, L, L]

    def _heads(self, x):  # [B, T, H*d] -> [B, H, T, d]
        return x.view(x.shape[0], x.shape[1], self.n_heads, self.d_kv).transpose(1, 2)

    def step(self, depth, last_codes, parent):
        B = self.batch_size
        if depth == 0:
            tokens = torch.full((B,), PAD_TOKEN, dtype=torch.long, device=self.cross_mask.device)
        else:
            tokens = self.layout.offsets[depth - 1] + last_codes
            self.self_kv = [(k[parent], v[parent]) for k, v in self.self_kv]
        n = tokens.shape[0]
        w = n // B
        h = self.dec.embed_tokens(tokens)[:, None, :]  # [N, 1, d]
        bias = self.position_bias[:, :, depth:depth + 1, :depth + 1]
        for i, block in enumerate(self.dec.block):
            sa_layer = block.layer[0]
            attn = sa_layer.SelfAttention
            x = sa_layer.layer_norm(h)
            q, k, v = self._heads(attn.q(x)), self._heads(attn.k(x)), self._heads(attn.v(x))
            if depth > 0:
                k = torch.cat([self.self_kv[i][0], k], dim=2)
                v = torch.cat([self.self_kv[i][1], v], dim=2)
            self.self_kv[i] = (k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)
            h = h + attn.o(out.transpose(1, 2).reshape(n, 1, -1))
            ca_layer = block.layer[1]
            attn = ca_layer.EncDecAttention
            x = ca_layer.layer_norm(h)
            q = attn.q(x).view(B, w, self.n_heads, self.d_kv).transpose(1, 2)  # [B, H, w, d]
            ck, cv = self.cross_kv[i]
            out = F.scaled_dot_product_attention(q, ck, cv, attn_mask=self.cross_mask, scale=1.0)
            h = h + attn.o(out.transpose(1, 2).reshape(n, 1, -1))
            h = block.layer[2](h)
        h = self.dec.final_layer_norm(h)[:, 0]
        return torch.log_softmax(self.backbone.layer_logits(h, depth).float(), dim=-1)
