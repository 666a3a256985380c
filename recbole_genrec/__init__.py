"""recbole_genrec: generative recommenders and classical sequential baselines on one RecBole protocol."""
__version__ = "0.1.0"
