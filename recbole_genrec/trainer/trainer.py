"""RecBole trainers made safe for torch >= 2.6 and for runs started side by side.

RecBole 1.2.1 pickles its whole ``Config`` into every checkpoint and reloads it with a bare
``torch.load``, which torch >= 2.6 refuses (``weights_only=True`` by default). Here checkpoints hold
only tensors and plain values (the config as JSON types), are written through a temp file and a
rename, carry a per-run unique name, and are read back with ``weights_only=True``: no pickle at all.
"""
import os
import time
import uuid

import torch
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_local_time, set_color

from recbole_genrec.utils import GenRecError, atomic_torch_save, seconds_setting, to_jsonable


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint this package wrote (tensors and plain values only)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise GenRecError(f"checkpoint {path!r} not found: check the path") from None
    except Exception as err:  # pickled RecBole checkpoints and corrupt files land here
        raise GenRecError(
            f"checkpoint {path!r} cannot be read safely ({type(err).__name__}): use a checkpoint "
            "written by recbole_genrec"
        ) from None


class _TimeBudgetReached(Exception):
    pass


class SafeCheckpointMixin:
    """Unique, atomic, weights-only checkpoints plus per-epoch timings; put it before a RecBole trainer.

    ``train_time_budget`` (seconds, optional) ends training at the first epoch boundary after it is spent;
    the best checkpoint so far is then tested as after early stopping, and ``timings`` says so.
    """

    def __init__(self, config, model):
        super().__init__(config, model)
        unique = f"{get_local_time()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        safe_model_name = str(config["model"]).replace("/", "_")
        self.saved_model_file = os.path.join(self.checkpoint_dir, f"{safe_model_name}-{unique}.pth")
        self.timings = {"train_epoch_seconds": [], "valid_epoch_seconds": [], "stopped_by_time_budget": False}
        self.last_valid_result = None
        self.train_time_budget = seconds_setting(config, "train_time_budget")
        self._fit_start = None

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._fit_start = time.perf_counter()
        try:
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                               callback_fn=callback_fn)
        except _TimeBudgetReached:
            self.timings["stopped_by_time_budget"] = True
            self.logger.info(f"train_time_budget={self.train_time_budget}s spent: training stopped, "
                             f"best valid score {self.best_valid_score}")
            return self.best_valid_score, self.best_valid_result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        if (self.train_time_budget and self._fit_start is not None and self.timings["train_epoch_seconds"]
                and time.perf_counter() - self._fit_start >= self.train_time_budget):
            raise _TimeBudgetReached()
        start = time.perf_counter()
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.timings["train_epoch_seconds"].append(time.perf_counter() - start)
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.timings["valid_epoch_seconds"].append(time.perf_counter() - start)
        self.last_valid_result = valid_result
        return valid_score, valid_result

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        atomic_torch_save(self._checkpoint_state(epoch), saved_model_file)
        if verbose:
            self.logger.info(set_color("Saving current", "blue") + f": {saved_model_file}")

    def _checkpoint_state(self, epoch):
        """What a checkpoint holds (tensors and plain values only); subclasses add their own keys."""
        return {
            "config": to_jsonable(self.config.final_config_dict),
            "epoch": epoch,
            "cur_step": self.cur_step,
            "best_valid_score": float(self.best_valid_score),
            "state_dict": self.model.state_dict(),
            "other_parameter": self.model.other_parameter(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_model_weights(self, checkpoint_file):
        checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.load_other_parameter(checkpoint.get("other_parameter"))
        self.logger.info(f"Loading model structure and parameters from {checkpoint_file}")
        return checkpoint

    def resume_checkpoint(self, resume_file):
        checkpoint = self.load_model_weights(str(resume_file))
        self.saved_model_file = str(resume_file)
        self.start_epoch = checkpoint["epoch"] + 1
        self.cur_step = checkpoint["cur_step"]
        self.best_valid_score = checkpoint["best_valid_score"]
        self._restore_optimizers(checkpoint)
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def _restore_optimizers(self, checkpoint):
        """Optimizer state from a checkpoint (subclasses with several optimizers override this)."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            self.load_model_weights(model_file or self.saved_model_file)
        return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


_SAFE_CLASSES = {}


def with_safe_checkpoints(trainer_class):
    """``trainer_class`` with :class:`SafeCheckpointMixin` in front (made once per class)."""
    if issubclass(trainer_class, SafeCheckpointMixin):
        return trainer_class
    if trainer_class not in _SAFE_CLASSES:
        _SAFE_CLASSES[trainer_class] = type(trainer_class.__name__, (SafeCheckpointMixin, trainer_class), {})
    return _SAFE_CLASSES[trainer_class]


class Trainer(SafeCheckpointMixin, RecBoleTrainer):
    """RecBole's ``Trainer`` with safe checkpoints; the base of every plugin trainer."""
