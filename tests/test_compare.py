"""--model=A,B comparisons and --recipe: one prepared dataset, a table, a JSON and a PNG; recipes reach only
the TIGER family."""
import json
import os

import pytest

from recbole_genrec.compare import format_table, main, split_models
from recbole_genrec.quick_start import load_config
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict
from tests.test_tiger import TINY_TIGER, fake_sids  # noqa: F401  (fixture)


def test_split_models():
    assert split_models("TIGER,SASRec") == ["TIGER", "SASRec"]
    with pytest.raises(GenRecError, match="empty name"):
        split_models("TIGER,,SASRec")
    with pytest.raises(GenRecError, match="twice"):
        split_models("SASRec,SASRec")


def test_recipe_changes_the_tiger_family_only(tiny_dataset, run_dirs):
    data_path, name = tiny_dataset
    base = tiny_config_dict(data_path)
    tiger = load_config("TIGER", name, config_dict={**base, "recipe": "cpu"})
    sasrec = load_config("SASRec", name, config_dict={**base, "recipe": "cpu"})
    plain = load_config("SASRec", name, config_dict=base)
    assert tiger["lr_scheduler"] != "constant" and tiger["recipe_file"].endswith("cpu.yaml")
    assert sasrec["learning_rate"] == plain["learning_rate"] and sasrec["lr_scheduler"] == "constant"
    # the command line still overrides the recipe
    assert load_config("TIGER", name, config_dict={**base, "recipe": "cpu", "d_model": 24})["d_model"] == 24
    with pytest.raises(GenRecError, match="recipe 'nope' not found"):
        load_config("TIGER", name, config_dict={**base, "recipe": "nope"})


def test_recipe_refinements_follow_the_model_yaml_chain(tiny_dataset, run_dirs):
    """properties/recipe/cpu/<Model>.yaml: GenPlugin's guidance start, the alternating models' doubled epochs."""
    data_path, name = tiny_dataset
    base = {k: v for k, v in tiny_config_dict(data_path).items() if k != "epochs"}
    tiger = load_config("TIGER", name, config_dict={**base, "recipe": "cpu"})
    tigerpp = load_config("TIGER++", name, config_dict={**base, "recipe": "cpu"})
    letterpp = load_config("LETTER++", name, config_dict={**base, "recipe": "cpu"})
    soda_e = load_config("SODA-E", name, config_dict={**base, "recipe": "cpu"})  # inherits ETEGRec's file
    twt = load_config("TokenWeightedTIGER", name, config_dict={**base, "recipe": "cpu"})
    assert twt["curriculum_c"] == 6.6e-4 and twt["epochs"] == 12  # curriculum scaled to the recipe's steps
    assert tiger["epochs"] == 12 and tigerpp["d_model"] == tiger["d_model"] == 64
    assert tigerpp["ssg_start_epoch"] == letterpp["ssg_start_epoch"] == 2 and tigerpp["rar_epochs"] == 4
    assert soda_e["epochs"] == 24 and soda_e["recipe_file"].endswith("cpu/ETEGRec.yaml")
    assert load_config("TIGER++", name, config_dict={**base, "recipe": "cpu", "ssg_start_epoch": 5})[
        "ssg_start_epoch"] == 5  # the command line still wins


def test_comparison_cli_writes_table_json_and_png(tiny_dataset, run_dirs, fake_sids, capsys):
    data_path, name = tiny_dataset
    args = ["--model=TIGER,SASRec", f"--dataset={name}", f"--data_path={data_path}", "--epochs=1",
            "--show_progress=False", "--state=WARNING", "--result_file=cmp.json"]
    args += [f"--{k}={v}" for k, v in TINY_TIGER.items() if k != "device"]
    args += ["--load_col={'inter': ['user_id', 'item_id', 'rating', 'timestamp']}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| TIGER |" in out and "| SASRec |" in out
    record = json.load(open("cmp.json"))
    assert [r["model"] for r in record["models"]] == ["TIGER", "SASRec"]
    for row in record["models"]:
        assert 0.0 <= row["test_result"]["hit@10"] <= 1.0 and "coverage@10" in row["test_result"]
        assert os.path.isfile(row["result_file"])
    with open("cmp.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| TIGER |" in format_table(record)


def test_comparison_with_a_bad_second_model_fails_before_training(tiny_dataset, run_dirs, capsys):
    data_path, name = tiny_dataset
    code = main(["--model=SASRec,NoSuchModel", f"--dataset={name}", f"--data_path={data_path}"])
    assert code == 2
    assert "unknown model 'NoSuchModel'" in capsys.readouterr().err
    assert not os.path.exists("saved")  # nothing trained


def test_a_misspelt_setting_is_a_one_line_error(tiny_dataset, run_dirs):
    data_path, name = tiny_dataset
    with pytest.raises(GenRecError, match="unknown setting 'lerning_rate': did you mean 'learning_rate'"):
        load_config("SASRec", name, config_dict=tiny_config_dict(data_path, lerning_rate=0.5))
    load_config("SASRec", name, config_dict=tiny_config_dict(data_path, my_own_note="kept"))  # not close: allowed


def test_comparison_refuses_resume(tiny_dataset, run_dirs, capsys):
    from recbole_genrec.compare import main as compare_main

    data_path, name = tiny_dataset
    assert compare_main(["--model=SASRec,Pop", f"--dataset={name}", f"--data_path={data_path}",
                         "--resume=x.pth"]) == 2
    assert "--resume continues one run" in capsys.readouterr().err
