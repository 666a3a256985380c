from recbole_genrec.trainer.trainer import SafeCheckpointMixin, Trainer, load_checkpoint, with_safe_checkpoints

__all__ = ["SafeCheckpointMixin", "Trainer", "load_checkpoint", "with_safe_checkpoints"]
