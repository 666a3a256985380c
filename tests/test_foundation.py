"""The plugin's run path: CLI, config layering, protocol, result JSON, safe checkpoints, bad input."""
import json
import os
import sys

import pytest
import torch

from conftest import tiny_config_dict
from recbole_genrec import registry, utils
from recbole_genrec.config import Config
from recbole_genrec.quick_start import main, run_recbole_genrec
from recbole_genrec.trainer import load_checkpoint

METRIC_KEYS = {f"{m}@{k}" for m in ("hit", "ndcg", "recall", "mrr") for k in (5, 10, 20)}


def cli_args(data_path, dataset, **extra):
    args = {"data_path": data_path, "dataset": dataset, "epochs": 1, "train_batch_size": 64,
            "eval_batch_size": 64, "show_progress": False, "state": "WARNING", "seed": 7}
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


def test_cli_trains_stock_sasrec_and_writes_result_json(tiny_dataset, run_dirs, capsys):
    data_path, name = tiny_dataset
    result_file = run_dirs / "out" / "sasrec.json"
    code = main(["--model=SASRec", *cli_args(data_path, name, result_file=result_file)])
    assert code == 0
    record = json.loads(result_file.read_text())
    assert record["model"] == "SASRec" and record["dataset"] == name and record["seed"] == 7
    assert set(record["test_result"]) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for v in record["test_result"].values())
    assert set(record["best_valid_result"]) == METRIC_KEYS
    assert record["timings"]["epochs_trained"] == 1 and record["timings"]["peak_rss_mib"] > 0
    assert record["config"]["MAX_ITEM_LIST_LENGTH"] == 20
    assert record["config"]["eval_args"]["split"] == {"LS": "valid_and_test"}
    assert str(result_file.resolve()) in capsys.readouterr().out
    assert not [p for p in os.listdir(result_file.parent) if p.endswith(".tmp")]


def test_same_metrics_as_recbole_run_recbole_and_same_seed_same_metrics(tiny_dataset, run_dirs, monkeypatch):
    data_path, name = tiny_dataset
    config_dict = tiny_config_dict(data_path)
    ours = run_recbole_genrec("SASRec", name, config_dict=dict(config_dict), saved=False)
    again = run_recbole_genrec("SASRec", name, config_dict=dict(config_dict), saved=True)
    assert again["test_result"] == ours["test_result"]

    # RecBole's own run path, with the plugin's protocol written out as a plain config dict.
    from recbole.quick_start import run_recbole

    protocol = {k: v for k, v in Config("SASRec", name, config_dict=dict(config_dict)).final_config_dict.items()
                if k in ("eval_args", "MAX_ITEM_LIST_LENGTH", "user_inter_num_interval", "item_inter_num_interval",
                         "metrics", "topk", "valid_metric", "stopping_step", "repeatable")}
    protocol["train_neg_sample_args"] = None  # what a RecBole user must set by hand for CE-loss SASRec
    monkeypatch.setattr(sys, "argv", ["run_recbole"])
    theirs = run_recbole(model="SASRec", dataset=name, config_dict={**config_dict, **protocol}, saved=False)
    assert dict(theirs["test_result"]) == ours["test_result"]


def test_library_config_does_not_read_sys_argv(tiny_dataset, monkeypatch):
    data_path, name = tiny_dataset
    monkeypatch.setattr(sys, "argv", ["pytest", "--epochs=999", "-k", "x"])
    config = Config("SASRec", name, config_dict={"data_path": data_path})
    assert config["epochs"] != 999
    config = Config("SASRec", name, config_dict={"data_path": data_path}, cmd_args=["--epochs=3"])
    assert config["epochs"] == 3


def test_ml_100k_resolves_to_the_copy_recbole_ships():
    config = Config("SASRec", "ml-100k")
    assert os.path.isfile(os.path.join(config["data_path"], "ml-100k.inter"))
    assert config["topk"] == [5, 10, 20] and config["valid_metric"] == "NDCG@10"
    assert config["train_neg_sample_args"]["distribution"] == "none"  # CE loss: full softmax, no negatives


def test_existing_cuda_visible_devices_is_left_alone(tiny_dataset, monkeypatch):
    data_path, name = tiny_dataset
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    Config("SASRec", name, config_dict={"data_path": data_path})
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_plugin_model_names_with_plus_and_minus_are_accepted(tiny_dataset, monkeypatch):
    data_path, name = tiny_dataset
    from recbole_genrec import model as model_pkg

    monkeypatch.setitem(model_pkg.MODEL_REGISTRY, "SAS-Rec++", "recbole.model.sequential_recommender.sasrec:SASRec")
    config = Config("SAS-Rec++", name, config_dict={"data_path": data_path, "loss_type": "CE"})
    assert config["model"] == "SAS-Rec++" and config.model_class.__name__ == "SASRec"


def test_checkpoints_are_unique_atomic_and_weights_only(tiny_dataset, run_dirs):
    data_path, name = tiny_dataset
    first = run_recbole_genrec("SASRec", name, config_dict=tiny_config_dict(data_path))
    second = run_recbole_genrec("SASRec", name, config_dict=tiny_config_dict(data_path))
    assert first["checkpoint"] != second["checkpoint"]
    state = torch.load(first["checkpoint"], weights_only=True)  # no pickle needed to read it back
    assert state["config"]["model"] == "SASRec" and "state_dict" in state
    assert first["test_result"] == second["test_result"]


