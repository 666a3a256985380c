"""The floor of the package: errors, config checks, JSON and atomic file writes.

It imports nothing from ``recbole_genrec`` (tests/test_architecture.py checks it); model and trainer
lookup live in :mod:`recbole_genrec.registry`.
"""
import enum
import json
import os
import tempfile
import time
from contextlib import contextmanager
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


def number_setting(config, key, default, low=float("-inf"), high=float("inf"), low_open=False, high_open=False):
    """``config[key]`` (``default`` when unset) checked to be a finite number in the given range (a bound is
    excluded when its ``*_open`` is True); a one-line :class:`GenRecError` names the key and the range."""
    import math

    value = config[key] if config[key] is not None else default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        if high == float("inf"):
            rng = f"{'>' if low_open else '>='} {low}"
        else:
            rng = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise GenRecError(f"{key} must be a finite number {rng}, got {value!r}: set --{key}=VALUE (default {default})")
    return float(value)


def bool_setting(config, key, default):
    """``config[key]`` (``default`` when unset) checked to be True or False."""
    value = config[key] if config[key] is not None else default
    if not isinstance(value, bool):
        raise GenRecError(f"{key} must be True or False, got {value!r}: set --{key}=True or --{key}=False")
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


# ---- progress bars and phase timings -----------------------------------------------------------
_SHOW_PROGRESS = [False]  # process-wide: set from a run's `show_progress` (quick_start, build_ids)
_PHASE_SECONDS = {}


def set_show_progress(show):
    """Switch the setup-phase progress bars (:func:`progress`) on or off for this process."""
    _SHOW_PROGRESS[0] = bool(show)


def show_progress():
    return _SHOW_PROGRESS[0]


def progress(iterable=None, total=None, desc="", unit="it", show=None):
    """A tqdm bar with ETA in the style of RecBole's training bars; silent unless ``show`` (default: the
    process-wide switch that a run's ``show_progress`` sets)."""
    from tqdm import tqdm

    show = _SHOW_PROGRESS[0] if show is None else bool(show)
    if show:
        from recbole.utils import set_color

        desc = set_color(desc, "pink")
    return tqdm(iterable, total=total, desc=desc, unit=unit, ncols=100, disable=not show)


@contextmanager
def timed_phase(name):
    """Add the block's wall seconds to phase ``name`` (phases nest: ``semantic_ids`` holds ``text_embedding``)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        _PHASE_SECONDS[name] = _PHASE_SECONDS.get(name, 0.0) + time.perf_counter() - start


def phase_timings(reset=False):
    """``{phase: seconds}`` recorded by :func:`timed_phase` since the last reset (a run resets at its start)."""
    out = {k: round(v, 3) for k, v in _PHASE_SECONDS.items()}
    if reset:
        _PHASE_SECONDS.clear()
    return out


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


def _chmod_like_open(path):
    """``mkstemp`` makes 0600 files; give the final file the mode ``open`` would (0666 less the umask), so result
    files and caches on a shared filesystem (Ray workers, other users) stay readable."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    _chmod_like_open(tmp)
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
    _chmod_like_open(tmp)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
