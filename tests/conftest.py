"""Shared fixtures: small generated datasets in RecBole atomic format (no download, seconds to build)."""
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance", "Sci-Fi"]


def pytest_configure(config):
    """A deprecation raised by this package's own calls fails the suite (issue 16: transformers' `past_key_values`
    warned on every beam search before it was removed); RecBole's, ray's and pandas' own warnings do not."""
    for module in ("recbole_genrec", "transformers", "sentence_transformers"):
        for category in ("DeprecationWarning", "FutureWarning"):
            config.addinivalue_line("filterwarnings", f"error::{category}:{module}")
    # raised by peft's own call (peft_model.py reads model.is_gradient_checkpointing), not by this package's
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def write_atomic_dataset(root, name="tiny", n_users=40, n_items=30, per_user=12, seed=0, with_text=True,
                         missing_text_items=()):
    """Write ``root/name/name.inter`` (+ ``.item``) with sequential structure a model can learn.

    Users walk through items in steps of one or two from a random start, so next-item prediction is
    learnable; every user and item clears the 5-core filter of the shared protocol.
    Returns the dataset folder's parent (pass it as ``data_path``).
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        item = int(rng.integers(1, n_items + 1))
        for t in range(per_user):
            lines.append(f"{u}\t{item}\t{int(rng.integers(1, 6))}\t{u * 1000 + t}")
            item = (item - 1 + int(rng.integers(1, 3))) % n_items + 1
    with open(os.path.join(folder, f"{name}.inter"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if with_text:
        rows = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        for i in range(1, n_items + 1):
            if i in missing_text_items:
                rows.append(f"{i}\t\t\t")
            else:
                rows.append(f"{i}\tMovie number {i}\t{1990 + i % 10}\t{GENRES[i % len(GENRES)]}")
        with open(os.path.join(folder, f"{name}.item"), "w") as f:
            f.write("\n".join(rows) + "\n")
    return root


def tiny_config_dict(data_path, **overrides):
    """Settings that make a run finish in seconds on 2 CPU cores."""
    config = {
        "data_path": str(data_path),
        "epochs": 1,
        "train_batch_size": 64,
        "eval_batch_size": 64,
        "show_progress": False,
        "state": "WARNING",
        "seed": 7,
        "load_col": {"inter": ["user_id", "item_id", "rating", "timestamp"],
                     "item": ["item_id", "movie_title", "release_year", "class"]},
        "text_fields": ["movie_title", "release_year", "class"],
    }
    config.update(overrides)
    return config


@pytest.fixture
def tiny_dataset(tmp_path):
    """``(data_path, dataset_name)`` of a small generated dataset with item text."""
    write_atomic_dataset(str(tmp_path), name="tiny")
    return str(tmp_path), "tiny"


@pytest.fixture
def run_dirs(tmp_path, monkeypatch):
    """Run inside a temp dir so checkpoints, logs, caches and results never touch the repo."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
