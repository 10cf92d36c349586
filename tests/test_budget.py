"""``train.time_budget``: a run measures an epoch and an evaluation, then runs as many epochs as fit, with the
schedule fitted to them, and a resume keeps the count.

The trainer's clock is replaced by one that only the task moves (1 s per training step, 3 s per evaluation), so
every count below follows from the rule, not from this machine's speed.
"""

from __future__ import annotations

import argparse
import types

import pytest

import rapidnet.engine.trainer as trainer_module
from rapidnet.cli.train import add_parser, flag_values
from rapidnet.config import load_config
from rapidnet.engine import Trainer, load_training_state, read_jsonl
from rapidnet.engine.budget import BUDGET_SHARE, Budget, epochs_within_budget
from rapidnet.errors import ConfigError
from rapidnet.tasks.classification import ClassificationTask
from test_train import BATCH, FASHION_CONFIG, MICRO_KWARGS, N_TRAIN, _KillAt, _losses, make_fashion_like, train

STEPS = N_TRAIN // BATCH  # 10 steps: 10 s of training per epoch on the fake clock
EVAL_S = 3.0


def every(interval: int):
    return lambda epoch, total: epoch % interval == 0 or epoch >= total


def test_the_rule_counts_epochs_and_their_evaluations():
    # 13 s spent on epoch 1 and its evaluation; 10 s per epoch, 3 s per evaluation
    assert epochs_within_budget(54, 13, 1, 10, 3, 12, every(1)) == 4  # 13 + 3 x 13 = 52 <= 54 < 65
    assert epochs_within_budget(54, 13, 1, 10, 3, 3, every(1)) == 3  # never past the configured epochs
    assert epochs_within_budget(10, 13, 1, 10, 3, 12, every(1)) == 1  # over already: stop after this epoch
    # evaluated every second epoch and after the last: 5 epochs cost 23 + 3 x 10 + 2 x 3 = 59 (epochs 4 and 5)
    assert epochs_within_budget(59, 23, 2, 10, 3, 12, every(2)) == 5
    assert epochs_within_budget(58.9, 23, 2, 10, 3, 12, every(2)) == 4
    budget = Budget(minutes=1.0, train_s=10.0, eval_s=3.0, evaluations=1)
    assert budget.choose(1, 12, every(1)) == epochs_within_budget(60 * BUDGET_SHARE, 13, 1, 10, 3, 12, every(1))
    assert Budget.from_state(budget.state()) == budget


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _timed(base: type[ClassificationTask], clock: _Clock) -> type[ClassificationTask]:
    """``base`` whose steps and evaluations move ``clock``."""

    class Timed(base):  # type: ignore[misc, valid-type]
        def train_step(self, model, batch):
            clock.now += 1.0
            return super().train_step(model, batch)

        def evaluate(self, model):
            clock.now += EVAL_S
            return super().evaluate(model)

    return Timed


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    names = {name: getattr(trainer_module.time, name) for name in dir(trainer_module.time) if not name.startswith("_")}
    monkeypatch.setattr(trainer_module, "time", types.SimpleNamespace(**{**names, "perf_counter": fake}))
    return fake


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fashion_like(tmp_path_factory.mktemp("fm"))


@pytest.fixture(scope="module")
def budget_config(tmp_path_factory):
    """The tiny recipe of test_train with up to 6 epochs and a one-minute budget (54 s usable: 4 epochs)."""

    path = tmp_path_factory.mktemp("cfg") / "budget.yaml"
    path.write_text(
        f"base: {FASHION_CONFIG}\n"
        "model:\n"
        f"  kwargs: {MICRO_KWARGS}\n"
        f"data: {{batch_size: {BATCH}, eval_batch_size: 32}}\n"
        "optim: {lr_base_size: 16}\n"
        "sched: {warmup_epochs: 1, warmup_lr: 1.0e-4}\n"
        "train: {epochs: 6, time_budget: 1, log_interval: 1}\n"
    )
    return path


def _config(*argv: str):
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    parsed = parser.parse_args(list(argv))
    return load_config(parsed.config, parsed.overrides, values=flag_values(parsed))


def _fit(task: type[ClassificationTask], cfg, **kwargs):
    return Trainer(task(cfg, **kwargs), cfg, progress=False).fit()


