"""End-to-end tests of ``rapidnet train`` / ``eval`` / ``plot`` and the engine behind them, on tiny data.

Every run uses a ~0.2 M-parameter RapidNet (one block per stage) at 32x32 on a fake Fashion-MNIST whose classes are
bright rectangles at class-specific places (learnable in a few steps) or on a tiny ImageFolder of coloured images.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rapidnet
from rapidnet.cli.main import main
from rapidnet.config import load_config
from rapidnet.data import write_idx
from rapidnet.engine import NonFiniteLossError, StepOutput, Trainer, load_training_state, read_jsonl
from rapidnet.models.checkpoint import load_state_dict_file
from rapidnet.tasks.classification import ClassificationTask, DistillationLoss

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(rapidnet.__file__).resolve().parents[1]
FASHION_CONFIG = ROOT / "configs" / "fashion_mnist_rapidnet_ti.yaml"
N_TRAIN, N_VAL, BATCH = 160, 64, 16  # 10 steps per epoch
#: a RapidNet of two blocks per stage at most, small widths: what the run tests train
MICRO_KWARGS = "{depths: [[1, 0], [1, 0], [1, 1], [1, 1]], widths: [16, 24, 32, 48], head_dim: 64}"
TINY = f"model.kwargs={MICRO_KWARGS}"


def make_fashion_like(folder: Path, n_train: int = N_TRAIN, n_val: int = N_VAL) -> Path:
    """Four IDX files; class c is a bright 8x4 rectangle at a class-specific place on a noisy background."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_val)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            r, c = divmod(int(label), 5)
            images[i, 4 + 12 * r : 12 + 12 * r, 2 + 5 * c : 6 + 5 * c] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)
    return folder


