"""Model/trainer lookup (plugin first, then RecBole), errors, and atomic file writes."""
import enum
import importlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch


class GenRecError(Exception):
    """A user-facing error: the message is one line that says what to change."""


# ---- config values --------------------------------------------------------------------------
def int_setting(config, key, default, minimum=1):
    """``config[key]`` (``default`` when unset; ``None`` stays ``None``) checked to be an integer >= ``minimum``."""
    value = config[key] if config[key] is not None else default
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise GenRecError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def seconds_setting(config, key):
    """``config[key]``: ``None`` (no limit) or a positive number of seconds."""
    value = config[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise GenRecError(f"{key} must be a positive number of seconds or ~, got {value!r}")
    return value


# ---- process-wide settings ------------------------------------------------------------------
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def keep_freed_memory_for_reuse():
    """Linux/glibc: stop large CPU tensors from being faulted in again on every training step.

    glibc maps each allocation above 32 MiB with ``mmap`` and unmaps it on free, and PyTorch's 64-byte-aligned
    allocations are refaulted page by page even from the heap, so each step's activations cost hundreds of
    thousands of page faults (a large share of a TIGER step went to the kernel on 2 CPU cores:
    ``benchmarks/bench_tiger_training.py --malloc_reuse=0`` vs ``1``). Two switches fix it: here glibc keeps
    freed memory in the process (``mallopt``: no ``mmap``, trim only above 1 GiB); and importing
    ``recbole_genrec`` sets ``THP_MEM_ALLOC_ENABLE=1`` (unless set), so PyTorch allocates tensors of 2 MiB or
    more on transparent huge pages. Returns whether ``mallopt`` was applied (False off glibc, e.g. macOS).
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


# ---- model registry -------------------------------------------------------------------------
def plugin_models():
    """Names the plugin provides, mapped to ``module:Class`` (see ``recbole_genrec/model/__init__.py``)."""
    from recbole_genrec.model import MODEL_REGISTRY

    return dict(MODEL_REGISTRY)


def get_model(model_name):
    """Plugin models first (names may contain ``+`` or ``-``), then RecBole's ``get_model``."""
    registry = plugin_models()
    if model_name in registry:
        module_name, _, class_name = registry[model_name].partition(":")
        return getattr(importlib.import_module(module_name), class_name)
    from recbole.utils import get_model as recbole_get_model

    try:
        return recbole_get_model(model_name)
    except (ValueError, AttributeError, ImportError):
        raise GenRecError(
            f"unknown model {model_name!r}: use one of the plugin models {sorted(registry)} "
            f"or a RecBole model (e.g. SASRec, GRU4Rec, BERT4Rec, Caser, BPR)"
        ) from None


def get_trainer(model_class, config):
    """The trainer for a model: ``model_class.trainer_class`` if set, else RecBole's choice made safe.

    Every trainer returned carries :class:`~recbole_genrec.trainer.SafeCheckpointMixin`, so checkpoints
    are unique per run, written atomically and loaded with ``weights_only=True``.
    """
    from recbole.utils import get_trainer as recbole_get_trainer

    from recbole_genrec.trainer import with_safe_checkpoints

    trainer_class = getattr(model_class, "trainer_class", None)
    if trainer_class is None:
        trainer_class = recbole_get_trainer(config["MODEL_TYPE"], config["model"])
    return with_safe_checkpoints(trainer_class)


# ---- JSON ---------------------------------------------------------------------------------------
def to_jsonable(value):
    """Config values, tensors and numpy scalars -> plain JSON types (enums by name, devices as text)."""
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=2) + "\n").encode("utf-8"))


def atomic_torch_save(obj, path):
    """``torch.save`` through a temp file and a rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
