"""Every setting and dataset-file property a run reads, checked before data preparation and training.

One place, used by every run path (``run_recbole_genrec.py``, :func:`~recbole_genrec.quick_start.run_recbole_genrec`,
Ray trials in :mod:`recbole_genrec.hyper`, ``--model=A,B`` comparisons in :mod:`recbole_genrec.compare`):

* :func:`check_settings` (called by :class:`~recbole_genrec.config.Config`): types, ranges and combinations of
  the resolved settings (:data:`SETTING_RULES`, beam vs top-K, ``eval_args``, intervals, ``benchmark_filename``...);
* :func:`check_dataset_files` (called by :func:`~recbole_genrec.quick_start.check_dataset_files`, before RecBole
  reads a file): folder and files (``NAME.inter`` or the ``benchmark_filename`` files), each header's
  ``name:type`` columns, rows present, the user/item/time columns the run needs, ``load_col`` naming existing
  columns, and every loaded ``float``/``float_seq`` value parsing as a number;
* :func:`check_dataset` (after RecBole has loaded and filtered the data, before the split and any training):
  interactions left after filtering, ``topk`` vs the number of items, codebook capacity vs items.

Each failure is a :class:`~recbole_genrec.utils.GenRecError` whose one-line message names the setting or file
and says what to change; the CLI prints it as ``error: ...`` and exits with code 2. ``docs/bad_input.md``
lists what is checked.
"""
import os
import re
from pathlib import Path

from recbole_genrec.utils import GenRecError

FEATURE_TYPES = ("token", "token_seq", "float", "float_seq")

_INT, _NUM = "int", "number"
#: ``(key, kind, low, low_inclusive, high, high_inclusive)``: a key absent from the config or ``None`` is skipped.
SETTING_RULES = [
    ("learning_rate", _NUM, 0, False, None, None),
    ("weight_decay", _NUM, 0, True, None, None),
    ("train_batch_size", _INT, 1, True, None, None),
    ("eval_batch_size", _INT, 1, True, None, None),
    ("epochs", _INT, 1, True, None, None),
    ("stopping_step", _INT, 1, True, None, None),
    ("ddp_timeout", _NUM, 0, False, None, None),
    ("eval_step", _INT, 0, True, None, None),
    ("seed", _INT, 0, True, None, None),
    ("worker", _INT, 0, True, None, None),
    ("MAX_ITEM_LIST_LENGTH", _INT, 1, True, None, None),
    ("beam_size", _INT, 1, True, None, None),
    ("beam_batch_size", _INT, 1, True, None, None),
    ("train_prefix_keep", _NUM, 0, False, 1, True),
    ("num_user_tokens", _INT, 0, True, None, None),
    ("dropout_rate", _NUM, 0, True, 1, False),
    ("dropout_prob", _NUM, 0, True, 1, False),
    ("hidden_dropout_prob", _NUM, 0, True, 1, False),
    ("attn_dropout_prob", _NUM, 0, True, 1, False),
    ("d_model", _INT, 1, True, None, None),
    ("d_ff", _INT, 1, True, None, None),
    ("d_kv", _INT, 1, True, None, None),
    ("num_heads", _INT, 1, True, None, None),
    ("num_encoder_layers", _INT, 1, True, None, None),
    ("num_decoder_layers", _INT, 0, True, None, None),
    ("hidden_size", _INT, 1, True, None, None),
    ("inner_size", _INT, 1, True, None, None),
    ("embedding_size", _INT, 1, True, None, None),
    ("n_layers", _INT, 1, True, None, None),
    ("n_heads", _INT, 1, True, None, None),
    ("num_codebooks", _INT, 1, True, None, None),
    ("codebook_size", _INT, 2, True, None, None),
    ("text_batch_size", _INT, 1, True, None, None),
    ("rqvae_epochs", _INT, 0, True, None, None),
    ("rqvae_batch_size", _INT, 1, True, None, None),
    ("rqvae_lr", _NUM, 0, False, None, None),
    ("kmeans_iters", _INT, 1, True, None, None),
]

_INTERVAL = re.compile(r"^\s*[\[(]\s*(-?[\d.]+(e-?\d+)?|-?inf)\s*,\s*(-?[\d.]+(e-?\d+)?|inf)\s*[\])]\s*$")
_LS_MODES = ("valid_and_test", "valid_only", "test_only")
_EVAL_MODES = ("full", "labeled")


def _get(config, key):
    return config[key] if key in config else None


