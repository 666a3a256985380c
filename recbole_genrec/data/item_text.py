"""One text string per item, read from the ``.item`` atomic file through RecBole's own ``Dataset``.

Token fields are mapped back to their original strings with ``dataset.id2token``; ``token_seq`` fields
(titles, genres, categories) are joined with spaces; float fields are printed. Field values are joined
with ``". "``. Works before and after ``data_preparation`` (``item_feat`` is a DataFrame before, an
``Interaction`` after).
"""
import math
from logging import getLogger

import numpy as np
import torch
from recbole.utils import FeatureType

from recbole_genrec.utils import GenRecError

PAD_TOKEN = "[PAD]"
AMAZON_TEXT_FIELDS = ("title", "brand", "categories", "description")  # default when text_fields is unset


def _item_feature_columns(item_feat):
    if item_feat is None:
        return []
    return list(item_feat.columns)


def resolve_text_fields(config, dataset):
    """The configured ``text_fields`` (checked to exist); unset: the Amazon-style fields present, else every
    token/token_seq item field."""
    iid = dataset.iid_field
    present = [f for f in _item_feature_columns(dataset.item_feat) if f != iid]
    fields = config["text_fields"]
    if fields is None:
        fields = [f for f in AMAZON_TEXT_FIELDS if f in present] or [
            f for f in present if dataset.field2type[f] in (FeatureType.TOKEN, FeatureType.TOKEN_SEQ)]
        if not fields:
            raise GenRecError(
                f"dataset {config['dataset']!r} has no token/token_seq item fields to build item text from "
                f"(item fields: {present}): add a .item file with text columns or set --text_fields"
            )
        return fields
    if isinstance(fields, str):
        fields = [fields]
    if not isinstance(fields, (list, tuple)) or not fields or not all(isinstance(f, str) for f in fields):
        raise GenRecError(f"text_fields must be a non-empty list of item field names, got {fields!r}")
    missing = [f for f in fields if f not in present]
    if missing:
        raise GenRecError(
            f"text_fields {missing} not in dataset {config['dataset']!r}: its item fields are {present} "
            "(check text_fields and load_col)"
        )
    return list(fields)


def _column_values(item_feat, field):
    """The column as a list of python values (ints, floats or lists), whatever the container."""
    col = item_feat[field]
    if isinstance(col, torch.Tensor):
        return col.tolist()
    out = []
    for v in col.tolist() if hasattr(col, "tolist") else list(col):
        out.append(v.tolist() if isinstance(v, np.ndarray) else v)
    return out


def _format(dataset, field, value):
    """One field value -> text ('' when missing)."""
    ftype = dataset.field2type[field]
    if ftype == FeatureType.TOKEN:
        if value is None or (isinstance(value, float) and math.isnan(value)) or int(value) == 0:
            return ""
        tok = dataset.field2id_token[field][int(value)]
        return "" if tok == PAD_TOKEN else str(tok)
    if ftype == FeatureType.TOKEN_SEQ:
        ids = [int(v) for v in (value if isinstance(value, (list, tuple)) else [value]) if int(v) != 0]
        toks = dataset.field2id_token[field][ids] if ids else []
        return " ".join(str(t) for t in toks if t != PAD_TOKEN)
    if ftype == FeatureType.FLOAT:
        v = float(value[0] if isinstance(value, (list, tuple)) else value)
        return "" if math.isnan(v) else f"{v:g}"
    if ftype == FeatureType.FLOAT_SEQ:
        vals = [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        return " ".join(f"{v:g}" for v in vals if not math.isnan(v))
    return str(value)


def items_without_text(config, dataset, fields=None):
    """Internal ids (``>= 1``) of the items whose every text field is empty (before :func:`item_texts`
    substitutes their item token)."""
    texts = _field_texts(dataset, fields or resolve_text_fields(config, dataset))
    return [i for i in range(1, len(texts)) if not texts[i]]


def _field_texts(dataset, fields):
    """``texts[i]``: the non-empty field values of item ``i`` joined with ``". "`` ('' when none)."""
    n = dataset.item_num
    iid = dataset.iid_field
    parts = [[] for _ in range(n)]
    feat = dataset.item_feat
    ids = [int(i) for i in _column_values(feat, iid)]
    for field in fields:
        for item, value in zip(ids, _column_values(feat, field)):
            if 0 < item < n:
                text = _format(dataset, field, value).strip()
                if text:
                    parts[item].append(text)
    return [""] + [". ".join(p) for p in parts[1:]]


def item_texts(config, dataset, fields=None):
    """``texts[i]`` = text of RecBole internal item id ``i`` (``texts[0] == ''`` for the padding item).

    Items with no text in any field get their original item token (``"item <token>"``) and one warning.
    """
    fields = fields or resolve_text_fields(config, dataset)
    n = dataset.item_num
    iid = dataset.iid_field
    texts = _field_texts(dataset, fields)
    empty = [i for i in range(1, n) if not texts[i]]
    if empty:
        tokens = dataset.id2token(iid, empty)
        for i, tok in zip(empty, np.atleast_1d(tokens)):
            texts[i] = f"item {tok}"
        getLogger().warning(
            f"{len(empty)} of {n - 1} items have no text in {fields}; using their item token instead "
            f"(e.g. {[texts[i] for i in empty[:3]]})"
        )
    return texts
