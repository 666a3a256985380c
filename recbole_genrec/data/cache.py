"""Pickle-free tensor cache: a ``.safetensors`` file plus a JSON sidecar holding its SHA-256.

Both files are written through a temp file and a rename (data first, sidecar last), so a reader sees
either a complete, checksummed pair or no valid entry. A missing, corrupt or stale entry loads as
``None`` and the caller rebuilds it.
"""
import hashlib
import json
from logging import getLogger
from pathlib import Path

from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from recbole_genrec.utils import atomic_write_bytes, atomic_write_json

FORMAT_VERSION = 1


def sha256_bytes(data):
    return hashlib.sha256(data).hexdigest()


def stable_hash(obj, length=16):
    """Short SHA-256 of a JSON-able object (keys sorted), for cache keys."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))[:length]


def sidecar_path(path):
    path = Path(path)
    return path.with_name(path.name + ".json")


def save_tensors(path, tensors, meta):
    """Write ``{name: tensor}`` to ``path`` and ``meta`` (+ checksum) to ``path.json``, both atomically."""
    data = st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
    atomic_write_bytes(path, data)
    atomic_write_json(sidecar_path(path), {**meta, "format_version": FORMAT_VERSION,
                                          "file": Path(path).name, "sha256": sha256_bytes(data)})


def load_tensors(path, expect):
    """``(tensors, meta)`` if ``path`` exists, its checksum matches and ``meta`` agrees with ``expect``;
    else ``None`` (with a warning saying why when a file is there but unusable)."""
    path, side = Path(path), sidecar_path(path)
    if not path.is_file() and not side.is_file():
        return None
    why = None
    try:
        meta = json.loads(side.read_text(encoding="utf-8"))
        data = path.read_bytes()
        if meta.get("format_version") != FORMAT_VERSION:
            why = "old format"
        elif meta.get("sha256") != sha256_bytes(data):
            why = "checksum mismatch (corrupt or partly written)"
        else:
            stale = [k for k, v in expect.items() if json.loads(json.dumps(v, default=str)) != meta.get(k)]
            if stale:
                why = f"stale ({', '.join(stale)} changed)"
    except (OSError, ValueError) as err:
        why = f"unreadable ({type(err).__name__})"
    if why is None:
        try:
            return st_load(data), meta
        except Exception as err:  # safetensors raises its own error types on bad headers
            why = f"unreadable ({type(err).__name__})"
    getLogger().warning(f"cache {path} is not used: {why}; rebuilding it")
    return None
