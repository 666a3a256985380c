"""Semantic IDs for a RecBole dataset: item text -> embeddings -> codes -> unique IDs -> prefix trie + report.

``build_semantic_ids(config, dataset)`` is the one entry point models use; everything it derives is cached
under ``cache_dir/semantic_ids/<dataset>/`` (safetensors + checksummed JSON sidecars, no pickle):
embeddings keyed by dataset, text fields, encoder and a hash of the texts; codes keyed by the embeddings'
key plus the tokenizer config. ``rebuild_semantic_ids=True`` ignores both caches.
"""
import time
from dataclasses import dataclass, field
from logging import getLogger
from pathlib import Path

import torch

from recbole_genrec.data.cache import load_tensors, save_tensors, stable_hash
from recbole_genrec.data.embeddings import item_embeddings
from recbole_genrec.data.item_text import item_texts, resolve_text_fields
from recbole_genrec.tokenizer import make_tokenizer, tokenizer_class
from recbole_genrec.tokenizer.collision import (append_index, assert_unique, collision_stats, reassign_last,
                                                row_keys)
from recbole_genrec.tokenizer.trie import PrefixTrie
from recbole_genrec.utils import GenRecError, atomic_write_json, timed_phase

COLLISION_MODES = ("append", "reassign")
# Soft assignment probabilities (SemanticIDs.soft_probs, n x K floats per layer) are kept and cached only up to this
# size: 3 GB at 1M items x 3 layers x 256 codes, which no model reads (None above it).
SOFT_PROBS_MAX_BYTES = 2**30
_DISPERSION_ELEMS = 2**24  # float64 elements per column block in prefix_dispersion (128 MB)
CODES_VERSION = 2  # bump when a tokenizer's algorithm changes: cached codes of older versions are rebuilt


@dataclass
class SemanticIDs:
    """Row ``i`` of ``codes``/``embeddings``/``soft_probs`` is RecBole internal item id ``i``; row 0 is padding
    (all-zero code, never a valid ID; excluded from uniqueness and the trie)."""

    codes: torch.Tensor  # LongTensor [item_num, L]
    codebook_sizes: list
    embeddings: torch.Tensor  # FloatTensor [item_num, d]
    soft_probs: list  # L FloatTensors [item_num, K_l] (None where a layer has none), or None above SOFT_PROBS_MAX_BYTES
    report: dict
    trie: PrefixTrie
    texts: list = field(default=None, repr=False)

    @property
    def num_layers(self):
        return self.codes.shape[1]


# ---- metrics -----------------------------------------------------------------------------------
def prefix_group_ids(codes, codebook_sizes=None):
    """``[g_0, ..., g_L]``: ``g_k[i]`` numbers the group of rows sharing row i's length-k prefix (0..G_k-1)."""
    codes = codes.long()
    sizes = codebook_sizes if codebook_sizes is not None else (
        (codes.max(0).values + 1).tolist() if codes.shape[0] else [1] * codes.shape[1])
    out = [torch.zeros(codes.shape[0], dtype=torch.long)]
    for k in range(1, codes.shape[1] + 1):
        out.append(torch.unique(row_keys(codes[:, :k], sizes[:k]), return_inverse=True)[1])
    return out


def _strip_padding(embeddings, codes, skip_padding):
    if skip_padding is None:  # auto: this package's convention puts an all-zero padding row first
        skip_padding = (codes.shape[0] > 1 and not codes[0].any() and embeddings is not None
                        and not embeddings[0].any())
    return (embeddings[1:] if embeddings is not None else None, codes[1:]) if skip_padding else (embeddings, codes)


