"""Collaborative item embeddings for LETTER's collaborative regularisation (LETTER's L_CF).

``collab_item_embeddings(config, dataset, folder)`` trains stock RecBole ``SASRec`` on the same dataset,
filtering and split as the run (the shared protocol) for ``letter_cf_epochs`` epochs (early stopping on
the validation metric still applies; ``letter_cf_time_budget`` seconds caps it) and returns the item
embedding matrix of its last trained epoch, ``[item_num, rqvae_latent_dim]`` (row = RecBole internal item
id, row 0 = padding). The SASRec's hidden size is the RQ-VAE latent size, as in the official code (a 32-d
SASRec for ``e_dim = 32``).

Cached once under ``cache_dir/semantic_ids/<dataset>/cf-sasrec-<key>.safetensors`` (checksummed JSON
sidecar, atomic writes, no pickle), keyed by dataset, item tokens, the raw ``.inter`` file (line count +
hash), the data and split settings, seed and the SASRec settings; a corrupt or stale entry is logged and
retrained. Training runs with the global random states saved and restored.
"""
import random
import time
from contextlib import contextmanager
from logging import getLogger
from pathlib import Path

import numpy as np
import torch

from recbole_genrec import distributed
from recbole_genrec.data.cache import load_tensors, save_tensors, sha256_bytes, stable_hash
from recbole_genrec.utils import GenRecError, int_setting, seconds_setting, timed_phase

CF_VERSION = 1
# Settings copied from the run's config into the SASRec's: what defines the data, the split and the device.
_CARRIED_KEYS = ("seed", "reproducibility", "state", "show_progress",
                 "checkpoint_dir", "field_separator", "seq_separator", "USER_ID_FIELD", "ITEM_ID_FIELD",
                 "RATING_FIELD", "TIME_FIELD", "MAX_ITEM_LIST_LENGTH", "load_col", "unload_col", "unused_col",
                 "rm_dup_inter", "val_interval", "filter_inter_by_user_or_item", "user_inter_num_interval",
                 "item_inter_num_interval", "alias_of_item_id", "benchmark_filename", "eval_args",
                 "metrics", "topk", "valid_metric", "valid_metric_bigger", "eval_batch_size", "stopping_step")
# Carried keys left out of the cache key: bookkeeping, and data_path (the .inter file's hash stands for the data).
# not part of the cache key: where files go, logging, and the device (ranks of a multi-process run on GPUs 0 and 1
# must find rank 0's SASRec)
_UNKEYED = ("data_path", "state", "show_progress", "checkpoint_dir", "eval_batch_size", "device")


@contextmanager
def _isolated_rng():
    """Restore Python's, NumPy's and torch's global random states afterwards (RecBole re-seeds all three)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def cf_settings(config):
    """The SASRec settings of the collaborative embeddings (validated)."""
    return {"model": "SASRec", "epochs": int_setting(config, "letter_cf_epochs", 50),
            "hidden_size": int_setting(config, "rqvae_latent_dim", 32),
            "train_time_budget": seconds_setting(config, "letter_cf_time_budget")}


def _inter_file_fingerprint(config):
    """Line count (header + interactions) and SHA-256 of the raw ``.inter`` file: new data, new embeddings.
    (The dataset handed to the tokenizer may be a training split, so its own interaction count is not used.)"""
    path = Path(config["data_path"]) / f"{config['dataset']}.inter"
    data = path.read_bytes()
    return {"lines": data.count(b"\n"), "sha256": sha256_bytes(data)[:16]}


def _sasrec_config_dict(config, settings):
    final = config.final_config_dict
    carried = {k: final[k] for k in _CARRIED_KEYS if final.get(k) is not None}
    carried["data_path"] = str(Path(final["data_path"]).parent)  # RecBole's final data_path ends in <dataset>
    if final.get("device") is not None:
        carried["device"] = str(final["device"])
    return {**carried, "epochs": settings["epochs"], "hidden_size": settings["hidden_size"],
            "train_time_budget": settings["train_time_budget"]}


def sasrec_cache_meta(config, dataset, settings):
    """What a SASRec trained for ``dataset`` with ``settings`` depends on (cache key material)."""
    sas_dict = _sasrec_config_dict(config, settings)
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    return {"kind": "cf_sasrec", "cf_version": CF_VERSION, "dataset": str(config["dataset"]),
            "item_tokens": stable_hash(tokens), "num_items": len(tokens),
            "inter_file": _inter_file_fingerprint(config),
            "sasrec": settings, "data": {k: v for k, v in sas_dict.items() if k not in _UNKEYED}}


def train_sasrec(config, dataset, settings):
    """``(model, trainer)``: stock RecBole SASRec (``settings``: epochs, hidden_size, train_time_budget) trained
    on the same data, filtering and split as ``config``'s run, early stopping on its valid metric; the
    caller's random states are left as they were."""
    from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data

    with distributed.auxiliary_run():  # single-process even on rank 0 of a multi-process run
        sas_config = load_config("SASRec", config["dataset"], config_dict=_sasrec_config_dict(config, settings))
        tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
        with _isolated_rng():  # a cache miss must not shift the caller's random streams (model init after this)
            sas_dataset, train, valid, _ = prepare_data(sas_config)
            sas_tokens = [str(t) for t in sas_dataset.field2id_token[sas_dataset.iid_field]]
            if sas_tokens != tokens:
                raise GenRecError("the SASRec for the collaborative embeddings saw different items than the run: "
                                  "keep data settings (load_col, filters, data_path) in config files or --key=value")
            model, trainer = build_model_and_trainer(sas_config, train)
            with timed_phase("sasrec_fit"):
                trainer.fit(train, valid, saved=False, show_progress=bool(sas_config["show_progress"]))
    return model, trainer


def collab_item_embeddings(config, dataset, folder, rebuild=False):
    """``(embeddings [item_num, hidden], meta)``: SASRec item embeddings for ``dataset``, from the cache
    in ``folder`` when valid, else trained (``meta['from_cache']`` says which; ``meta['path']`` the file)."""
    logger = getLogger()
    settings = cf_settings(config)
    key_meta = sasrec_cache_meta(config, dataset, settings)
    tokens = [str(t) for t in dataset.field2id_token[dataset.iid_field]]
    path = folder / f"cf-sasrec-{stable_hash(key_meta)}.safetensors"
    hit = None if rebuild else load_tensors(path, key_meta)
    if hit is not None:
        emb = hit[0].get("item_embeddings")
        if emb is not None and emb.shape == (len(tokens), settings["hidden_size"]):
            return emb.float(), {**hit[1], "path": str(path), "from_cache": True}
        logger.warning(f"cache {path} holds a malformed embedding matrix; retraining it")

    start = time.perf_counter()
    model, trainer = train_sasrec(config, dataset, settings)
    emb = model.item_embedding.weight.detach().float().cpu()
    meta = {**key_meta, "train_seconds": round(time.perf_counter() - start, 3),
            "epochs_trained": len(trainer.timings["train_epoch_seconds"]),
            "best_valid_score": float(trainer.best_valid_score) if trainer.best_valid_score is not None else None}
    save_tensors(path, {"item_embeddings": emb}, meta)
    logger.info(f"LETTER collaborative embeddings: SASRec {settings['hidden_size']}-d, "
                f"{meta['epochs_trained']} epochs, {meta['train_seconds']:.1f} s -> {path}")
    return emb, {**meta, "path": str(path), "from_cache": False}
