"""Model and trainer lookup: plugin models first (``recbole_genrec/model/__init__.py``), then RecBole's.

It sits above ``model/`` and ``trainer/`` (it returns their classes), which is why it is not in
:mod:`recbole_genrec.utils`, the floor every layer may import (see docs/architecture.md).
"""
import importlib

from recbole_genrec.utils import GenRecError


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
