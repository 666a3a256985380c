"""RecBole trainers made safe for torch >= 2.6 and for runs started side by side.

RecBole 1.2.1 pickles its whole ``Config`` into every checkpoint and reloads it with a bare
``torch.load``, which torch >= 2.6 refuses (``weights_only=True`` by default). Here checkpoints hold
only tensors and plain values (the config as JSON types), are written through a temp file and a
rename, carry a per-run unique name, and are read back with ``weights_only=True``: no pickle at all.

Every trainer here also carries the plugin's learning-rate schedule and mixed precision
(:mod:`recbole_genrec.trainer.schedule`): ``lr_scheduler`` / ``warmup_*`` stepped per optimizer step and
saved in checkpoints (a resumed run continues the schedule), ``precision`` as autocast around the loss.

Several processes (``--nproc``, torchrun; :mod:`recbole_genrec.distributed`): rank 0's initial weights are
broadcast, gradients are averaged over the ranks before every optimizer step (then clipped), the evaluation
gathers every user's top-K before computing metrics, and only rank 0 writes checkpoints.
"""
import os
import random
import time
import uuid

import numpy as np
import torch
from recbole.evaluator import Collector
from recbole.trainer import Trainer as RecBoleTrainer
from recbole.utils import get_local_time, set_color

from recbole_genrec import distributed
from recbole_genrec.evaluator.metrics import PER_PASS_KEYS
from recbole_genrec.trainer.schedule import LRSchedule, autocast, resolve_precision
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


class TieBreakingCollector(Collector):
    """RecBole's ``Collector`` whose top-K breaks equal scores by the seeded raw-token order
    (:func:`recbole_genrec.evaluator.scores.tie_broken_topk`) instead of by internal item id (file order)."""

    tie_order = None
    gather_ranks = False  # several processes: gather every rank's rows before the metrics (exact, no padding)

    # keys holding one row per evaluated row (RecBole's and the plugin's metrics; reset after each pass)
    ROW_KEYS = PER_PASS_KEYS
    # keys whose rows are interactions rather than users (value-type evaluation): concatenated in rank order
    UNORDERED_KEYS = ("rec.score", "data.label")

    def get_data_struct(self):
        struct = super().get_data_struct()
        if not self.gather_ranks:
            return struct
        present = distributed.gather_objects(sorted(k for k in self.ROW_KEYS if k in struct))
        for key in sorted(set().union(*present)):  # the same keys, in the same order, on every rank
            blocks = distributed.gather_objects(struct[key] if key in struct else None)
            blocks = [b for b in blocks if b is not None]
            world, total = len(present), sum(int(b.shape[0]) for b in blocks)
            counts = [len(range(r, total, world)) for r in range(world)]  # as unpad_eval_sampler deals them
            if len(blocks) != world or [int(b.shape[0]) for b in blocks] != counts:
                if key not in self.UNORDERED_KEYS:
                    raise GenRecError(f"the ranks evaluated {[int(b.shape[0]) for b in blocks]} rows of {key!r}, "
                                      f"not {counts}: the evaluation shards are not the ones unpad_eval_sampler "
                                      "deals (report this)")
                struct[key] = torch.cat(blocks, dim=0)
            else:
                struct[key] = distributed.gather_rows(blocks)
        return struct

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        register = self.register
        keys = [k for k in ("rec.items", "rec.topk") if register.need(k)]
        if self.tie_order is None or not keys:
            return super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        from recbole_genrec.evaluator.scores import tie_broken_topk

        topk_idx = tie_broken_topk(scores_tensor, max(self.topk), self.tie_order)
        if "rec.items" in keys:
            self.data_struct.update_tensor("rec.items", topk_idx)
        if "rec.topk" in keys:  # as RecBole 1.2.1's Collector, with the tie-broken top-K
            pos_matrix = torch.zeros_like(scores_tensor, dtype=torch.int)
            pos_matrix[positive_u, positive_i] = 1
            pos_len_list = pos_matrix.sum(dim=1, keepdim=True)
            pos_idx = torch.gather(pos_matrix, dim=1, index=topk_idx)
            self.data_struct.update_tensor("rec.topk", torch.cat((pos_idx, pos_len_list), dim=1))
        for key in keys:  # everything else (mean rank, scores, labels) as RecBole does it
            setattr(register, key, False)
        try:
            super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        finally:
            for key in keys:
                setattr(register, key, True)


