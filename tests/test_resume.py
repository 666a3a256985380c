"""Issue 16, case 8: a run killed after its first epoch and resumed with --resume reaches the same final metrics
as a run that was never stopped (same seed): weights, optimizer, LR schedule, RNG states, the loader's shuffling
generator, early-stopping counters and the best checkpoint all carry over."""
import glob
import json

import pytest
import torch

from conftest import tiny_config_dict
from recbole_genrec.model import tiger as tiger_module
from recbole_genrec.quick_start import main, run_recbole_genrec
from recbole_genrec.utils import GenRecError
from tests.test_tiger import TINY_TIGER, fake_semantic_ids


class Killed(Exception):
    pass


def kill_after_first_epoch(epoch_idx, valid_result):
    if epoch_idx == 0:
        raise Killed()


def interrupted_then_resumed(model, config_dict, run_dirs):
    with pytest.raises(Killed):
        run_recbole_genrec(model, config_dict["dataset"], config_dict={**config_dict, "checkpoint_dir": "killed"},
                           epoch_callback=kill_after_first_epoch)
    resume_files = glob.glob(str(run_dirs / "killed" / "*-resume.pth"))
    assert len(resume_files) == 1
    state = torch.load(resume_files[0], weights_only=True)  # still weights-only loadable
    assert state["epoch"] == 0 and "rng" in state and state["best_model_file"].endswith(".pth")
    return run_recbole_genrec(model, config_dict["dataset"],
                              config_dict={**config_dict, "checkpoint_dir": "killed", "resume": resume_files[0]})


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_sasrec_resumed_run_matches_the_uninterrupted_one(tiny_dataset, run_dirs, schedule):
    data_path, name = tiny_dataset
    config_dict = tiny_config_dict(data_path, dataset=name, epochs=3, stopping_step=100, lr_scheduler=schedule,
                                   warmup_ratio=0.2 if schedule == "linear" else 0.0, train_batch_size=32)
    whole = run_recbole_genrec("SASRec", name, config_dict={**config_dict, "checkpoint_dir": "whole"})
    resumed = interrupted_then_resumed("SASRec", config_dict, run_dirs)
    assert resumed["timings"]["epochs_trained"] == 2  # epochs 1 and 2 only
    assert resumed["best_valid_score"] == whole["best_valid_score"]
    assert resumed["best_valid_result"] == whole["best_valid_result"]
    assert resumed["test_result"] == whole["test_result"]
    if schedule == "linear":
        assert resumed["timings"]["learning_rate"] == whole["timings"]["learning_rate"][1:]


def test_tiger_resumed_from_the_cli_matches(tiny_dataset, run_dirs, monkeypatch, capsys):
    monkeypatch.setattr(tiger_module, "load_semantic_ids", fake_semantic_ids)
    data_path, name = tiny_dataset
    config_dict = tiny_config_dict(data_path, dataset=name, epochs=3, stopping_step=100, **TINY_TIGER,
                                   train_prefix_keep=0.7, learning_rate=0.01)
    whole = run_recbole_genrec("TIGER", name, config_dict={**config_dict, "checkpoint_dir": "whole"})
    with pytest.raises(Killed):
        run_recbole_genrec("TIGER", name, config_dict={**config_dict, "checkpoint_dir": "killed"},
                           epoch_callback=kill_after_first_epoch)
    resume_file = glob.glob(str(run_dirs / "killed" / "*-resume.pth"))[0]
    args = {k: v for k, v in config_dict.items() if k not in ("load_col", "text_fields")}
    out = run_dirs / "resumed.json"
    code = main(["--model=TIGER", f"--resume={resume_file}", "--checkpoint_dir=killed", f"--result_file={out}",
                 *[f"--{k}={v}" for k, v in args.items()]])
    assert code == 0, capsys.readouterr().err
    resumed = json.loads(out.read_text())
    assert resumed["test_result"] == whole["test_result"]
    assert resumed["best_valid_result"] == whole["best_valid_result"]


def test_resuming_with_another_model_is_a_one_line_error(tiny_dataset, run_dirs):
    data_path, name = tiny_dataset
    record = run_recbole_genrec("SASRec", name, config_dict=tiny_config_dict(data_path))
    with pytest.raises(GenRecError, match="was written by model SASRec, not GRU4Rec"):
        run_recbole_genrec("GRU4Rec", name, config_dict={**tiny_config_dict(data_path),
                                                         "resume": record["resume_file"]})
