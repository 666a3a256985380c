from recbole_genrec.trainer.trainer import SafeCheckpointMixin, Trainer, load_checkpoint, with_safe_checkpoints
from recbole_genrec.trainer.alternating import AlternatingSchedule, AlternatingTrainer

__all__ = ["AlternatingSchedule", "AlternatingTrainer", "SafeCheckpointMixin", "Trainer", "load_checkpoint",
           "with_safe_checkpoints"]