def _describe_range(kind, low, low_incl, high, high_incl):
    what = "an integer" if kind == _INT else "a number"
    if high is None:
        return f"{what} {'>=' if low_incl else '>'} {low}"
    return f"{what} in {'[' if low_incl else '('}{low}, {high}{']' if high_incl else ')'}"


def check_value(key, value, kind, low, low_incl=True, high=None, high_incl=True):
    """One ``SETTING_RULES`` row; raises a one-line :class:`GenRecError` naming ``--key``."""
    ok = not isinstance(value, bool) and isinstance(value, int if kind == _INT else (int, float))
    if ok and value != value:  # NaN
        ok = False
    if ok and low is not None:
        ok = value >= low if low_incl else value > low
    if ok and high is not None:
        ok = value <= high if high_incl else value < high
    if not ok:
        raise GenRecError(f"{key} must be {_describe_range(kind, low, low_incl, high, high_incl)}, got {value!r}: "
                          f"change --{key}")


def check_settings(config):
    """Every setting the run reads: :data:`SETTING_RULES` plus the combinations below (see module doc)."""
    for key, kind, low, low_incl, high, high_incl in SETTING_RULES:
        value = _get(config, key)
        if value is not None:
            check_value(key, value, kind, low, low_incl, high, high_incl)

    topk = _get(config, "topk")
    if isinstance(topk, int) and not isinstance(topk, bool):
        topk = [topk]
    if (not isinstance(topk, (list, tuple)) or not topk
            or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in topk)):
        raise GenRecError(f"topk must be a non-empty list of integers >= 1, got {_get(config, 'topk')!r}: "
                          "e.g. --topk=\"[5,10,20]\"")
    metrics = _get(config, "metrics")
    if not isinstance(metrics, (list, tuple, str)) or not metrics:
        raise GenRecError(f"metrics must be a non-empty list of metric names, got {metrics!r}: "
                          "e.g. --metrics=\"['Hit','NDCG']\"")
    if _get(config, "ddp_backend") is not None and _get(config, "device") is not None:
        from recbole_genrec.distributed import resolve_backend

        resolve_backend(_get(config, "ddp_backend"), config["device"])  # a known backend, nccl only on CUDA
    beam = _get(config, "beam_size")
    if beam is not None and beam < max(topk):
        raise GenRecError(f"beam_size={beam} is smaller than max(topk)={max(topk)}: the beam must return at least "
                          f"as many items as the largest K; set --beam_size={max(topk)} or more")
    hidden, heads = _get(config, "hidden_size"), _get(config, "n_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise GenRecError(f"hidden_size={hidden} is not a multiple of n_heads={heads}: change --hidden_size or "
                          "--n_heads")
    for key in ("user_inter_num_interval", "item_inter_num_interval", "val_interval"):
        value = _get(config, key)
        if value is None:
            continue
        values = value.values() if isinstance(value, dict) else [value]
        for interval in values:
            if not isinstance(interval, str) or not _INTERVAL.match(interval):
                raise GenRecError(f"{key} must be an interval such as \"[5,inf)\" or \"[0,inf)\", got {value!r}: "
                                  f"change --{key}")
    _check_eval_args(config)
    _check_benchmark_settings(config)
    _check_load_col(config)
    resume = _get(config, "resume")
    if resume is not None and (not isinstance(resume, str) or not os.path.isfile(resume)):
        raise GenRecError(f"--resume={resume!r}: no such checkpoint file; pass the '-resume.pth' (or best '.pth') "
                          "file a run wrote under checkpoint_dir")
    for key in ("USER_ID_FIELD", "ITEM_ID_FIELD"):
        if not isinstance(_get(config, key), str) or not _get(config, key):
            raise GenRecError(f"{key} must be a column name, got {_get(config, key)!r}: change --{key}")


