"""Hyperparameter search (issue 7): search-space parsing, data reuse rules, and real Ray Tune searches
on a tiny generated dataset (one search that succeeds, one with a failing trial that must not stop it)."""
import csv
import json
import math
import os
from pathlib import Path

import pytest

from conftest import tiny_config_dict, write_atomic_dataset
from recbole_genrec.hyper import data_changes, main, parse_space_line, read_search_space, to_tune_space
from recbole_genrec.quick_start import load_config
from recbole_genrec.utils import GenRecError

SASREC_TINY = ["--epochs=2", "--n_layers=1", "--n_heads=1", "--hidden_size=16", "--inner_size=32"]


def tiny_settings(data_path, **overrides):
    """tiny_config_dict without item text (SASRec does not need it)."""
    settings = tiny_config_dict(data_path, load_col={"inter": ["user_id", "item_id", "rating", "timestamp"]},
                                text_fields=[])
    settings.update(overrides)
    return settings


# ---- search space file --------------------------------------------------------------------------
def test_space_lines_in_yaml_and_recbole_style():
    assert parse_space_line("learning_rate: loguniform -8 -4  # natural logs") == (
        "learning_rate", "loguniform", [-8.0, -4.0])
    assert parse_space_line("learning_rate loguniform -8 -4") == ("learning_rate", "loguniform", [-8.0, -4.0])
    assert parse_space_line("hidden_size: choice [32, 64]") == ("hidden_size", "choice", [32, 64])
    assert parse_space_line("aggregator: choice [mean, 'proj_mean']") == ("aggregator", "choice", ["mean", "proj_mean"])
    assert parse_space_line("layers: choice [[64, 64], [128]]") == ("layers", "choice", [[64, 64], [128]])
    assert parse_space_line("   # comment only") is None
    domains = to_tune_space({"learning_rate": ("loguniform", [-8.0, -4.0]), "n": ("randint", [1.0, 4.0])})
    assert math.isclose(domains["learning_rate"].lower, math.exp(-8))
    assert math.isclose(domains["learning_rate"].upper, math.exp(-4))
    assert (domains["n"].lower, domains["n"].upper) == (1, 4)


@pytest.mark.parametrize("bad", ["learning_rate: loguniform -4", "learning_rate: logunif -8 -4",
                                 "hidden_size: choice 32, 64", "dropout: uniform 0.5 0.1", "= 3"])
def test_malformed_line_is_one_line_error_naming_it(tmp_path, bad):
    path = tmp_path / "space.yaml"
    path.write_text(f"hidden_dropout_prob: uniform 0.1 0.5\n\n{bad}\n")
    with pytest.raises(GenRecError) as err:
        read_search_space(path)
    message = str(err.value)
    assert "\n" not in message and "line 3" in message and bad.strip() in message


