"""Alternating tokenizer / recommender training (ETEGRec, Liu et al. SIGIR 2025, Sec. 3.4 and 4.1.5; reused by SODA).

Each cycle trains the item tokenizer for ``cycle_tokenizer_epochs`` epochs (recommender frozen), then the
recommender for ``cycle_recommender_epochs`` epochs (tokenizer frozen); the official ETEGRec code uses
``cycle: 2`` = one epoch of each, tokenizer first. After ``alternating_epochs`` epochs (``~``: never)
only the recommender trains (the official code's closing fine-tuning stage, without its reload).

Model-side protocol (what the trainer calls; the model owns which parameters belong to which phase):

* ``model.phase_parameters(phase) -> list[nn.Parameter]``: the parameters one phase trains; each
  phase gets its own optimizer (``learning_rate_tokenizer`` / ``learning_rate``, weight decay
  ``weight_decay_tokenizer`` / ``weight_decay``), so Adam moments never mix across phases; each has its own
  learning-rate schedule (``lr_scheduler`` over the recommender epochs' steps, ``lr_scheduler_tokenizer``
  over the tokenizer epochs' steps), as the official ETEGRec code schedules both.
* ``model.set_phase(phase, epoch)``: freeze the other phase's parameters (``requires_grad=False``)
  and select the phase's loss in ``calculate_loss``; ``epoch`` lets the model schedule loss weights.
* ``model.refresh_item_ids() -> int``: re-derive every item's ID from the tokenizer after each
  tokenizer epoch (layout codes, item tokens, trie, anything cached); returns how many items changed.
* ``model.frozen_tokenizer`` (optional, default False): True makes every epoch a recommender epoch (no
  tokenizer training, no ID refresh: decoupled training, SODA's ``w/o alter`` ablation).

Validation runs only after recommender epochs unless ``validate_tokenizer_epochs`` is True (right
after a tokenizer epoch the recommender has not yet seen the new IDs). Checkpoints add every phase's
optimizer state and the phase; the model's own state dict carries the tokenizer weights and the codes.
"""
from recbole_genrec import distributed
from recbole_genrec.trainer.schedule import LRSchedule
from recbole_genrec.trainer.trainer import Trainer
from recbole_genrec.utils import GenRecError, int_setting, timed_phase

PHASES = ("tokenizer", "recommender")


class AlternatingSchedule:
    """Which phase trains in which epoch: ``cycle_tokenizer_epochs`` then ``cycle_recommender_epochs``, repeated;
    from ``alternating_epochs`` on (``None``: never) only the recommender."""

    def __init__(self, tokenizer_epochs=1, recommender_epochs=1, alternating_epochs=None):
        self.tokenizer_epochs = int(tokenizer_epochs)
        self.recommender_epochs = int(recommender_epochs)
        self.alternating_epochs = alternating_epochs
        if self.recommender_epochs < 1 or self.tokenizer_epochs < 0:
            raise GenRecError("cycle_recommender_epochs must be >= 1 and cycle_tokenizer_epochs >= 0")

    @classmethod
    def from_config(cls, config):
        return cls(int_setting(config, "cycle_tokenizer_epochs", 1, 0),
                   int_setting(config, "cycle_recommender_epochs", 1, 1),
                   int_setting(config, "alternating_epochs", None, 0))

    def check_reaches_recommender(self, epochs):
        """A run of ``epochs`` epochs must train the recommender at least once (validation and the checkpoint
        tested at the end come from recommender epochs); otherwise a one-line error before any training."""
        if not any(self.phase(e) == "recommender" for e in range(int(epochs))):
            first = next(e for e in range(10 ** 6) if self.phase(e) == "recommender")
            raise GenRecError(f"epochs={epochs} ends before the first recommender epoch (epoch {first}, after "
                              f"{self.tokenizer_epochs} tokenizer epoch(s) per cycle): set --epochs={first + 1} or more")

    def phase(self, epoch):
        if self.alternating_epochs is not None and epoch >= self.alternating_epochs:
            return "recommender"
        cycle = self.tokenizer_epochs + self.recommender_epochs
        return "tokenizer" if epoch % cycle < self.tokenizer_epochs else "recommender"