def rng_state():
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values (weights-only loadable)."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state):
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class SafeCheckpointMixin:
    """Unique, atomic, weights-only checkpoints plus per-epoch timings; put it before a RecBole trainer.

    ``train_time_budget`` (seconds, optional) ends training at the first epoch boundary after it is spent;
    the best checkpoint so far is then tested as after early stopping, and ``timings`` says so.

    ``lr_scheduler`` (``constant | linear | cosine``) with ``warmup_steps`` or ``warmup_ratio`` scales the
    learning rate of :meth:`_scheduled_optimizer` after each of its steps, over
    ``_steps_per_epoch(train_data) * _scheduled_epochs()`` steps. ``precision`` (``fp32 | bf16 | auto``)
    runs the training loss under ``torch.autocast``; evaluation too for models whose class sets
    ``autocast_eval = True`` (their scores are computed in fp32, e.g. TIGER's beam log-probabilities).
    """

    def __init__(self, config, model):
        self.distributed = not config["single_spec"]
        if self.distributed:
            # RecBole would wrap the model in a CUDA-only DistributedDataParallel here, whose reducer fixes the
            # trained parameters; gradients are averaged at the optimizer step instead (_sync_gradients).
            config["single_spec"] = True
        try:
            super().__init__(config, model)
        finally:
            if self.distributed:
                config["single_spec"] = False
        self._clip_after_average = None
        if self.distributed:
            if getattr(self, "enable_scaler", False):
                raise GenRecError("enable_scaler (fp16 loss scaling) cannot run on several processes: a rank that "
                                  "skips a step would leave the others waiting; use --precision=bf16 or one process")
            distributed.broadcast_module(self.model)  # every rank starts from rank 0's weights, as with DDP
            self._clip_after_average, self.clip_grad_norm = self.clip_grad_norm, None
        unique = f"{get_local_time()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if self.distributed:  # one run name: every rank loads the checkpoint rank 0 writes
            unique = distributed.broadcast_object(unique)
        safe_model_name = str(config["model"]).replace("/", "_")
        self.saved_model_file = os.path.join(self.checkpoint_dir, f"{safe_model_name}-{unique}.pth")
        self.timings = {"train_epoch_seconds": [], "valid_epoch_seconds": [], "stopped_by_time_budget": False}
        self.last_valid_result = None
        self.train_time_budget = seconds_setting(config, "train_time_budget")
        self._fit_start = None
        self.lr_schedule = LRSchedule.from_config(config)
        self.autocast_dtype = resolve_precision(config["precision"] if "precision" in config else None,
                                                config["device"])
        self.precision = "bf16" if self.autocast_dtype is not None else "fp32"
        self.lr_scheduler = None
        self._pending_lr_scheduler_state = None
        self._lr_hook = None
        if hasattr(self, "eval_collector"):  # ties broken by the seeded raw-token order (evaluator/scores.py)
            self.eval_collector = TieBreakingCollector(config)
            self.eval_collector.gather_ranks = self.distributed
        self._tie_dataset = None
        # --resume: written after every validation (the best checkpoint holds only the best epoch's state)
        self.resume_file = os.path.splitext(self.saved_model_file)[0] + "-resume.pth"
        self._train_data = None
        self._pending_resume = None

    # ---- learning-rate schedule and precision ---------------------------------------------------
    def _steps_per_epoch(self, train_data):
        """Optimizer steps in one training epoch (one per loaded batch in RecBole's loop)."""
        return len(train_data)

    def _scheduled_epochs(self):
        """Epochs the schedule spans (trainers that step this optimizer only in some epochs override it)."""
        return int(self.epochs)

    def _scheduled_optimizer(self):
        return self.optimizer

    def _attach_lr_schedule(self, train_data):
        if self.lr_schedule.is_noop or self.lr_scheduler is not None:
            return
        optimizer = self._scheduled_optimizer()
        total = max(1, self._steps_per_epoch(train_data) * max(1, self._scheduled_epochs()))
        self.lr_scheduler = self.lr_schedule.build(optimizer, total)
        if self._pending_lr_scheduler_state is not None:
            self.lr_scheduler.load_state_dict(self._pending_lr_scheduler_state)
            self._pending_lr_scheduler_state = None
            for group, lr in zip(optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
        scheduler = self.lr_scheduler
        if self._lr_hook is not None:  # a schedule re-attached (GenPlugin's stage 2): the old one stops stepping
            self._lr_hook.remove()
        self._lr_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: scheduler.step())
        self.logger.info(f"lr_scheduler={self.lr_schedule.name}: {total} steps, "
                         f"{self.lr_schedule.warmup(total)} warm-up steps")

    def _autocast_loss(self, loss_func):
        """``loss_func`` run under this trainer's precision (identity for fp32)."""
        if self.autocast_dtype is None:
            return loss_func

        def run(interaction):
            with autocast(self.device, self.autocast_dtype):
                return loss_func(interaction)
        return run

    # ---- several processes ---------------------------------------------------------------------------
    def _sync_gradients(self, optimizer):
        """In a multi-process run, average ``optimizer``'s gradients over the ranks before each of its steps
        (then clip them, if ``clip_grad_norm`` is set): what DDP computes, for any set of trained parameters.
        Idempotent; a no-op in a single process."""
        if not self.distributed or getattr(optimizer, "_genrec_averages_gradients", False):
            return
        optimizer._genrec_averages_gradients = True  # on the object: a freed optimizer's id can be reused
        model, clip = self.model, self._clip_after_average

        def average(opt, args, kwargs):
            distributed.average_gradients([p for group in opt.param_groups for p in group["params"]])
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), **clip)
        optimizer.register_step_pre_hook(average)

    def set_reduce_hook(self):
        """RecBole's per-step DDP hook: not used (gradients are averaged at the optimizer step)."""

    def sync_grad_loss(self):
        return 0

    def _map_reduce(self, result, num_sample):
        """The metrics are already global: the collector gathered every rank's rows before computing them."""
        return result

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self._fit_start = time.perf_counter()
        self._train_data = train_data
        self._attach_lr_schedule(train_data)
        self._apply_pending_resume(train_data)
        user_callback = callback_fn

        def callback_fn(epoch_idx, valid_score):
            if saved:  # a resume point after every validation: --resume=<resume_file> continues from here
                self._save_checkpoint(epoch_idx, verbose=False, saved_model_file=self.resume_file)
            if user_callback is not None:
                user_callback(epoch_idx, valid_score)

        try:
            return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                               callback_fn=callback_fn)
        except _TimeBudgetReached:
            self.timings["stopped_by_time_budget"] = True
            self.logger.info(f"train_time_budget={self.train_time_budget}s spent: training stopped, "
                             f"best valid score {self.best_valid_score}")
            return self.best_valid_score, self.best_valid_result

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        spent = (self.train_time_budget and self._fit_start is not None and self.timings["train_epoch_seconds"]
                 and time.perf_counter() - self._fit_start >= self.train_time_budget)
        if self.train_time_budget and self.distributed:  # rank 0's clock decides, or the ranks would part ways
            spent = distributed.broadcast_object(bool(spent))
        if spent:
            raise _TimeBudgetReached()
        start = time.perf_counter()
        self._sync_gradients(self.optimizer)
        loss_func = self._autocast_loss(loss_func or self.model.calculate_loss)
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        self.timings["train_epoch_seconds"].append(time.perf_counter() - start)
        self.timings.setdefault("train_loss", []).append(float(sum(loss) if isinstance(loss, tuple) else loss))
        if self.lr_scheduler is not None:
            self.timings.setdefault("learning_rate", []).append(self.lr_scheduler.get_last_lr()[0])
        return loss

    def _valid_epoch(self, valid_data, show_progress=False):
        start = time.perf_counter()
        valid_score, valid_result = super()._valid_epoch(valid_data, show_progress=show_progress)
        self.timings["valid_epoch_seconds"].append(time.perf_counter() - start)
        self.timings.setdefault("valid_scores", []).append(float(valid_score))
        self.last_valid_result = valid_result
        return valid_score, valid_result

    def _save_checkpoint(self, epoch, verbose=True, **kwargs):
        # several processes: every rank's RNG state goes into the file (a resumed run gives each rank its own
        # dropout stream back), and global rank 0 alone writes it (one file system shared by the machines)
        rng_ranks = distributed.gather_objects(rng_state()) if self.distributed else None
        if self.distributed and not distributed.is_main():
            return
        saved_model_file = kwargs.pop("saved_model_file", self.saved_model_file)
        state = self._checkpoint_state(epoch)
        if rng_ranks is not None:
            state["rng_ranks"] = rng_ranks
        atomic_torch_save(state, saved_model_file)
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
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            # resume: RNG states, the train loader's shuffling generator, early-stopping counters, best file
            "rng": rng_state(),
            "train_generator": (self._train_data.generator.get_state()
                                if getattr(self._train_data, "generator", None) is not None else None),
            "best_valid_result": to_jsonable(dict(self.best_valid_result or {})) or None,
            "best_model_file": self.saved_model_file,
            "model": str(self.config["model"]),
        }

    def load_model_weights(self, checkpoint_file):
        checkpoint = load_checkpoint(checkpoint_file, map_location=self.device)
        written_by = checkpoint.get("model") or (checkpoint.get("config") or {}).get("model")
        if written_by is not None and str(written_by) != str(self.config["model"]):
            raise GenRecError(f"checkpoint {checkpoint_file!r} was written by model {written_by}, not "
                              f"{self.config['model']}: pass --model={written_by} or another checkpoint")
        try:
            self.model.load_state_dict(checkpoint["state_dict"])
        except RuntimeError as err:
            raise GenRecError(f"checkpoint {checkpoint_file!r} does not fit this {self.config['model']} "
                              f"({str(err).splitlines()[0]}): use the settings and dataset it was trained "
                              "with") from None
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
        self._pending_lr_scheduler_state = checkpoint.get("lr_scheduler")
        if checkpoint.get("best_valid_result") is not None:
            self.best_valid_result = dict(checkpoint["best_valid_result"])
        best = checkpoint.get("best_model_file")
        if best and os.path.isfile(best):  # a resume file: the final test still loads the run's best weights
            self.saved_model_file = best
            self.resume_file = str(resume_file)
        self._pending_resume = checkpoint  # RNG states and the loader's generator, restored when fit starts
        self.logger.info(f"Checkpoint loaded. Resume training from epoch {self.start_epoch}")

    def _apply_pending_resume(self, train_data):
        checkpoint, self._pending_resume = self._pending_resume, None
        if checkpoint is None:
            return
        per_rank = checkpoint.get("rng_ranks")
        if self.distributed and per_rank and len(per_rank) == distributed.world_size():
            set_rng_state(per_rank[distributed.rank()])
        elif checkpoint.get("rng") is not None:
            set_rng_state(checkpoint["rng"])
        if checkpoint.get("train_generator") is not None and getattr(train_data, "generator", None) is not None:
            train_data.generator.set_state(checkpoint["train_generator"].cpu())

    def _restore_optimizers(self, checkpoint):
        """Optimizer state from a checkpoint (subclasses with several optimizers override this)."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])

    def evaluate(self, eval_data, load_best_model=True, model_file=None, show_progress=False):
        if eval_data and load_best_model:
            if self.distributed:
                distributed.barrier()  # rank 0 has written the checkpoint every rank now reads
            self.load_model_weights(model_file or self.saved_model_file)
        if eval_data and isinstance(self.eval_collector, TieBreakingCollector):
            self._set_tie_order(eval_data._dataset)
        dtype = self.autocast_dtype if getattr(self.model, "autocast_eval", False) else None
        with autocast(self.device, dtype):
            return super().evaluate(eval_data, load_best_model=False, show_progress=show_progress)


    def _set_tie_order(self, dataset):
        tokens = dataset.field2id_token[dataset.iid_field]  # shared by the train/valid/test copies
        if self._tie_dataset is tokens:
            return
        from recbole_genrec.evaluator.scores import tie_order

        self.eval_collector.tie_order = tie_order(tokens, self.config["seed"]).to(self.device)
        self._tie_dataset = tokens


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