def make_image_folder(root: Path, classes=("blue", "green", "red"), val_classes=None, n_train=8, n_val=4) -> Path:
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "grey": (128, 128, 128)}
    rng = np.random.default_rng(1)
    for split, names, n in (("train", classes, n_train), ("val", val_classes or classes, n_val)):
        for name in names:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = np.clip(np.array(colours[name]) + rng.integers(-25, 25, (24, 24, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def fm(tmp_path_factory) -> Path:
    return make_fashion_like(tmp_path_factory.mktemp("fm"))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    """The 7-epoch Fashion-MNIST config (inherited with ``base:``) shrunk to a tiny model, batch and schedule."""
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(
        f"base: {FASHION_CONFIG}\n"
        "model:\n"
        "  drop_path_rate: 0.1\n"
        f"  kwargs: {MICRO_KWARGS}\n"
        f"data: {{batch_size: {BATCH}, eval_batch_size: 24}}\n"
        "optim: {lr_base_size: 16}\n"
        "sched: {warmup_epochs: 1, warmup_lr: 1.0e-4}\n"
        "train: {epochs: 2, log_interval: 1}\n"
    )
    return path


def train(*args: str) -> int:
    return main(["train", "--no-progress", *args])


def train_on(config: Path, data: Path, out: Path, *extra: str) -> int:
    """``rapidnet train --config CONFIG --data DATA --output OUT`` plus extra options."""
    return train("--config", str(config), "--data", str(data), "--output", str(out), *extra)


@pytest.fixture(scope="module")
def short_run(fm, tiny_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "short"
    assert train_on(tiny_config, fm, out, "--ema") == 0
    return out


def one_line_error(capsys, code: int) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("rapidnet train: error: ") or err[0].startswith("rapidnet eval: error: ")
    return err[0]


# ---- a run, its files, and rapidnet eval/plot on them ---------------------------------------------------------------


def test_short_run_writes_checkpoints_logs_and_weights_that_eval_reproduces(short_run, fm, capsys):
    for name in ("last.pt", "best.pt", "model_best.safetensors", "log.jsonl", "steps.jsonl", "config.yaml"):
        assert (short_run / name).is_file(), name
    records = read_jsonl(short_run / "log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "val_top1", "val_top5", "val_loss", "lr", "img_per_s", "epoch_time", "ema_val_top1"):
        assert all(r[key] is not None for r in records), key
    assert len(read_jsonl(short_run / "steps.jsonl")) == 2 * N_TRAIN // BATCH  # log_interval 1

    last = load_training_state(short_run / "last.pt")
    assert (last["epoch"], last["step"], last["updates"]) == (2, 0, 2 * N_TRAIN // BATCH)
    for key in ("model", "model_ema", "optimizer", "scheduler", "scaler", "rng", "config"):
        assert key in last, key
    assert set(last["rng"]) >= {"python", "numpy", "torch"}

    _, metadata = load_state_dict_file(short_run / "model_best.safetensors")
    assert json.loads(metadata["class_names"]) == list(rapidnet.data.FASHION_MNIST_CLASSES)
    assert json.loads(metadata["pretrained_cfg"])["input_size"] == [3, 32, 32]

    best = max(records, key=lambda r: r["best_top1"])["best_top1"]
    capsys.readouterr()

    def eval_json(*extra: str) -> dict:
        argv = ["eval", "--checkpoint", str(short_run / "model_best.safetensors"), "--data", str(fm), "--json"]
        assert main([*argv, "--workers", "0", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    result = eval_json()
    assert result["images"] == N_VAL
    assert result["top1"] == pytest.approx(best, abs=1e-9)
    fused = eval_json("--reparameterize")
    assert fused["reparameterized"] and abs(fused["top1"] - best) <= 100 / N_VAL + 1e-9  # at most one image flips


def test_a_single_loss_is_logged_as_before_and_reaches_tensorboard(short_run, capsys):
    """Without named losses the logs keep their fields; the epoch line names the metrics; TensorBoard has the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = read_jsonl(short_run / "steps.jsonl")
    assert all(set(r) == {"epoch", "step", "update", "loss", "lr", "img_per_s"} for r in steps)
    assert not [k for r in read_jsonl(short_run / "log.jsonl") for k in r if k.startswith("train_loss_")]
    events = EventAccumulator(str(short_run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in steps], rel=1e-6)
    assert [e.step for e in events.Scalars("epoch/val_top1")] == [N_TRAIN // BATCH, 2 * N_TRAIN // BATCH]
    assert {"epoch/ema_val_top1", "epoch/train_loss", "train/lr"} <= set(events.Tags()["scalars"])


def test_eval_interval_skips_evaluation_but_not_the_last_epoch(fm, tiny_config, tmp_path, capsys):
    out = tmp_path / "sparse"
    assert train_on(tiny_config, fm, out, "--epochs", "3", "--eval-interval", "2", "--limit-train", "48") == 0
    records = read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r.get("val_top1") is not None for r in records] == [False, True, True]
    assert [r["best_epoch"] for r in records] == [None, 2, records[2]["best_epoch"]]
    assert "evaluated every 2 epochs" in capsys.readouterr().out
    assert (out / "model_best.safetensors").is_file() and (out / "last.pt").is_file()


@pytest.mark.parametrize("native", [True, False])
def test_amp_runs_fp32_where_the_cpu_would_emulate_bfloat16(fm, tiny_config, tmp_path, capsys, monkeypatch, native):
    """bf16 autocast is for speed: on a CPU without bf16 kernels (14x slower there) the run says so and trains fp32."""
    import rapidnet.engine.trainer as trainer

    monkeypatch.setattr(trainer, "cpu_has_bfloat16", lambda: native)
    seen: list[torch.dtype] = []
    original = torch.nn.Linear.forward

    def linear(self, x):
        out = original(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", linear)
    out = tmp_path / "amp"
    assert train_on(tiny_config, fm, out, "--epochs", "1", "--amp", "--limit-train", "16", "--limit-val", "8") == 0
    printed = capsys.readouterr().out
    if native:
        assert "amp bfloat16" in printed and torch.bfloat16 in seen
    else:
        assert "fp32 (train.amp is set, but this CPU has no bfloat16 kernels" in printed
        assert set(seen) == {torch.float32}


def test_plot_writes_png(short_run, tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(short_run), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "log.jsonl" in capsys.readouterr().err


def test_timm_recipe_on_image_folder_runs(tmp_path):
    """The ImageNet-style path on an ImageFolder: PIL + RandAugment, erasing, Mixup/CutMix, EMA, bf16 AMP, clipping."""
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    code = train(
        "--data",
        str(data),
        "--output",
        str(out),
        "--model",
        "rapidnet_ti",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--input-size",
        "32",
        "--workers",
        "1",
        "--ema",
        "--amp",
        "--clip-grad",
        "1.0",
        "--set",
        TINY,
        "--set",
        "sched.warmup_epochs=0",
        "--set",
        "train.log_interval=1",
    )
    assert code == 0
    record = read_jsonl(out / "log.jsonl")[0]
    assert record["val_images"] == 12 and 0 <= record["val_top1"] <= 100
    saved = load_training_state(out / "last.pt")["config"]
    assert saved["aug"]["auto_augment"] == "rand-m9-mstd0.5-inc1" and saved["aug"]["mixup"] == 0.8


def test_any_timm_model_trains_and_evaluates(fm, tiny_config, tmp_path, capsys):
    """Baselines train with the same recipe; the exported weights name the timm model, so eval rebuilds it."""
    out = tmp_path / "run"
    assert (
        train_on(
            tiny_config,
            fm,
            out,
            "--epochs",
            "1",
            "--model",
            "resnet10t",
            "--set",
            "model.kwargs={}",
        )
        == 0
    )
    _, metadata = load_state_dict_file(out / "model_best.safetensors")
    assert (metadata["format"], metadata["arch"]) == ("timm", "resnet10t")
    logged = read_jsonl(out / "log.jsonl")[0]["val_top1"]
    capsys.readouterr()
    assert (
        main(
            ["eval", "--checkpoint", str(out / "model_best.safetensors"), "--data", str(fm), "--json", "--workers", "0"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(logged)


# ---- exact resume ---------------------------------------------------------------------------------------------------


class _KillAt(ClassificationTask):
    """Sends SIGTERM to its own process during one step: a real signal through the engine's handler."""

    def __init__(self, cfg, at: tuple[int, int]) -> None:
        super().__init__(cfg)
        self.at = at
        self.position = (0, 0)

    def train_batches(self, epoch, start_step):
        self.position = (epoch, start_step)
        return super().train_batches(epoch, start_step)

    def train_step(self, model, batch):
        out = super().train_step(model, batch)
        if self.position == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.position = (self.position[0], self.position[1] + 1)
        return out


def _losses(run: Path) -> list[tuple[int, int, float]]:
    return [(r["epoch"], r["step"], r["loss"]) for r in read_jsonl(run / "steps.jsonl")]


@pytest.mark.parametrize("pipeline", ["tensor", "timm"])
def test_kill_and_resume_gives_the_same_losses(pipeline, fm, tiny_config, tmp_path, capsys):
    """Killed mid-epoch 2 (SIGTERM), resumed with --resume: every later loss equals the uninterrupted run's.

    ``tensor``: the Fashion-MNIST batch pipeline; ``timm``: an ImageFolder through PIL with RandAugment, erasing,
    Mixup/CutMix, drop path and EMA, loaded by a worker process that prefetches ahead of the interruption.
    """
    if pipeline == "tensor":
        data, args, at, steps = fm, ["--config", str(tiny_config)], (1, 3), N_TRAIN // BATCH
    else:
        data = make_image_folder(tmp_path / "data", n_train=16)
        args = [
            "--set",
            TINY,
            "--input-size",
            "32",
            "--batch-size",
            "8",
            "--workers",
            "1",
            "--ema",
            "--set",
            "sched.warmup_epochs=1",
            "--set",
            "train.log_interval=1",
            "--set",
            "data.limit_val=6",
        ]
        at, steps = (1, 2), 48 // 8
    ref = tmp_path / "ref"
    assert train(*args, "--data", str(data), "--epochs", "3", "--output", str(ref)) == 0

    from rapidnet.cli.train import add_parser, flag_values

    parser = add_parser(__import__("argparse").ArgumentParser().add_subparsers())
    parsed = parser.parse_args([*args, "--data", str(data), "--epochs", "3", "--output", str(tmp_path / "cut")])
    cfg = load_config(parsed.config, parsed.overrides, values=flag_values(parsed))
    result = Trainer(_KillAt(cfg, at=at), cfg, progress=False).fit()
    assert result.status == "interrupted" and result.exit_code == 128 + signal.SIGTERM
    assert f"stopped by SIGTERM at epoch 2, step {at[1] + 1}" in capsys.readouterr().out
    state = load_training_state(tmp_path / "cut" / "last.pt")
    assert (state["epoch"], state["step"]) == (1, at[1] + 1) and at[1] + 1 < steps

    assert train("--resume", str(tmp_path / "cut" / "last.pt")) == 0
    assert _losses(tmp_path / "cut") == _losses(ref)  # exact: same seed, same CPU
    cut_log, ref_log = read_jsonl(tmp_path / "cut" / "log.jsonl"), read_jsonl(ref / "log.jsonl")
    assert [r["epoch"] for r in cut_log] == [1, 2, 3]
    for a, b in zip(cut_log, ref_log, strict=True):
        assert (a["train_loss"], a["val_top1"], a["val_loss"]) == (b["train_loss"], b["val_top1"], b["val_loss"])


def test_ctrl_c_saves_and_exits_cleanly_then_resumes(fm, tiny_config, tmp_path):
    """The real CLI in a subprocess: SIGINT mid-run -> message, exit 130, loadable last.pt; --resume finishes."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "rapidnet.cli.main",
        "train",
        "--config",
        str(tiny_config),
        "--data",
        str(fm),
        "--epochs",
        "40",
        "--output",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and len(read_jsonl(out / "steps.jsonl", True)) < 13:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT received" in stderr and "Traceback" not in stderr
    assert "continue with: rapidnet train --resume" in stdout
    state = load_training_state(out / "last.pt")
    assert state["epoch"] * (N_TRAIN // BATCH) + state["step"] >= 13
    assert train("--resume", str(out / "last.pt"), "--epochs", str(state["epoch"] + 1)) == 0
    assert load_training_state(out / "last.pt")["epoch"] == state["epoch"] + 1


# ---- two processes ------------------------------------------------------------------------------------------------


def test_two_process_ddp_matches_one_process(fm, tiny_config, tmp_path, capsys, torchrun):
    """torchrun with 2 CPU processes (gloo), batch 8 each, against 1 process with batch 16.

    Both see the same global batches (the sampler splits each global batch across ranks) and the same augmentation
    (seeded per global position), but CPU has no SyncBatchNorm: BN normalises over 8 images instead of 16, so the
    runs agree within a tolerance, not exactly. Stated tolerance (about 4x the differences seen): per-epoch train loss
    and final val loss within 10%, final val top-1 within 15 points (10 of 64 images). Distributed evaluation itself
    must be exact: ``rapidnet eval`` on the DDP run's exported weights reproduces its logged top-1, and every val
    image is counted once.
    """
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--config", str(tiny_config), "--data", str(fm), "--epochs", "2"]
    assert train(*common, "--output", str(one), "--batch-size", "16") == 0
    proc = torchrun("train", *common, "--output", two, "--batch-size", "8", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout

    log1, log2 = read_jsonl(one / "log.jsonl"), read_jsonl(two / "log.jsonl")
    assert [r["epoch"] for r in log2] == [1, 2]  # rank 0 alone writes
    assert log2[-1]["val_images"] == N_VAL
    steps1, steps2 = read_jsonl(one / "steps.jsonl"), read_jsonl(two / "steps.jsonl")
    assert len(steps1) == len(steps2) == 2 * N_TRAIN // BATCH
    for a, b in zip(log1, log2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.10)
    assert log2[-1]["val_loss"] == pytest.approx(log1[-1]["val_loss"], rel=0.10)
    assert abs(log2[-1]["val_top1"] - log1[-1]["val_top1"]) <= 15

    capsys.readouterr()
    assert (
        main(
            ["eval", "--checkpoint", str(two / "model_best.safetensors"), "--data", str(fm), "--json", "--workers", "0"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(max(r["best_top1"] for r in log2))


# ---- failures: one line, exit 2, nothing lost ------------------------------------------------------------------------


def test_nan_loss_stops_with_one_line_error_and_keeps_last_checkpoint(fm, tiny_config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    original = ClassificationTask.train_step
    calls = {"n": 0}

    def poisoned(self, model, batch):
        result = original(self, model, batch)
        calls["n"] += 1
        if calls["n"] == N_TRAIN // BATCH + 3:  # epoch 2, step 2
            return StepOutput(result.loss * float("nan"), result.num_samples)
        return result

    monkeypatch.setattr(ClassificationTask, "train_step", poisoned)
    code = train_on(tiny_config, fm, out, "--epochs", "3")
    message = one_line_error(capsys, code)
    assert "loss is nan at epoch 2, step 2" in message and "last.pt (epoch 1) is kept" in message
    state = load_training_state(out / "last.pt")
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert len(read_jsonl(out / "log.jsonl")) == 1

    cfg = load_config(tiny_config, values={"data.path": str(fm), "train.output": str(tmp_path / "api")})
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        calls["n"] = N_TRAIN // BATCH
        Trainer(ClassificationTask(cfg), cfg, progress=False).fit()


def test_missing_and_empty_data_are_one_line_errors(tiny_config, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    message = one_line_error(
        capsys, train("--config", str(tiny_config), "--data", str(missing), "--output", str(tmp_path / "a"))
    )
    assert str(missing) in message and "does not exist" in message
    (tmp_path / "empty").mkdir()
    message = one_line_error(
        capsys, train("--config", str(tiny_config), "--data", str(tmp_path / "empty"), "--output", str(tmp_path / "b"))
    )
    assert "is empty" in message
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "last.pt").exists()


def test_class_mismatch_is_one_line_error(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=("blue", "green", "red"), val_classes=("blue", "grey", "red"))
    message = one_line_error(capsys, train("--data", str(data), "--output", str(tmp_path / "run")))
    assert "different classes" in message and "green" in message and "grey" in message


def test_corrupt_image_names_the_file_or_is_skipped_and_counted(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    bad = data / "train" / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    common = [
        "--data",
        str(data),
        "--model",
        "rapidnet_ti",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--input-size",
        "32",
        "--workers",
        "0",
        "--no-ema",
        "--set",
        "aug.mixup=0",
        "--set",
        "aug.cutmix=0",
        "--set",
        TINY,
    ]
    message = one_line_error(capsys, train(*common, "--output", str(tmp_path / "strict")))
    assert str(bad) in message and "--skip-corrupt" in message
    assert not (tmp_path / "strict" / "last.pt").exists()

    assert train(*common, "--output", str(tmp_path / "skip"), "--skip-corrupt") == 0
    out = capsys.readouterr().out
    assert f"skipped 1 unreadable image file(s) (e.g. {bad})" in out
    assert read_jsonl(tmp_path / "skip" / "log.jsonl")[0]["skipped_images"] == 1


def test_resume_refuses_another_model_or_a_weights_file(short_run, capsys):
    last = short_run / "last.pt"
    before = last.read_bytes()
    message = one_line_error(capsys, train("--resume", str(last), "--model", "rapidnet_s"))
    assert "checkpoint of another model" in message and "rapidnet_s" in message
    message = one_line_error(capsys, train("--resume", str(last), "--set", "optim.weight_decay=0.1"))
    assert "another config" in message and "optim.weight_decay" in message
    message = one_line_error(capsys, train("--resume", str(short_run / "model_best.safetensors")))
    assert "not a training state" in message
    assert last.read_bytes() == before


def test_eval_refuses_data_with_other_classes(short_run, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    message = one_line_error(
        capsys,
        main(
            ["eval", "--checkpoint", str(short_run / "model_best.safetensors"), "--data", str(data), "--workers", "0"]
        ),
    )
    assert "trained on 10 classes" in message and "3" in message


def test_existing_run_is_not_overwritten(short_run, tiny_config, fm, capsys):
    message = one_line_error(capsys, train_on(tiny_config, fm, short_run))
    assert "already holds a run" in message and "--resume" in message


# ---- distillation ---------------------------------------------------------------------------------------------------


def test_hard_distillation_from_a_checkpoint_this_project_wrote(short_run, fm, tiny_config, tmp_path):
    out = tmp_path / "student"
    code = train_on(
        tiny_config,
        fm,
        out,
        "--epochs",
        "1",
        "--teacher-checkpoint",
        str(short_run / "model_best.safetensors"),
    )
    assert code == 0
    saved = load_training_state(out / "last.pt")
    assert saved["config"]["distill"]["type"] == "hard"
    assert "head.fc_dist.weight" in saved["model"]
    student = rapidnet.load_model(out / "model_best.safetensors")
    assert student.distillation
    alpha = saved["config"]["distill"]["alpha"]  # the two heads' unweighted terms are logged beside the total
    for r in read_jsonl(out / "steps.jsonl"):
        assert r["loss"] == pytest.approx((1 - alpha) * r["loss_cls"] + alpha * r["loss_distill"], rel=1e-5)
    record = read_jsonl(out / "log.jsonl")[0]
    assert record["train_loss"] == pytest.approx(
        (1 - alpha) * record["train_loss_cls"] + alpha * record["train_loss_distill"], rel=1e-5
    )


def test_soft_distillation_from_a_timm_teacher(fm, tiny_config, tmp_path):
    import timm

    teacher = timm.create_model("resnet10t", num_classes=10)
    torch.save({"state_dict": teacher.state_dict()}, tmp_path / "teacher.pth")
    out = tmp_path / "student"
    code = train_on(
        tiny_config,
        fm,
        out,
        "--epochs",
        "1",
        "--teacher",
        "resnet10t",
        "--teacher-checkpoint",
        str(tmp_path / "teacher.pth"),
        "--distillation",
        "soft",
    )
    assert code == 0
    assert load_training_state(out / "last.pt")["config"]["distill"]["type"] == "soft"


def test_distillation_loss_matches_deit():
    torch.manual_seed(0)
    x = torch.randn(6, 4)
    teacher = torch.nn.Linear(4, 5)
    cls, dist, y = torch.randn(6, 5), torch.randn(6, 5), torch.randint(0, 5, (6,))
    base = torch.nn.CrossEntropyLoss()
    with torch.no_grad():
        t = teacher(x)
    hard = DistillationLoss(base, teacher, "hard", 0.5, 1.0)(x, (cls, dist), y)
    expected = 0.5 * torch.nn.functional.cross_entropy(cls, y) + 0.5 * torch.nn.functional.cross_entropy(
        dist, t.argmax(1)
    )
    assert hard.item() == pytest.approx(expected.item(), rel=1e-6)
    tau = 2.0
    soft = DistillationLoss(base, teacher, "soft", 0.3, tau)(x, (cls, dist), y)
    p_t = torch.softmax(t / tau, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(dist / tau, 1))).sum() * tau * tau / dist.numel()
    assert soft.item() == pytest.approx((0.7 * torch.nn.functional.cross_entropy(cls, y) + 0.3 * kl).item(), rel=1e-5)


def test_threads_follow_the_free_cores_at_start_and_a_resume_keeps_them(fm, tiny_config, tmp_path, monkeypatch):
    """Another busy process at start: the run trains on the free core, records it, and a resume on an idle machine
    keeps that count (a different count would change float rounding, and the losses with it)."""
    import rapidnet.engine.cpu_share as cpu_share

    seen: list[int] = []
    monkeypatch.setattr(cpu_share, "free_threads", lambda most: (1, 1.0))
    original_step = ClassificationTask.train_step

    def counting_step(self, model, batch):
        seen.append(torch.get_num_threads())
        return original_step(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "train_step", counting_step)
    torch.set_num_threads(2)
    out = tmp_path / "busy"
    assert train_on(tiny_config, fm, out, "--epochs", "1") == 0
    assert set(seen) == {1} and torch.get_num_threads() == 2  # restored when fit returns
    assert load_training_state(out / "last.pt")["threads"] == 1
    assert all("other_cores" in r for r in read_jsonl(out / "steps.jsonl"))
    seen.clear()
    monkeypatch.setattr(cpu_share, "free_threads", lambda most: (2, 0.0))  # idle now
    assert train_on(tiny_config, fm, out, "--epochs", "2", "--resume", str(out / "last.pt")) == 0
    assert set(seen) == {1}