def test_a_budget_runs_the_epochs_that_fit_and_the_schedule_follows(budget_config, data, tmp_path, clock, capsys):
    cfg = _config("--config", str(budget_config), "--data", str(data), "--output", str(tmp_path / "budget"))
    result = _fit(_timed(ClassificationTask, clock), cfg)
    assert result.status == "completed" and result.epochs_done == 4
    out = capsys.readouterr().out
    assert "up to 6 epochs, as many as fit in 1 min (train.time_budget)" in out
    assert "time budget 1 min: an epoch takes 10s and an evaluation 3s here, so the run takes 4 of up to 6" in out
    assert "epoch 1 took 13s; about 39s left for 3 more epochs" in out  # projected once the count is fixed
    log = read_jsonl(tmp_path / "budget" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    state = load_training_state(tmp_path / "budget" / "last.pt")
    assert state["config"]["train"]["epochs"] == 4
    assert state["budget"] == {"minutes": 1.0, "train_s": 40.0, "eval_s": 12.0, "evaluations": 4, "epochs": 4}
    assert "epochs: 4" in (tmp_path / "budget" / "config.yaml").read_text()

    # the same as asking for 4 epochs: the warm-up epoch is the same, and later epochs follow the 4-epoch schedule
    fixed = tmp_path / "fixed"
    cfg = _config("--config", str(budget_config), "--data", str(data), "--output", str(fixed), "--epochs", "4")
    assert cfg.train.time_budget is None  # --epochs replaces the budget
    assert _fit(ClassificationTask, cfg).epochs_done == 4
    steps, budgeted = read_jsonl(fixed / "steps.jsonl"), read_jsonl(tmp_path / "budget" / "steps.jsonl")
    assert [r["loss"] for r in budgeted] == [r["loss"] for r in steps]  # every update the same
    # a step's logged lr is the next update's: the last of epoch 1 shows the provisional 6-epoch schedule
    del budgeted[STEPS - 1], steps[STEPS - 1]
    assert [r["lr"] for r in budgeted] == [r["lr"] for r in steps]
    assert steps[-1]["lr"] == pytest.approx(1e-5)  # the cosine reached min_lr at epoch 4, not 6


def test_an_evaluation_planned_too_late_for_the_budget_is_brought_forward(budget_config, data, tmp_path, clock, capsys):
    """Half a minute (27 s usable) and an evaluation every third epoch: three 10-s epochs would pass the budget
    before anything is measured, so epoch 1 is evaluated and fixes the count at 2 (13 + 10 + 3 = 26 s)."""
    out = tmp_path / "slow"
    argv = ["--config", str(budget_config), "--data", str(data), "--output", str(out), "--eval-interval", "3"]
    result = _fit(_timed(ClassificationTask, clock), _config(*argv, "--set", "train.time_budget=0.5"))
    assert result.status == "completed" and result.epochs_done == 2
    printed = capsys.readouterr().out
    assert "3 epochs would pass it here before the first planned evaluation (epoch 3)" in printed
    assert "an epoch takes 10s and an evaluation 3s here, so the run takes 2 of up to 6 epochs" in printed
    log = read_jsonl(out / "log.jsonl")
    assert [r.get("val_top1") is not None for r in log] == [True, True]
    budget = load_training_state(out / "last.pt")["budget"]
    assert budget["train_s"] + budget["eval_s"] == 26.0 <= 0.5 * 60 * BUDGET_SHARE
    # with room for the planned evaluation, nothing is brought forward: epochs 1-2 unevaluated, epoch 3 evaluated
    roomy = tmp_path / "roomy"
    argv = ["--config", str(budget_config), "--data", str(data), "--output", str(roomy), "--eval-interval", "3"]
    assert _fit(_timed(ClassificationTask, clock), _config(*argv)).status == "completed"
    assert [r.get("val_top1") is not None for r in read_jsonl(roomy / "log.jsonl")][:3] == [False, False, True]
    assert "before the first planned evaluation" not in capsys.readouterr().out


def test_a_resume_keeps_the_count_the_budget_chose(budget_config, data, tmp_path, clock, capsys):
    args = ("--config", str(budget_config), "--data", str(data))
    ref = _fit(_timed(ClassificationTask, clock), _config(*args, "--output", str(tmp_path / "ref")))
    assert ref.epochs_done == 4
    cut = tmp_path / "cut"
    result = _fit(_timed(_KillAt, clock), _config(*args, "--output", str(cut)), at=(1, 3))  # epoch 2, after choosing
    assert result.status == "interrupted"
    assert load_training_state(cut / "last.pt")["budget"]["epochs"] == 4
    # with the checkpoint's config, and with the YAML again (up to 6 epochs): the chosen 4 either way
    assert train("--resume", str(cut / "last.pt")) == 0
    assert _losses(cut) == _losses(tmp_path / "ref")
    assert [r["epoch"] for r in read_jsonl(cut / "log.jsonl")] == [1, 2, 3, 4]
    again = tmp_path / "again"
    assert _fit(_timed(_KillAt, clock), _config(*args, "--output", str(again)), at=(2, 0)).status == "interrupted"
    assert train("--resume", str(again / "last.pt"), "--config", str(budget_config), "--data", str(data)) == 0
    assert _losses(again) == _losses(tmp_path / "ref")
    capsys.readouterr()


def _multistep_lrs(budget_config, data, out, epochs: int, milestone: str, rate: str = "0.1") -> list[float]:
    """Each step's logged lr of an ``epochs``-epoch multistep run (no warm-up) dropping ``rate`` at ``milestone``."""
    args = ["--config", str(budget_config), "--data", str(data), "--epochs", str(epochs), "--output", str(out)]
    args += ["--set", "sched.name=multistep", "--set", f"sched.decay_rate={rate}", "--set", "sched.warmup_epochs=0"]
    assert train(*args, "--set", f"sched.decay_milestones=[{milestone}]") == 0
    return [r["lr"] for r in read_jsonl(out / "steps.jsonl")]


def test_a_negative_milestone_counts_back_from_the_last_epoch(budget_config, data, tmp_path):
    """multistep [-1] in a 3-epoch run is [2]: the lr drops x0.1 for the last epoch (timm's per-update multistep
    drops one update early, and a logged lr is the next update's: the drop shows from epoch 2's ninth step)."""
    lrs = {m: _multistep_lrs(budget_config, data, tmp_path / m, 3, m) for m in ("-1", "2")}
    assert lrs["-1"] == lrs["2"]
    first = lrs["-1"][0]
    assert lrs["-1"] == pytest.approx([first] * (2 * STEPS - 2) + [first * 0.1] * (STEPS + 2))


def test_a_one_epoch_run_of_a_last_epoch_milestone_trains_at_the_dropped_lr(budget_config, data, tmp_path):
    """``--epochs 1`` on a config that drops for the last epoch (the Mask R-CNN mosaic config's quick try): that
    epoch is the whole run, so every step is at lr x 0.1 (it used to be refused as a milestone outside the run)."""
    # rate 1.0: the same schedule without the drop
    lrs = {rate: _multistep_lrs(budget_config, data, tmp_path / rate, 1, "-1", rate) for rate in ("0.1", "1.0")}
    assert len(lrs["0.1"]) == STEPS and lrs["0.1"] == pytest.approx([lr * 0.1 for lr in lrs["1.0"]])


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.time_budget=0", "train.time_budget"),
        ("train.time_budget=-5", "train.time_budget"),
        ("sched.decay_milestones=[-4]", "sched.decay_milestones"),
        ("sched.warmup_epochs=0.5", "sched.warmup_epochs"),  # a fraction of an epoch, stepped once an epoch
    ],
)
def test_bad_budgets_and_milestones_are_config_errors(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=["train.epochs=3", override])


def test_a_fractional_warm_up_spans_that_share_of_an_epochs_updates(budget_config, data, tmp_path):
    """``sched.warmup_epochs: 0.5`` with per-update steps warms up over half an epoch's updates, then trains at the
    full rate (the COCO configs give the paper's 500 iterations as 0.0682 of an epoch)."""
    out = tmp_path / "half"
    args = ["--config", str(budget_config), "--data", str(data), "--epochs", "2", "--output", str(out)]
    args += ["--set", "sched.name=multistep", "--set", "sched.decay_rate=1.0", "--set", "sched.warmup_epochs=0.5"]
    assert train(*args, "--set", "sched.step_on_epochs=false") == 0
    lrs = [r["lr"] for r in read_jsonl(out / "steps.jsonl")]
    top = max(lrs)
    ramp = [lr for lr in lrs if lr < top * (1 - 1e-9)]
    assert ramp == sorted(ramp) and len(set(ramp)) == len(ramp)  # strictly rising
    assert lrs[len(ramp) :] == pytest.approx([top] * (len(lrs) - len(ramp)))  # then flat
    assert abs(len(ramp) - STEPS / 2) <= 1 and len(lrs) == 2 * STEPS  # half of the first epoch