def _check_eval_args(config):
    args = _get(config, "eval_args")
    if not isinstance(args, dict):
        raise GenRecError(f"eval_args must be a dict, got {args!r}: e.g. --eval_args=\"{{'order': 'TO'}}\"")
    split = args.get("split")
    if split is not None:
        if not isinstance(split, dict) or len(split) != 1 or next(iter(split)) not in ("LS", "RS"):
            raise GenRecError(f"eval_args split must be {{'LS': 'valid_and_test'}} or {{'RS': [0.8, 0.1, 0.1]}}, "
                              f"got {split!r}")
        kind, value = next(iter(split.items()))
        if kind == "LS" and value not in _LS_MODES:
            raise GenRecError(f"eval_args split LS must be one of {list(_LS_MODES)}, got {value!r}")
        if kind == "RS" and (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 3
                             or any(isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in value)
                             or sum(value) <= 0):
            raise GenRecError(f"eval_args split RS must be up to 3 non-negative ratios such as [0.8, 0.1, 0.1], "
                              f"got {value!r}")
    order = args.get("order")
    if order is not None and order not in ("TO", "RO"):
        raise GenRecError(f"eval_args order must be 'TO' (time order) or 'RO' (random order), got {order!r}")
    group_by = args.get("group_by")
    if group_by is not None and group_by not in ("user", "none"):
        raise GenRecError(f"eval_args group_by must be 'user' or 'none', got {group_by!r}")
    mode = args.get("mode")
    modes = mode.values() if isinstance(mode, dict) else [mode]
    for m in modes:
        if m is not None and not (m in _EVAL_MODES or re.match(r"^(uni|pop)\d+$", str(m))):
            raise GenRecError(f"eval_args mode must be 'full', 'labeled', 'uniN' or 'popN', got {mode!r}")


def _check_benchmark_settings(config):
    names = _get(config, "benchmark_filename")
    if names is None:
        return
    if (not isinstance(names, (list, tuple)) or len(names) != 3
            or any(not isinstance(n, str) or not n for n in names)):
        raise GenRecError(f"benchmark_filename must list the train, valid and test file parts, e.g. "
                          f"--benchmark_filename=\"['train','valid','test']\", got {names!r}")


def _check_load_col(config):
    load_col = _get(config, "load_col")
    if load_col is None:
        return
    if not isinstance(load_col, dict) or any(
            v != "*" and (not isinstance(v, (list, tuple)) or any(not isinstance(c, str) for c in v))
            for v in load_col.values()):
        raise GenRecError(f"load_col must map a file kind to column names, e.g. "
                          f"{{'inter': ['user_id', 'item_id', 'timestamp']}}, got {load_col!r}")
    if "inter" not in load_col:
        raise GenRecError(f"load_col {load_col!r} loads nothing from the .inter file: add an 'inter' entry "
                          "(or set load_col to ~ to load every column)")


# ---- dataset files ----------------------------------------------------------------------------
def _model_type(config):
    model_type = _get(config, "MODEL_TYPE")
    return getattr(model_type, "name", str(model_type)).upper()


def inter_files(config):
    """The interaction files the run reads: ``NAME.inter`` or ``NAME.<part>.inter`` per ``benchmark_filename``."""
    folder = Path(config["data_path"])
    name = config["dataset"]
    parts = _get(config, "benchmark_filename")
    if parts:
        return [folder / f"{name}.{part}.inter" for part in parts]
    return [folder / f"{name}.inter"]


def read_header(path, config):
    """``[(column, type), ...]`` of an atomic file's first line; a one-line error for an empty or malformed one."""
    sep = _get(config, "field_separator") or "\t"
    encoding = _get(config, "encoding") or "utf-8"
    try:
        with open(path, "r", encoding=encoding) as f:
            head = f.readline().rstrip("\r\n")
            second = f.readline()
    except UnicodeDecodeError:
        raise GenRecError(f"{path} is not {encoding} text: convert it or set --encoding") from None
    if not head.strip():
        raise GenRecError(f"{path} is empty: a RecBole atomic file starts with a header such as "
                          "'user_id:token<TAB>item_id:token<TAB>timestamp:float'")
    columns = []
    for field in head.split(sep):
        name, colon, ftype = field.partition(":")
        if not colon or not name or ftype not in FEATURE_TYPES:
            raise GenRecError(
                f"{path}: header column {field!r} is not NAME:TYPE with TYPE one of {list(FEATURE_TYPES)} "
                f"(columns split by {sep!r}; set --field_separator if the file uses another): fix the header line")
        columns.append((name, ftype))
    return columns, bool(second.strip())


def _loaded_columns(config, kind, columns):
    load_col = _get(config, "load_col")
    unload = (_get(config, "unload_col") or {}).get(kind) or []
    if load_col is None or load_col.get(kind) == "*":
        wanted = [c for c, _ in columns]
    else:
        wanted = list(load_col.get(kind) or [])
    return [c for c in wanted if c not in unload]


