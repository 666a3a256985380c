"""Evaluation: extra metrics registered with RecBole (``metrics.py``)."""
from recbole_genrec.evaluator.metrics import GENREC_METRICS, register_metrics  # noqa: F401
