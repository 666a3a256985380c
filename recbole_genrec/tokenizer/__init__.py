"""Semantic-ID tokenizers behind one interface (:class:`~recbole_genrec.tokenizer.base.Tokenizer`):
``rqvae`` (default), ``letter`` (RQ-VAE + LETTER's
regularisers), ``rqkmeans``, ``pq``; collision handling and the prefix trie live beside them."""
from recbole_genrec.utils import GenRecError

TOKENIZERS = {
    "rqvae": "recbole_genrec.tokenizer.rqvae:RQVAETokenizer",
    "letter": "recbole_genrec.tokenizer.letter:LETTERTokenizer",
    "rqkmeans": "recbole_genrec.tokenizer.rqkmeans:RQKMeansTokenizer",
    "pq": "recbole_genrec.tokenizer.pq:PQTokenizer",
}


def tokenizer_class(name):
    """The tokenizer class registered under ``name``; unknown names are a one-line error."""
    import importlib

    key = str(name).lower()
    if key not in TOKENIZERS:
        raise GenRecError(f"unknown tokenizer {name!r}: use one of {sorted(TOKENIZERS)}")
    module, _, cls = TOKENIZERS[key].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_tokenizer(name, **kwargs):
    """A tokenizer by name; unknown names are a one-line error."""
    return tokenizer_class(name)(**kwargs)