def check_float_columns(path, config, columns, loaded):
    """Every loaded ``float``/``float_seq`` value of ``path`` parses as a number (empty cells are missing values)."""
    import pandas as pd

    floats = [(c, t) for c, t in columns if t in ("float", "float_seq") and c in loaded]
    if not floats:
        return
    sep = _get(config, "field_separator") or "\t"
    seq_sep = _get(config, "seq_separator") or " "
    header = [f"{c}:{t}" for c, t in columns]
    df = pd.read_csv(path, sep=sep, usecols=[f"{c}:{t}" for c, t in floats], dtype=str,
                     encoding=_get(config, "encoding") or "utf-8", engine="python" if len(sep) > 1 else "c",
                     keep_default_na=False, names=header, skiprows=1, quoting=3)
    for column, ftype in floats:
        values = df[f"{column}:{ftype}"]
        if ftype == "float":
            cells = values.str.strip()
            parsed = pd.to_numeric(cells.where(cells != ""), errors="coerce")
            bad = parsed.isna() & (cells != "") & ~cells.str.lower().isin(["nan", "na", "n/a", "null", "none"])
        else:
            def bad_seq(cell):
                try:
                    [float(x) for x in cell.split(seq_sep) if x]
                    return False
                except ValueError:
                    return True
            bad = values.map(bad_seq)
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            raise GenRecError(
                f"{path}: column {column!r} ({ftype}) holds {values.iloc[row]!r} on line {row + 2}, not a number: "
                f"fix the value, or leave the column out with load_col (e.g. --load_col=\"{{'inter': [...]}}\" "
                "naming only the columns the model needs)")


def check_dataset_files(config):
    """Folder, files, headers, required columns and float values; see the module doc."""
    folder = Path(config["data_path"])
    name = config["dataset"]
    if not folder.is_dir():
        raise GenRecError(
            f"dataset folder {str(folder)!r} not found: put RecBole atomic files there or pass "
            f"--data_path=DIR (the folder that contains {name}/)"
        )
    files = inter_files(config)
    for path in files:
        if not path.is_file():
            if _get(config, "benchmark_filename"):
                raise GenRecError(f"{str(path)!r} not found: benchmark_filename={config['benchmark_filename']} "
                                  f"needs {', '.join(p.name for p in files)} in {folder}")
            raise GenRecError(f"{str(path)!r} not found: a RecBole dataset needs {path.name} in {folder} "
                              "(or pre-split NAME.train/valid/test.inter files with --benchmark_filename)")
    benchmark = bool(_get(config, "benchmark_filename"))
    uid, iid, time_field = config["USER_ID_FIELD"], config["ITEM_ID_FIELD"], _get(config, "TIME_FIELD")
    sequential = _model_type(config) == "SEQUENTIAL"
    order = (_get(config, "eval_args") or {}).get("order")
    for path in files:
        columns, has_rows = read_header(path, config)
        names = [c for c, _ in columns]
        if not has_rows:
            raise GenRecError(f"{path} has a header but no interactions: add rows (one interaction per line)")
        loaded = _loaded_columns(config, "inter", columns)
        missing = [c for c in loaded if c not in names]
        if missing and _get(config, "load_col") is not None:
            raise GenRecError(f"load_col names {missing} for the .inter file, but {path.name} has columns {names}: "
                              "fix load_col or the header")
        for key, field in (("USER_ID_FIELD", uid), ("ITEM_ID_FIELD", iid)):
            if field not in names:
                raise GenRecError(f"{key}={field!r} is not a column of {path.name} (columns {names}): "
                                  f"set --{key}=<column> or rename the column")
            if field not in loaded:
                raise GenRecError(f"{key}={field!r} is left out by load_col/unload_col: add it to load_col['inter']")
        if not benchmark and (sequential or order == "TO"):
            if not time_field or time_field not in names:
                guess = [c for c, t in columns if t == "float" and "time" in c.lower()]
                fix = f"set --TIME_FIELD={guess[0]}" if guess else \
                    "add a timestamp:float column (sequential models and time-ordered splits need one)"
                raise GenRecError(f"TIME_FIELD={time_field!r} is not a column of {path.name} (columns {names}): "
                                  f"{fix}")
            if time_field not in loaded:
                raise GenRecError(f"TIME_FIELD={time_field!r} is left out by load_col/unload_col: add it to "
                                  "load_col['inter']")
        if benchmark and sequential:
            list_field = iid + (_get(config, "LIST_SUFFIX") or "_list")
            if list_field not in names:
                raise GenRecError(f"{path.name} has no {list_field!r} column (columns {names}): pre-split "
                                  f"sequential files hold each history as '{list_field}:token_seq' (and "
                                  f"--alias_of_item_id=\"['{list_field}']\")")
        check_float_columns(path, config, columns, loaded)
    for kind in ("item", "user"):
        path = folder / f"{name}.{kind}"
        load_col = _get(config, "load_col")
        if not path.is_file() or (load_col is not None and kind not in load_col):
            continue
        columns, _ = read_header(path, config)
        names = [c for c, _ in columns]
        key, field = ("ITEM_ID_FIELD", iid) if kind == "item" else ("USER_ID_FIELD", uid)
        if field not in names:
            raise GenRecError(f"{path.name} has no {key} column {field!r} (columns {names}): rename the column or "
                              f"leave the file out with load_col")
        loaded = _loaded_columns(config, kind, columns)
        missing = [c for c in loaded if c not in names]
        if missing and load_col is not None:
            raise GenRecError(f"load_col names {missing} for the .{kind} file, but {path.name} has columns {names}: "
                              "fix load_col or the header")
        check_float_columns(path, config, columns, loaded)


