"""recbole_genrec: generative recommenders and classical sequential baselines on one RecBole protocol."""
__version__ = "0.1.0"

import os as _os

# PyTorch reads this at its first CPU allocation: tensors of 2 MiB or more then go on transparent huge pages,
# so training steps do not fault their activations in 4 KiB at a time (see utils.keep_freed_memory_for_reuse).
# An explicit value in the environment (e.g. 0) is kept.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
