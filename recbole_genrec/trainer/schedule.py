"""Learning-rate schedules and mixed precision for every trainer of the plugin (RecBole 1.2.1 has neither).

Schedules (``lr_scheduler``, ``warmup_steps`` / ``warmup_ratio``), stepped once per optimizer step:

* ``constant``: ``lr`` (after an optional linear warm-up);
* ``linear``: linear warm-up from 0 to ``lr`` over ``W`` steps, then linear decay to 0 at step ``T``;
* ``cosine``: the same warm-up, then ``lr * 0.5 * (1 + cos(pi * (s - W) / (T - W)))``.

These are ``transformers.get_scheduler``'s ``constant_with_warmup``, ``linear`` and ``cosine`` (the formulas
above are theirs; a test checks them); ``T`` = optimizer steps per epoch x ``epochs`` (the schedule runs
to the configured last epoch; early stopping may end training before it). ``W`` = ``warmup_steps`` if set,
else ``ceil(warmup_ratio * T)``.

Precision (``precision``): ``fp32``, ``bf16`` (``torch.autocast`` with ``bfloat16`` on CPU or CUDA) or
``auto`` (bf16 where the hardware computes it natively: on CUDA ``torch.cuda.is_bf16_supported()``, on
CPU oneDNN's bf16 support, which needs AVX512-BF16 or AMX; fp32 elsewhere). Losses are reduced in fp32
(``token_cross_entropy`` casts the logits); beam-search scores are fp32 log-softmaxes.
"""
import math
from contextlib import nullcontext

import torch

from recbole_genrec.utils import GenRecError

SCHEDULES = ("constant", "linear", "cosine")
PRECISIONS = ("fp32", "bf16", "auto")


class LRSchedule:
    """A validated ``lr_scheduler`` / ``warmup_steps`` / ``warmup_ratio`` setting.

    Raises:
        GenRecError: an unknown schedule name, a negative or non-integer ``warmup_steps``, a
            ``warmup_ratio`` outside ``[0, 1)``.
    """

    def __init__(self, name="constant", warmup_steps=None, warmup_ratio=0.0, key="lr_scheduler"):
        name = "constant" if name is None else str(name).lower()
        if name not in SCHEDULES:
            raise GenRecError(f"{key} must be one of {list(SCHEDULES)}, got {name!r}")
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int)
                                         or warmup_steps < 0):
            raise GenRecError(f"warmup_steps must be an integer >= 0 or ~, got {warmup_steps!r}")
        ratio = 0.0 if warmup_ratio is None else warmup_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
            raise GenRecError(f"warmup_ratio must be a number in [0, 1), got {warmup_ratio!r}")
        self.name, self.warmup_steps, self.warmup_ratio = name, warmup_steps, float(ratio)

    @classmethod
    def from_config(cls, config):
        get = lambda key: config[key] if key in config else None  # noqa: E731  (RecBole Config has no .get)
        return cls(get("lr_scheduler"), get("warmup_steps"), get("warmup_ratio"))

    @property
    def is_noop(self):
        """True for a constant learning rate without warm-up (nothing to attach)."""
        return self.name == "constant" and not self.warmup_steps and self.warmup_ratio == 0.0

    def warmup(self, total_steps):
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        return int(math.ceil(self.warmup_ratio * total_steps))

    def multiplier(self, step, total_steps):
        """The factor on the base learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
        w = self.warmup(total_steps)
        if step < w:
            return step / max(1, w)
        if self.name == "constant":
            return 1.0
        progress = (step - w) / max(1, total_steps - w)
        if self.name == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    def build(self, optimizer, total_steps):
        """A ``torch.optim.lr_scheduler.LambdaLR`` from ``transformers.get_scheduler`` over ``total_steps``."""
        from transformers import get_scheduler

        kind = "constant_with_warmup" if self.name == "constant" else self.name
        return get_scheduler(kind, optimizer, num_warmup_steps=self.warmup(total_steps),
                             num_training_steps=max(1, int(total_steps)))


def native_bf16(device):
    """Whether ``device`` computes bf16 natively (CUDA: compute capability >= 8.0; CPU: oneDNN's bf16 path,
    i.e. AVX512-BF16 or AMX, as reported by torch)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(value, device):
    """``precision`` (``fp32 | bf16 | auto``) -> ``torch.bfloat16`` or ``None`` (fp32) for ``device``.

    Raises:
        GenRecError: an unknown value, or ``bf16`` on a device type autocast cannot run bf16 on.
    """
    value = "fp32" if value is None else str(value).lower()
    if value not in PRECISIONS:
        raise GenRecError(f"precision must be one of {list(PRECISIONS)}, got {value!r}")
    dev_type = torch.device(device).type
    if value == "auto":
        return torch.bfloat16 if native_bf16(device) else None
    if value == "bf16":
        if dev_type not in ("cpu", "cuda"):
            raise GenRecError(f"precision=bf16 runs on cpu or cuda, not {dev_type}: use --precision=fp32")
        return torch.bfloat16
    return None


def autocast(device, dtype):
    """``torch.autocast`` for ``dtype`` on ``device`` (a no-op context for fp32)."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