def prefix_dispersion(embeddings, codes, skip_padding=None):
    """Mean within-prefix embedding dispersion ``[mu_0, ..., mu_L]`` (token-weighting paper, Sec. 4.1.1).

    ``mu_k = E_I[V(G_k(I))]`` with ``V(G) = 1/|G| sum_{i in G} ||u_i - mean_G u||^2`` over the groups ``G_k`` of
    items sharing a length-k ID prefix, I uniform over items. Front-Greater weights are
    ``w_k ~ max(mu_{k-1} - mu_k, 0)``, normalised to sum to L (see :func:`front_greater_weights`).
    ``skip_padding=None`` drops row 0 when it is the all-zero padding item of :class:`SemanticIDs`.
    """
    embeddings = torch.as_tensor(embeddings).cpu()  # float64 a block of columns at a time (below)
    codes = torch.as_tensor(codes).long().cpu()
    embeddings, codes = _strip_padding(embeddings, codes, skip_padding)
    n = codes.shape[0]
    if n == 0:
        return [0.0] * (codes.shape[1] + 1)
    d = embeddings.shape[1]
    # Column blocks bound the float64 working set to [n + G, block] instead of several [n, d] copies (12 GB at 1M
    # items of dimension 384); per column the sums are the same, only the sum over columns is split into blocks
    # (one block, i.e. the plain computation, up to 2**24 / d items).
    block = max(1, min(d, _DISPERSION_ELEMS // n))
    whole = embeddings.double() if block >= d else None
    blocks = lambda: [whole] if whole is not None else (  # noqa: E731
        embeddings[:, j:j + block].double() for j in range(0, d, block))
    sq = torch.zeros(n, dtype=torch.float64)
    for e in blocks():
        sq += (e * e).sum(1)
    out = []
    for g in prefix_group_ids(codes):
        G = int(g.max()) + 1
        cnt = torch.bincount(g, minlength=G).double()
        mean_norm = torch.zeros(G, dtype=torch.float64)
        for e in blocks():
            mean = torch.zeros(G, e.shape[1], dtype=torch.float64).index_add_(0, g, e).div_(cnt[:, None])
            mean_norm += (mean * mean).sum(1)
        mean_sq = torch.zeros(G, dtype=torch.float64).index_add_(0, g, sq) / cnt
        var = (mean_sq - mean_norm).clamp_min(0.0)  # V(G) = E||u||^2 - ||E u||^2
        out.append(float((cnt * var).sum() / n))  # E_I[V(G(I))] = sum_G |G|/n V(G)
    return out


def front_greater_weights(dispersion):
    """``w_k = max(mu_{k-1} - mu_k, 0)`` normalised so that ``sum_k w_k = L`` (token-weighting paper)."""
    deltas = [max(a - b, 0.0) for a, b in zip(dispersion[:-1], dispersion[1:])]
    total = sum(deltas)
    L = len(deltas)
    return [d / total * L for d in deltas] if total > 0 else [1.0] * L


def filtered_fraction(codes):
    """Average share of the remaining candidates removed when token k is revealed, per layer k=1..L:
    ``mean_I (1 - |G_k(I)| / |G_{k-1}(I)|)`` over the given rows (token-weighting paper, Table 1)."""
    codes = torch.as_tensor(codes).long().cpu()
    groups = prefix_group_ids(codes)
    sizes = [torch.bincount(g)[g].double() for g in groups]
    return [float((1.0 - sizes[k] / sizes[k - 1]).mean()) for k in range(1, len(sizes))]


def layer_usage(codes, codebook_sizes):
    """Per layer: share of the codebook in use, and the perplexity ``exp(H)`` of the code distribution."""
    util, ppl = [], []
    for j, K in enumerate(codebook_sizes):
        counts = torch.bincount(codes[:, j].long(), minlength=K).double()
        p = counts[counts > 0] / counts.sum()
        util.append(float((counts > 0).sum()) / K)
        ppl.append(float(torch.exp(-(p * p.log()).sum())))
    return util, ppl


def quality_report(embeddings, raw_codes, codes, codebook_sizes):
    """The report over real items (padding row excluded): collisions before resolution, utilisation,
    perplexity, filtered fraction per layer, prefix dispersion 0..L and the Front-Greater weights."""
    util, ppl = layer_usage(codes, codebook_sizes)
    disp = prefix_dispersion(embeddings, codes, skip_padding=False)
    return {
        "num_items": int(codes.shape[0]),
        "id_length": int(codes.shape[1]),
        "codebook_sizes": list(codebook_sizes),
        "collisions_before_resolution": collision_stats(raw_codes),
        "codebook_utilisation": util,
        "codebook_perplexity": ppl,
        "filtered_fraction_per_layer": filtered_fraction(codes),
        "prefix_dispersion": disp,
        "front_greater_weights": front_greater_weights(disp),
    }


def format_report(report):
    c = report["collisions_before_resolution"]
    pct = lambda xs: "[" + ", ".join(f"{100 * x:.1f}%" for x in xs) + "]"  # noqa: E731
    lines = [
        f"semantic IDs: {report['num_items']} items, tokenizer {report['tokenizer']['tokenizer']}, "
        f"ID length {report['id_length']}, codebook sizes {report['codebook_sizes']}",
        f"  collisions before resolution ({report['collision']}): {100 * c['collision_rate']:.2f}% of items, "
        f"largest group {c['max_items_per_code']}",
        f"  codebook utilisation per layer: {pct(report['codebook_utilisation'])}",
        f"  codebook perplexity per layer: [{', '.join(f'{p:.1f}' for p in report['codebook_perplexity'])}]",
        f"  candidates filtered per layer: {pct(report['filtered_fraction_per_layer'])}",
        f"  prefix dispersion mu_0..mu_L: [{', '.join(f'{d:.4f}' for d in report['prefix_dispersion'])}]",
        f"  Front-Greater weights: [{', '.join(f'{w:.3f}' for w in report['front_greater_weights'])}]",
    ]
    base = report.get("baseline_rqvae")
    if base:  # letter: the plain RQ-VAE with the same settings, for comparison
        bc = base["collisions_before_resolution"]
        lines.append(f"  plain RQ-VAE, same settings: collisions {100 * bc['collision_rate']:.2f}% of items "
                     f"(largest group {bc['max_items_per_code']}), "
                     f"utilisation {pct(base['codebook_utilisation'])}, perplexity "
                     f"[{', '.join(f'{p:.1f}' for p in base['codebook_perplexity'])}]")
    return "\n".join(lines)


# ---- pipeline ----------------------------------------------------------------------------------
def tokenizer_settings(config):
    """The config keys that determine the codes (validated), as a plain dict."""
    from recbole_genrec.tokenizer import TOKENIZERS

    name = str(config["tokenizer"] or "rqvae").lower()
    if name not in TOKENIZERS:
        raise GenRecError(f"unknown tokenizer {config['tokenizer']!r}: use one of {sorted(TOKENIZERS)}")
    collision = str(config["collision"] or "append").lower()
    if collision not in COLLISION_MODES:
        raise GenRecError(f"collision must be one of {list(COLLISION_MODES)}, got {config['collision']!r}")
    for key in ("num_codebooks", "codebook_size"):
        v = config[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise GenRecError(f"{key} must be a positive integer, got {v!r}")
    if config["codebook_size"] < 2:
        raise GenRecError(f"codebook_size must be at least 2, got {config['codebook_size']}")
    get = lambda k, d: d if config[k] is None else config[k]  # noqa: E731
    settings = {
        "tokenizer": name, "num_layers": config["num_codebooks"], "codebook_size": config["codebook_size"],
        "seed": int(get("seed", 2020)), "kmeans_iters": int(get("kmeans_iters", 30)),
    }
    if name in ("rqvae", "letter"):
        settings.update(latent_dim=int(get("rqvae_latent_dim", 32)),
                        hidden_dims=[int(h) for h in get("rqvae_hidden_dims", [512, 256, 128])],
                        epochs=int(get("rqvae_epochs", 100)), lr=float(get("rqvae_lr", 1e-3)),
                        batch_size=int(get("rqvae_batch_size", 256)),
                        commitment=float(get("rqvae_commitment", 0.25)))
        if settings["epochs"] < 1 or settings["latent_dim"] < 1 or settings["batch_size"] < 1:
            raise GenRecError("rqvae_epochs, rqvae_latent_dim and rqvae_batch_size must be positive")
    if name == "letter":
        settings.update(cf_weight=float(get("letter_cf_weight", 0.01)),
                        div_weight=float(get("letter_div_weight", 1e-4)),
                        clusters=int(get("letter_clusters", 10)), cluster_iters=int(get("letter_cluster_iters", 10)))
        if settings["cf_weight"] < 0 or settings["div_weight"] < 0:
            raise GenRecError("letter_cf_weight and letter_div_weight must be >= 0")
        if not 1 <= settings["clusters"] <= settings["codebook_size"] // 2:
            raise GenRecError(f"letter_clusters must be between 1 and codebook_size // 2 = "
                              f"{settings['codebook_size'] // 2}, got {settings['clusters']}")
    return settings, collision


LETTER_ONLY_SETTINGS = ("cf_weight", "div_weight", "clusters", "cluster_iters")


def plain_rqvae_settings(settings):
    """A ``letter`` tokenizer's settings minus its regularisers: the plain RQ-VAE it is compared with."""
    return {**{k: v for k, v in settings.items() if k not in LETTER_ONLY_SETTINGS}, "tokenizer": "rqvae"}


def cache_folder(config):
    return Path(config["cache_dir"] or "cache") / "semantic_ids" / str(config["dataset"]).replace("/", "_")


def fit_codes(embeddings, settings, collision, device="cpu", keep_soft=True, cf_embeddings=None):
    """Tokenise ``embeddings`` ``[n, d]`` (real items only) and resolve collisions; ``cf_embeddings``
    (``[n, d_cf]``, same rows) go to tokenizers that use them (``letter``).

    Returns ``(codes [n, L'], codebook_sizes, soft_probs, raw_codes, tokenizer)`` with unique rows.
    """
    settings = dict(settings)
    tok = make_tokenizer(settings.pop("tokenizer"), device=device, keep_soft=keep_soft, **settings)
    with timed_phase(f"tokenizer_fit:{tok.name}"):
        raw = tok.fit(embeddings, cf_embeddings=cf_embeddings)
    sizes = list(tok.codebook_sizes)
    if collision == "append":
        codes, extra = append_index(raw)
        sizes.append(extra)
        soft = list(tok.soft_probs) + [None] if tok.soft_probs is not None else None
    else:
        codes, moved = reassign_last(raw, tok.last_layer_distances, sizes[-1])
        tok.stats["reassigned_items"] = moved
        soft = tok.soft_probs
    assert_unique(codes)
    return codes, sizes, soft, raw, tok


def _pad_row(t):
    return torch.cat([t.new_zeros(1, *t.shape[1:]), t]) if t is not None else None


def _cached_or_fitted_codes(folder, code_meta, emb, n_items, settings, collision, device, rebuild, cf=None):
    """``(codes, sizes, soft, report, from_cache)`` for one tokenizer config, from the cache when valid."""
    file = folder / f"codes-{stable_hash(code_meta)}.safetensors"
    hit = None if rebuild else load_tensors(file, code_meta)
    if hit is not None:
        tensors, meta = hit
        codes = tensors.get("codes")
        ok = (codes is not None and codes.dim() == 2 and codes.shape[0] == n_items
              and codes.shape[1] == len(meta.get("codebook_sizes", [])) and not codes[0].any())
        if ok:
            sizes = meta["codebook_sizes"]
            soft = [tensors.get(f"soft_{j}") for j in range(len(sizes))]
            soft = None if all(s is None for s in soft) else soft
            assert_unique(codes[1:])
            return codes, sizes, soft, dict(meta["report"]), True
        getLogger().warning(f"cache {file} holds malformed codes; rebuilding it")

    soft_bytes = 4 * (n_items - 1) * int(settings["num_layers"]) * int(settings["codebook_size"])
    keep_soft = soft_bytes <= SOFT_PROBS_MAX_BYTES
    if not keep_soft:
        getLogger().info(f"semantic IDs: soft assignment probabilities not kept ({soft_bytes / 2**30:.1f} GiB for "
                         f"{n_items - 1} items; the limit is {SOFT_PROBS_MAX_BYTES / 2**30:.0f} GiB)")
    codes, sizes, soft, raw, tok = fit_codes(emb[1:], settings, collision, device=device, keep_soft=keep_soft,
                                             cf_embeddings=cf[1:] if cf is not None else None)
    report = quality_report(emb[1:], raw, codes, sizes)
    report.update(tokenizer=tok.config(), collision=collision, tokenizer_stats=tok.stats,
                  embedding_dim=int(emb.shape[1]), cache_file=str(file))
    codes = _pad_row(codes)
    soft = [_pad_row(s) for s in soft] if soft is not None else None
    tensors = {"codes": codes}
    for j, s in enumerate(soft or []):
        if s is not None:
            tensors[f"soft_{j}"] = s
    save_tensors(file, tensors, {**code_meta, "codebook_sizes": sizes, "report": report})
    return codes, sizes, soft, report, False


def build_semantic_ids(config, dataset):
    """Semantic IDs of every item of ``dataset`` (a RecBole ``Dataset``), loaded from the cache when valid.

    ``tokenizer: letter`` also trains (once, cached) a SASRec for the collaborative embeddings and, unless
    ``letter_report_baseline: False``, puts the plain RQ-VAE with the same settings beside it in the report
    (``report['baseline_rqvae']``; those codes are the ones ``tokenizer: rqvae`` builds and caches).
    """
    logger = getLogger()
    start = time.perf_counter()
    settings, collision = tokenizer_settings(config)
    fields = resolve_text_fields(config, dataset)
    texts = item_texts(config, dataset, fields)
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]] if dataset.iid_field in \
        dataset.field2id_token else None
    folder = cache_folder(config)
    rebuild = bool(config["rebuild_semantic_ids"])
    device = config["device"] if config["device"] is not None else "cpu"
    emb, emb_meta = item_embeddings(
        texts, folder, config["dataset"], fields, config["text_encoder"], device=device,
        batch_size=int(config["text_batch_size"] or 64), item_tokens=tokens, rebuild=rebuild)
    emb_key = Path(emb_meta["path"]).stem
    code_meta = {"kind": "semantic_ids", "codes_version": CODES_VERSION, "embeddings": emb_key, "num_items": len(texts),
                 "tokenizer": settings, "collision": collision}
    cf, cf_meta = None, None
    if tokenizer_class(settings["tokenizer"]).needs_cf_embeddings:
        from recbole_genrec.data.collab_embeddings import collab_item_embeddings

        cf, cf_meta = collab_item_embeddings(config, dataset, folder, rebuild=rebuild)
        code_meta["cf_embeddings"] = Path(cf_meta["path"]).stem
    codes, sizes, soft, report, from_cache = _cached_or_fitted_codes(
        folder, code_meta, emb, len(texts), settings, collision, device, rebuild, cf)
    report.update(text_fields=fields, text_encoder=emb_meta["encoder"])
    if cf_meta is not None:
        report["cf_embeddings"] = {k: cf_meta.get(k) for k in ("path", "from_cache", "sasrec", "train_seconds",
                                                                "epochs_trained", "best_valid_score")}
        if config["letter_report_baseline"] is not False:
            base = plain_rqvae_settings(settings)
            base_meta = {**code_meta, "tokenizer": base}
            base_meta.pop("cf_embeddings")
            *_, b_report, _ = _cached_or_fitted_codes(
                folder, base_meta, emb, len(texts), base, collision, device, rebuild)
            report["baseline_rqvae"] = {k: b_report[k] for k in (
                "collisions_before_resolution", "codebook_utilisation", "codebook_perplexity",
                "filtered_fraction_per_layer", "prefix_dispersion", "cache_file")}
    report = dict(report, from_cache=from_cache, embeddings_from_cache=emb_meta["from_cache"],
                  seconds=round(time.perf_counter() - start, 3))
    if not from_cache:
        atomic_write_json(folder / f"report-{Path(report['cache_file']).stem}.json", report)
    trie = PrefixTrie.from_codes(codes[1:], torch.arange(1, len(texts)), sizes)
    logger.info(format_report(report))
    return SemanticIDs(codes, sizes, emb, soft, report, trie, texts)
