"""Learning-rate schedules and mixed precision (recbole_genrec/trainer/schedule.py) on every trainer."""
import math

import pytest
import torch

from recbole_genrec.quick_start import build_model_and_trainer, load_config, prepare_data, run_recbole_genrec
from recbole_genrec.trainer.schedule import LRSchedule, native_bf16, resolve_precision
from recbole_genrec.utils import GenRecError
from tests.conftest import tiny_config_dict
from tests.test_tiger import TINY_TIGER, fake_sids  # noqa: F401  (fixture)


def _cosine(step, warmup, total):
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_schedule_lr_at_given_steps_equals_the_formula(name):
    total, warmup = 20, 4
    expected = {
        "constant": lambda s: s / warmup if s < warmup else 1.0,
        "linear": lambda s: s / warmup if s < warmup else 1.0 - (s - warmup) / (total - warmup),
        "cosine": lambda s: _cosine(s, warmup, total),
    }[name]
    schedule = LRSchedule(name, warmup_steps=warmup)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.5)
    sched = schedule.build(opt, total)
    for step in range(total):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * expected(step)), step
        assert schedule.multiplier(step, total) == pytest.approx(expected(step)), step
        opt.step()
        sched.step()
    assert LRSchedule("cosine", warmup_ratio=0.25).warmup(20) == 5


@pytest.mark.parametrize("kwargs", [{"name": "step"}, {"warmup_steps": -1}, {"warmup_steps": 1.5},
                                    {"warmup_ratio": 1.0}, {"warmup_ratio": "x"}])
def test_bad_schedule_settings_are_one_line_errors(kwargs):
    with pytest.raises(GenRecError):
        LRSchedule(**kwargs)


def test_precision_values():
    assert resolve_precision("fp32", "cpu") is None
    assert resolve_precision("bf16", "cpu") is torch.bfloat16
    assert resolve_precision("auto", "cpu") is (torch.bfloat16 if native_bf16("cpu") else None)
    with pytest.raises(GenRecError, match="precision must be one of"):
        resolve_precision("fp16x", "cpu")


def _trainer(tiny_dataset, run_dirs, **overrides):
    data_path, name = tiny_dataset
    config = load_config("TIGER", name, config_dict=tiny_config_dict(data_path, **{**TINY_TIGER, **overrides}))
    _, train, valid, _ = prepare_data(config)
    model, trainer = build_model_and_trainer(config, train)
    return trainer, train, valid


def test_trainer_steps_the_schedule_per_optimizer_step_and_resume_continues_it(tiny_dataset, run_dirs, fake_sids):
    lr = 0.01
    trainer, train, valid = _trainer(tiny_dataset, run_dirs, epochs=4, learning_rate=lr, lr_scheduler="cosine",
                                     warmup_steps=1)
    steps = len(train)
    total = 4 * steps
    trainer._attach_lr_schedule(train)
    for epoch in range(2):
        trainer._train_epoch(train, epoch)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(lr * _cosine(2 * steps, 1, total))
    trainer._save_checkpoint(1)
    saved = trainer.saved_model_file

    resumed, train2, _ = _trainer(tiny_dataset, run_dirs, epochs=4, learning_rate=lr, lr_scheduler="cosine",
                                  warmup_steps=1)
    resumed.resume_checkpoint(saved)
    resumed._attach_lr_schedule(train2)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr * _cosine(2 * steps, 1, total))
    resumed._train_epoch(train2, 2)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr * _cosine(3 * steps, 1, total))


def test_a_bf16_step_changes_parameters_with_a_loss_close_to_fp32(tiny_dataset, run_dirs, fake_sids):
    losses = {}
    for precision in ("fp32", "bf16"):
        trainer, train, _ = _trainer(tiny_dataset, run_dirs, precision=precision, dropout_rate=0.0)
        model = trainer.model
        batch = next(iter(train))
        before = [p.detach().clone() for p in model.parameters()]
        trainer.optimizer.zero_grad()
        loss = trainer._autocast_loss(model.calculate_loss)(batch)
        loss.backward()
        trainer.optimizer.step()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert changed > 0.5 * len(before)
        losses[precision] = float(loss.detach())
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.05)


def test_run_with_schedule_and_bf16_reports_learning_rates(tiny_dataset, run_dirs, fake_sids):
    data_path, name = tiny_dataset
    record = run_recbole_genrec("TIGER", name, config_dict=tiny_config_dict(
        data_path, **TINY_TIGER, epochs=2, lr_scheduler="linear", warmup_ratio=0.1, precision="bf16"))
    assert record["test_result"]["ndcg@10"] >= 0
    lrs = record["timings"]["learning_rate"]
    assert len(lrs) == 2 and lrs[1] == pytest.approx(0.0, abs=1e-12)  # linear decay ends at 0 on the last step


def test_bad_precision_in_the_cli_exits_2(tiny_dataset, run_dirs, capsys):
    from recbole_genrec.quick_start import main

    data_path, name = tiny_dataset
    code = main(["--model=TIGER", f"--dataset={name}", f"--data_path={data_path}", "--precision=half",
                 "--epochs=1", "--show_progress=False"])
    assert code == 2
    assert "precision must be one of" in capsys.readouterr().err