# ---- the loaded dataset -------------------------------------------------------------------------
def create_dataset(config):
    """RecBole's ``create_dataset`` with its filtering failure as a one-line error, then :func:`check_dataset`
    and the pre-split history cut (:func:`cut_benchmark_histories`)."""
    from recbole.data import create_dataset as recbole_create_dataset

    try:
        dataset = recbole_create_dataset(config)
    except ValueError as err:
        if "Some feat is empty" not in str(err):
            raise
        raise GenRecError(
            f"no interactions of {config['dataset']} are left after filtering (user_inter_num_interval="
            f"{_get(config, 'user_inter_num_interval')}, item_inter_num_interval="
            f"{_get(config, 'item_inter_num_interval')}, val_interval={_get(config, 'val_interval')}): loosen them, "
            "e.g. --user_inter_num_interval=\"[0,inf)\" --item_inter_num_interval=\"[0,inf)\"") from None
    cut_benchmark_histories(config, dataset)
    check_dataset(config, dataset)
    return dataset


def cut_benchmark_histories(config, dataset):
    """Pre-split sequential files carry each history as a list column that may be longer than
    ``MAX_ITEM_LIST_LENGTH``; keep its ``MAX_ITEM_LIST_LENGTH`` most recent (last) items, as RecBole's own
    augmentation does for ``.inter`` data (RecBole's ``seq_len`` cut would keep the oldest). Returns how many
    histories were cut."""
    if not _get(config, "benchmark_filename") or _model_type(config) != "SEQUENTIAL":
        return 0
    list_field = getattr(dataset, "item_id_list_field", None)
    length_field = getattr(dataset, "item_list_length_field", None)
    feat = dataset.inter_feat
    if list_field is None or list_field not in feat:
        return 0
    max_len = int(config["MAX_ITEM_LIST_LENGTH"])
    lengths = feat[list_field].map(len)
    cut = int((lengths > max_len).sum())
    if cut:
        feat[list_field] = [seq[-max_len:] for seq in feat[list_field].values]
        dataset.field2seqlen[list_field] = min(max_len, int(lengths.max()))
        from logging import getLogger

        getLogger().warning(f"{cut} pre-split histories are longer than MAX_ITEM_LIST_LENGTH={max_len}: "
                            "each keeps its most recent items")
    if length_field is not None and length_field in feat:
        feat[length_field] = feat[list_field].map(len)
    return cut


def check_dataset(config, dataset):
    """Checks that need the loaded, filtered dataset (still before the split and any training)."""
    n_items = int(dataset.item_num) - 1  # RecBole's item 0 is padding
    topk = config["topk"] if isinstance(config["topk"], (list, tuple)) else [config["topk"]]
    if max(topk) > n_items:
        fit = [k for k in topk if k <= n_items] or [n_items]
        raise GenRecError(f"topk K={max(topk)} exceeds the {n_items} items of {config['dataset']} (after filtering): "
                          f"set --topk=\"{fit}\" (and a valid_metric at one of those K)")
    beam = _get(config, "beam_size")
    if beam is not None and _get(config, "codebook_size") and _get(config, "num_codebooks") \
            and _get(config, "collision") == "reassign":
        capacity = int(config["codebook_size"]) ** int(config["num_codebooks"])
        if capacity < n_items:
            raise GenRecError(f"codebook_size={config['codebook_size']} ** num_codebooks={config['num_codebooks']} = "
                              f"{capacity} IDs cannot name {n_items} items with collision=reassign: raise "
                              "--codebook_size or --num_codebooks, or use --collision=append")