class AlternatingTrainer(Trainer):
    """Safe-checkpoint RecBole trainer that alternates tokenizer and recommender phases (see module doc)."""

    def __init__(self, config, model):
        super().__init__(config, model)
        for method in ("phase_parameters", "set_phase", "refresh_item_ids"):
            if not callable(getattr(model, method, None)):
                raise GenRecError(f"{type(model).__name__} cannot train with AlternatingTrainer: it lacks "
                                  f"{method}(); implement the protocol of recbole_genrec/trainer/alternating.py")
        self.schedule = AlternatingSchedule.from_config(config)
        if getattr(model, "frozen_tokenizer", False):  # decoupled training (SODA's w/o alter): recommender only
            self.schedule = AlternatingSchedule(tokenizer_epochs=0, recommender_epochs=1, alternating_epochs=0)
        self.validate_tokenizer_epochs = bool(config["validate_tokenizer_epochs"])
        tok_lr = config["learning_rate_tokenizer"]
        tok_wd = config["weight_decay_tokenizer"]
        settings = {"tokenizer": (float(tok_lr) if tok_lr is not None else self.learning_rate,
                                  float(tok_wd) if tok_wd is not None else self.weight_decay),
                    "recommender": (self.learning_rate, self.weight_decay)}
        self.phase_optimizers = {}
        for phase in PHASES:
            params = [p for p in model.phase_parameters(phase)]
            if not params:
                raise GenRecError(f"{type(model).__name__}.phase_parameters({phase!r}) is empty")
            lr, wd = settings[phase]
            self.phase_optimizers[phase] = self._build_optimizer(params=params, learning_rate=lr, weight_decay=wd)
        self.optimizer = self.phase_optimizers["recommender"]
        kind = config["lr_scheduler_tokenizer"] if "lr_scheduler_tokenizer" in config else None
        self.tokenizer_lr_schedule = (self.lr_schedule if kind is None else
                                      LRSchedule(kind, self.lr_schedule.warmup_steps, self.lr_schedule.warmup_ratio,
                                                 key="lr_scheduler_tokenizer"))
        self.tokenizer_lr_scheduler = None
        self._pending_tokenizer_lr_state = None
        self.phase = None
        self._eval_step = self.eval_step
        self.phase_history = []  # (epoch, phase, items whose ID changed or None)

    def fit(self, train_data, valid_data=None, verbose=True, saved=True, show_progress=False, callback_fn=None):
        self.schedule.check_reaches_recommender(self.epochs)  # before any training, not a missing checkpoint at the end
        return super().fit(train_data, valid_data, verbose=verbose, saved=saved, show_progress=show_progress,
                           callback_fn=callback_fn)

    def _scheduled_optimizer(self):
        """``lr_scheduler`` drives the recommender's optimizer; the tokenizer's has its own (see below)."""
        return self.phase_optimizers["recommender"]

    def _scheduled_epochs(self):
        return sum(1 for epoch in range(int(self.epochs)) if self.schedule.phase(epoch) == "recommender")

    def _attach_lr_schedule(self, train_data):
        """The recommender's schedule (``lr_scheduler``), then the tokenizer's: ``lr_scheduler_tokenizer``
        (``~``: the same kind and warm-up as ``lr_scheduler``) over the tokenizer epochs' optimizer steps, from
        ``learning_rate_tokenizer``. The official ETEGRec code schedules both optimizers the same way (warm-up,
        then cosine decay); a constant tokenizer rate kept moving the tokenizer at full rate to the last cycle
        (docs/soda.md#id-churn)."""
        super()._attach_lr_schedule(train_data)
        if self.tokenizer_lr_schedule.is_noop or self.tokenizer_lr_scheduler is not None:
            return
        epochs = sum(1 for epoch in range(int(self.epochs)) if self.schedule.phase(epoch) == "tokenizer")
        if epochs == 0:
            return
        optimizer = self.phase_optimizers["tokenizer"]
        total = max(1, self._steps_per_epoch(train_data) * epochs)
        scheduler = self.tokenizer_lr_schedule.build(optimizer, total)
        if self._pending_tokenizer_lr_state is not None:
            scheduler.load_state_dict(self._pending_tokenizer_lr_state)
            self._pending_tokenizer_lr_state = None
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        self.tokenizer_lr_scheduler = scheduler
        optimizer.register_step_post_hook(lambda opt, args, kwargs: scheduler.step())
        self.logger.info(f"lr_scheduler_tokenizer={self.tokenizer_lr_schedule.name}: {total} steps, "
                         f"{self.tokenizer_lr_schedule.warmup(total)} warm-up steps")

    def _enter_phase(self, epoch_idx):
        phase = self.schedule.phase(epoch_idx)
        if phase != self.phase:
            self.logger.info(f"epoch {epoch_idx}: switching to the {phase} phase"
                             + (f" (was {self.phase})" if self.phase else ""))
        switched = phase != self.phase
        self.phase = phase
        self.optimizer = self.phase_optimizers[phase]
        self.model.set_phase(phase, epoch_idx)
        if switched and self.distributed:  # set_phase may re-cluster codebooks (LETTER): one state for all ranks
            distributed.broadcast_module(self.model)
        return phase

    def _train_epoch(self, train_data, epoch_idx, loss_func=None, show_progress=False):
        phase = self._enter_phase(epoch_idx)
        loss = super()._train_epoch(train_data, epoch_idx, loss_func=loss_func, show_progress=show_progress)
        changed = None
        if phase == "tokenizer":
            with timed_phase("id_refresh"):
                if self.distributed:  # computed once on rank 0, broadcast to the others
                    codes = distributed.broadcast_tensor(self.model.compute_item_ids, like=self.model.item_codes)
                    changed = int(self.model.refresh_item_ids(codes))
                else:
                    changed = int(self.model.refresh_item_ids())
            log = getattr(self.model, "refresh_log", None)
            levels = (f" (per token position: {log[-1]['changed_per_level']})"
                      if log and "changed_per_level" in log[-1] else "")
            self.logger.info(f"epoch {epoch_idx}: item IDs refreshed from the tokenizer, "
                             f"{changed} items changed their ID{levels}")
        self.phase_history.append((epoch_idx, phase, changed))
        # RecBole's fit validates when (epoch + 1) % eval_step == 0: skip tokenizer epochs by making
        # that test fail for this epoch only.
        validate = phase == "recommender" or self.validate_tokenizer_epochs
        self.eval_step = self._eval_step if validate else epoch_idx + 2
        return loss

    def _checkpoint_state(self, epoch):
        state = super()._checkpoint_state(epoch)
        state["phase"] = self.phase
        state["phase_optimizers"] = {k: opt.state_dict() for k, opt in self.phase_optimizers.items()}
        state["lr_scheduler_tokenizer"] = (self.tokenizer_lr_scheduler.state_dict()
                                           if self.tokenizer_lr_scheduler is not None else None)
        return state

    def _restore_optimizers(self, checkpoint):
        for phase, state in (checkpoint.get("phase_optimizers") or {}).items():
            if phase in self.phase_optimizers:
                self.phase_optimizers[phase].load_state_dict(state)
        self._pending_tokenizer_lr_state = checkpoint.get("lr_scheduler_tokenizer")