def test_cli_bad_space_file_exits_2(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: loguniform -4 -8\n")
    assert main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "line 1" in err and "\n" not in err


def test_fixed_and_searched_clash(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: loguniform -8 -4\n")
    assert main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={path}", "--learning_rate=0.1"]) == 2


# ---- which trial settings force a data rebuild -------------------------------------------------------
def test_data_changes(tiny_dataset):
    data_path, name = tiny_dataset
    base = load_config("SASRec", name, config_dict=tiny_settings(data_path))

    def change(**params):
        return data_changes(base, load_config("SASRec", name, config_dict=tiny_settings(data_path, **params)))[0]

    assert change(learning_rate=0.01, hidden_size=32) is None  # the shared data is reused
    assert change(train_batch_size=32) == "loaders"            # dataloaders rebuilt from the shared dataset
    assert change(MAX_ITEM_LIST_LENGTH=10) == "dataset"         # the dataset is rebuilt in the trial


# ---- real searches (one local Ray for the module) ------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hyper_data")
    write_atomic_dataset(str(root), name="tiny", with_text=False)
    return str(root)


def _search(tmp_path, data_path, space_text, **kwargs):
    from recbole_genrec.hyper import run_hyper

    space = tmp_path / "space.yaml"
    space.write_text(space_text)
    return run_hyper("SASRec", "tiny", str(space), config_dict=tiny_settings(data_path), cmd_args=SASREC_TINY,
                     output=str(tmp_path / "out"), cpus_per_trial=1, **kwargs)


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_two_trial_search_writes_table_best_and_plot(local_ray, tiny_data, run_dirs):
    summary = _search(run_dirs, tiny_data, "learning_rate: loguniform -8 -4\nhidden_dropout_prob: uniform 0.1 0.5\n",
                      num_samples=2, scheduler="asha")
    out = run_dirs / "out"
    rows = _read_csv(out / "trials.csv")
    assert len(rows) == 2 and summary["num_failed"] == 0
    assert {r["status"] for r in rows} <= {"completed", "stopped early"}
    assert len({r["learning_rate"] for r in rows}) == 2
    assert len({r["checkpoint_dir"] for r in rows}) == 2 and all(os.path.isabs(r["checkpoint_dir"]) for r in rows)
    best = json.loads((out / "best.json").read_text())["best"]
    assert best["trial_id"] in {r["trial_id"] for r in rows}
    assert set(best["params"]) == {"learning_rate", "hidden_dropout_prob"}
    assert "ndcg@10" in best["valid_result"] and "ndcg@10" in best["test_result"]
    assert best["valid_result"]["ndcg@10"] == pytest.approx(best["best_valid_score"], abs=1e-4)
    assert best["config"]["learning_rate"] == pytest.approx(best["params"]["learning_rate"])
    assert os.path.isfile(best["checkpoint"])
    assert (out / "valid_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    # every validation was reported to Tune (one row per epoch), and no trial evaluated the test set
    for row in rows:
        progress = _read_csv(os.path.join(row["trial_dir"], "progress.csv"))
        assert [int(p["epoch"]) for p in progress] == list(range(1, int(row["epochs"]) + 1))
        assert not any(key.startswith("test") for key in progress[0])


def test_failing_trial_is_recorded_and_search_goes_on(local_ray, tiny_data, run_dirs):
    # grid: exactly one trial with a valid learning rate and one that torch's optimizer rejects
    summary = _search(run_dirs, tiny_data, "learning_rate: grid [0.005, -1.0]\n", num_samples=1, scheduler="fifo")
    rows = {float(r["learning_rate"]): r for r in _read_csv(run_dirs / "out" / "trials.csv")}
    # the trial's Config refuses it before any data or training (recbole_genrec/checks.py, shared by every run path)
    assert rows[-1.0]["status"] == "failed" and "learning_rate must be a number > 0" in rows[-1.0]["error"]
    assert rows[0.005]["status"] == "completed" and int(rows[0.005]["epochs"]) == 2
    assert summary["num_failed"] == 1
    assert summary["best"]["params"] == {"learning_rate": 0.005}
    assert "ndcg@10" in summary["best"]["test_result"]


def test_trials_use_the_drivers_yaml_layers(tiny_dataset, tmp_path):
    from recbole_genrec.hyper import config_layers, trial_config

    data_path, name = tiny_dataset
    extra = tmp_path / "extra.yaml"
    extra.write_text("hidden_dropout_prob: 0.3\n")
    base = load_config("SASRec", name, [str(extra)], tiny_settings(data_path))
    spec = {"model": "SASRec", "dataset": name, "layers": config_layers(base), "cmd_args": []}
    extra.write_text("hidden_dropout_prob: 0.9\n")  # edited while the search runs: trials keep the driver's
    config = trial_config(spec, {**tiny_settings(data_path), "learning_rate": 0.01})
    assert config["hidden_dropout_prob"] == 0.3 and config["learning_rate"] == 0.01
    assert data_changes(base, config)[0] is None


@pytest.mark.parametrize("space_file", sorted((Path(__file__).parent.parent / "properties" / "hyper").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_search_space_names_keys_its_model_knows(space_file, tiny_dataset):
    """A provisional or misspelt key in a shipped space would silently search nothing: each key must be set
    in the model's resolved config (RecBole's defaults + the plugin's layers)."""
    from recbole_genrec.config import Config

    space = read_search_space(space_file)
    assert space, f"{space_file} is empty"
    data_path, name = tiny_dataset
    config = Config(space_file.stem, name, config_dict=tiny_config_dict(data_path))
    unknown = [key for key in space if key not in config.final_config_dict]
    assert not unknown, f"{space_file.name}: keys not in {space_file.stem}'s config: {unknown}"


def test_a_search_refuses_a_multi_process_run(tmp_path, capsys):
    path = tmp_path / "space.yaml"
    path.write_text("learning_rate: loguniform -8 -4\n")
    assert main(["--model=SASRec", "--dataset=ml-100k", f"--params_file={path}", "--nproc=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "one process" in err and "\n" not in err
