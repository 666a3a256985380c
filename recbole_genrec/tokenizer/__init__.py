"""Semantic-ID tokenizers behind one interface (:class:`~recbole_genrec.tokenizer.base.Tokenizer`):
``rqvae`` (default), ``rqkmeans``, ``pq``; collision handling and the prefix trie live beside them."""
from recbole_genrec.utils import GenRecError

TOKENIZERS = {
    "rqvae": "recbole_genrec.tokenizer.rqvae:RQVAETokenizer",
    "rqkmeans": "recbole_genrec.tokenizer.rqkmeans:RQKMeansTokenizer",
    "pq": "recbole_genrec.tokenizer.pq:PQTokenizer",
}


def make_tokenizer(name, **kwargs):
    """A tokenizer by name; unknown names are a one-line error."""
    import importlib

    key = str(name).lower()
    if key not in TOKENIZERS:
        raise GenRecError(f"unknown tokenizer {name!r}: use one of {sorted(TOKENIZERS)}")
    module, _, cls = TOKENIZERS[key].partition(":")
    return getattr(importlib.import_module(module), cls)(**kwargs)