def test_a_pickled_or_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"config": object.__new__(Config)}, path)
    with pytest.raises(utils.GenRecError, match="cannot be read safely"):
        load_checkpoint(path)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(utils.GenRecError, match="cannot be read safely"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model=NoSuchModel"], "unknown model 'NoSuchModel'"),
        (["--model=SASRec", "--epochs=abc"], "config key 'epochs' expects int"),
        (["--model=SASRec", "--valid_metric=NDCG@50"], "valid_metric 'NDCG@50' is not among metrics"),
        (["--model=SASRec", "--valid_metric=NDCG@ten"], "valid_metric 'NDCG@ten' is not among metrics"),
        (["--model=SASRec", "--dataset=nowhere"], "dataset folder"),
        (["--model=SASRec", "--config_files=missing.yaml"], "config file 'missing.yaml' not found"),
        (["--model=SASRec", "epochs"], "unrecognised argument 'epochs'"),
        (["--model=SASRec", "--device=tpu"], "device must be"),
        (["--model=SASRec", "--train_time_budget=-5"], "train_time_budget must be a positive number"),
    ],
)
def test_bad_input_ends_in_one_line_error(tiny_dataset, run_dirs, capsys, args, message):
    data_path, name = tiny_dataset
    base = {"--dataset": f"--dataset={name}", "--data_path": f"--data_path={data_path}", "--state": "--state=WARNING"}
    given = {a.split("=")[0] for a in args}
    code = main(args + [v for k, v in base.items() if k not in given])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err and err[-1].startswith("error: ") and message in err[-1]


def test_train_time_budget_stops_at_an_epoch_boundary_and_tests_the_best_checkpoint(tiny_dataset, run_dirs):
    data_path, name = tiny_dataset
    config_dict = {**tiny_config_dict(data_path), "epochs": 50, "stopping_step": 100, "train_time_budget": 1e-6}
    record = run_recbole_genrec("SASRec", name, config_dict=config_dict)
    # the budget is checked before each epoch after the first: exactly one epoch runs, then the test
    assert record["timings"]["epochs_trained"] == 1
    assert record["timings"]["stopped_by_time_budget"] is True
    assert set(record["test_result"]) == METRIC_KEYS and os.path.exists(record["checkpoint"])
    unlimited = run_recbole_genrec("SASRec", name, config_dict={**config_dict, "epochs": 2, "train_time_budget": None})
    assert unlimited["timings"]["epochs_trained"] == 2 and unlimited["timings"]["stopped_by_time_budget"] is False
    # the per-epoch curves: one train loss per epoch, one valid_metric value per validation, the best one reported
    timings = unlimited["timings"]
    assert len(timings["train_loss"]) == 2 and all(loss > 0 for loss in timings["train_loss"])
    assert len(timings["valid_scores"]) == 2 and max(timings["valid_scores"]) == unlimited["best_valid_score"]


FAULTS_SCRIPT = """
import resource, sys
if sys.argv[1] == "reuse":
    import recbole_genrec  # sets THP_MEM_ALLOC_ENABLE before PyTorch's first allocation
    from recbole_genrec.utils import keep_freed_memory_for_reuse
    assert keep_freed_memory_for_reuse()
import torch
torch.empty(16 * 2**20).fill_(1.0)  # warm up: the first 64 MiB block is faulted in either way
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 * 2**20).fill_(1.0)  # a 64 MiB activation, freed at the end of each "step"
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_reuse_stops_refaulting_freed_activations():
    import subprocess

    def faults(mode, thp):
        env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env=env)
        return int(out.stdout.split()[-1])

    default = faults("default", "0")
    assert default > 10 * 16384 * 0.9  # glibc maps and unmaps each 64 MiB block: every 4 KiB page faults again
    reuse = faults("reuse", "1")
    assert reuse < default / 5


def test_pop_counts_every_interaction_whatever_the_batch_size(tiny_dataset, run_dirs):
    """RecBole 1.2.1's Pop counts an item once per batch and counts sampled negatives (issues #1844, #2198)."""
    from recbole_genrec.quick_start import load_config, prepare_data

    data_path, name = tiny_dataset
    config = load_config("Pop", name, config_dict=tiny_config_dict(data_path, train_batch_size=4096))
    dataset, train_data, *_ = prepare_data(config)
    model = registry.get_model("Pop")(config, train_data.dataset)
    for batch in train_data:
        model.calculate_loss(batch)
    items = train_data.dataset.inter_feat[config["ITEM_ID_FIELD"]]
    expected = torch.bincount(items, minlength=dataset.item_num)
    assert torch.equal(model.item_cnt.squeeze(-1), expected) and expected.max() > 1
    results = [run_recbole_genrec("Pop", name, config_dict=tiny_config_dict(data_path, train_batch_size=b),
                                  saved=False)["test_result"] for b in (7, 4096)]
    assert results[0] == results[1]
