"""Issue 16: nothing lost. A resume never overwrites another run, no command destroys its own source, a failing
evaluation keeps the epoch's checkpoint, a full disk or a killed save leaves no temporary file and gives one line,
and the first epoch tells how long the run will take.

Runs use the tiny RapidNet of ``test_train`` on a 32-image fake Fashion-MNIST (2 steps per epoch) or the engine's
toy regression task of ``test_engine``.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rapidnet
from conftest import MICRO
from rapidnet.cli.main import build_parser, main
from rapidnet.engine import Callback, JsonlLog, Trainer, load_training_state, read_jsonl
from rapidnet.engine.trainer import format_duration
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.models import save_weights
from rapidnet.utils import atomic_write, refuse_overwriting_input, remove_stale_temp_files
from test_engine import _toy_config, _ToyTask
from test_train import TINY, make_image_folder

RUN_FILES = ("last.pt", "best.pt", "model_best.safetensors", "config.yaml", "log.jsonl", "steps.jsonl")


def one_line_error(capsys, code: int, command: str) -> str:
    """The command exited 2 with exactly one line on stderr, which is returned."""
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"rapidnet {command}: error: "), err
    return err[0]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ---- 1. a resume never overwrites another run ---------------------------------------------------------------------


def train(config: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", "--no-progress", "--config", str(config), "--data", str(data), "--output", str(out), *extra])


def resume(last: Path, *extra: str) -> int:
    return main(["train", "--no-progress", "--resume", str(last), *extra])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RUN_FILES}


@pytest.fixture
def two_runs(config, data, tmp_path) -> tuple[Path, Path]:
    """Runs ``a`` (seed 0) and ``b`` (seed 1), one epoch each."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(config, data, a) == 0 and train(config, data, b, "--seed", "1") == 0
    return a, b


def test_resume_into_another_runs_folder_is_refused_unless_force(two_runs, capsys):
    a, b = two_runs
    before = snapshot(b)
    message = one_line_error(capsys, resume(a / "last.pt", "--epochs", "2", "--output", str(b)), "train")
    assert "already holds another run" in message and "--force" in message and str(a) in message
    assert snapshot(b) == before  # last.pt, best.pt, model_best.safetensors, config.yaml and both logs untouched
    only_a_checkpoint = b.parent / "c"
    only_a_checkpoint.mkdir()
    (only_a_checkpoint / "best.pt").write_bytes(b"someone's best")
    message = one_line_error(capsys, resume(a / "last.pt", "--output", str(only_a_checkpoint)), "train")
    assert "best.pt" in message and (only_a_checkpoint / "best.pt").read_bytes() == b"someone's best"

    assert resume(a / "last.pt", "--epochs", "2", "--output", str(b), "--force") == 0
    assert "--force: replacing the run in" in capsys.readouterr().out
    assert [r["epoch"] for r in read_jsonl(b / "log.jsonl")] == [1, 2]  # a's epoch 1, then 2: nothing of b's
    assert read_jsonl(b / "log.jsonl")[0] == read_jsonl(a / "log.jsonl")[0]
    assert load_training_state(b / "last.pt")["config"]["train"]["seed"] == 0  # a's run, continued
    assert [r["epoch"] for r in read_jsonl(b / "steps.jsonl")] == [1, 1, 2, 2]


def test_resume_into_its_own_or_an_empty_folder_continues_with_the_runs_logs(two_runs, tmp_path, capsys):
    a, _ = two_runs
    empty = tmp_path / "continued"
    assert resume(a / "last.pt", "--epochs", "2", "--output", str(empty)) == 0
    assert [r["epoch"] for r in read_jsonl(empty / "log.jsonl")] == [1, 2]  # a's log carried over, then epoch 2
    assert [r["epoch"] for r in read_jsonl(a / "log.jsonl")] == [1]  # the source run is untouched
    assert resume(a / "last.pt", "--epochs", "2") == 0  # into its own folder: what resuming means
    assert [r["epoch"] for r in read_jsonl(a / "log.jsonl")] == [1, 2]


def test_a_new_run_over_a_run_needs_force_which_starts_it_afresh(two_runs, config, data, capsys):
    _, b = two_runs
    message = one_line_error(capsys, train(config, data, b), "train")
    assert "already holds a run" in message and "--resume" in message and "--force" in message
    # --force deletes the run's files: a checkpoint the new run starts from must not be one of them
    message = one_line_error(
        capsys, train(config, data, b, "--force", "--set", f"model.checkpoint={b / 'model_best.safetensors'}"), "train"
    )
    assert "same file as the input" in message and (b / "model_best.safetensors").is_file()
    assert train(config, data, b, "--force", "--epochs", "1") == 0
    assert [r["epoch"] for r in read_jsonl(b / "log.jsonl")] == [1]  # not b's old line followed by the new one
    assert len(read_jsonl(b / "steps.jsonl")) == 2


def test_det_and_seg_train_take_force_too():
    parser = build_parser()
    for command in ("det", "seg"):
        args = parser.parse_args([command, "train", "--resume", "runs/x/last.pt", "--output", "runs/y", "--force"])
        assert args.force is True


# ---- 2. no command destroys its own source --------------------------------------------------------------------------


@pytest.fixture
def weights(tmp_path) -> Path:
    model = rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO)
    return save_weights(model, tmp_path / "X.safetensors")


def test_export_and_convert_refuse_to_write_over_their_source(weights, tmp_path, capsys):
    before = weights.read_bytes()
    os.symlink(weights, tmp_path / "link.safetensors")
    os.link(weights, tmp_path / "hard.safetensors")
    for output in (weights, tmp_path / "sub" / ".." / "X.safetensors", tmp_path / "link.safetensors"):
        code = main(["export", "--checkpoint", str(weights), "--output", str(output), "--no-verify"])
        assert "same file as the input" in one_line_error(capsys, code, "export")
    code = main(["export", "--checkpoint", str(weights), "--output", str(tmp_path / "hard.safetensors")])
    assert "same file as the input" in one_line_error(capsys, code, "export")
    for dst in (weights, tmp_path / "hard.safetensors"):
        assert "same file as the input" in one_line_error(capsys, main(["convert", str(weights), str(dst)]), "convert")
    assert weights.read_bytes() == before and rapidnet.load(weights)[0] is not None

    # OpenVINO writes NAME.xml and NAME.bin: a source named NAME.bin is refused as well
    source = save_weights(rapidnet.create_model("rapidnet_ti", num_classes=10, **MICRO), tmp_path / "w.bin")
    code = main(["export", "--format", "openvino", "--checkpoint", str(source), "--output", str(tmp_path / "w.xml")])
    assert "w.bin" in one_line_error(capsys, code, "export")


def test_overlays_and_plots_refuse_to_replace_their_inputs(tmp_path, capsys):
    image = tmp_path / "scene.png"
    image.write_bytes(b"an image")
    code = main(
        ["det", "predict", str(image), "--checkpoint", str(tmp_path / "m.safetensors"), "--output", str(tmp_path)]
    )
    assert "same file as the input" in one_line_error(capsys, code, "det") and image.read_bytes() == b"an image"
    JsonlLog(tmp_path / "run" / "log.jsonl").append({"epoch": 1, "train_loss": 1.0})
    log = tmp_path / "run" / "log.jsonl"
    code = main(["plot", str(tmp_path / "run"), "--output", str(log)])
    assert "same file as the input" in one_line_error(capsys, code, "plot")
    assert read_jsonl(log) == [{"epoch": 1, "train_loss": 1.0}]


def test_refuse_overwriting_input_tells_same_files_from_different_ones(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"a")
    refuse_overwriting_input(b, a, None)  # a new file: fine
    refuse_overwriting_input([b, tmp_path / "b.bin"], a)
    with pytest.raises(ConfigError, match="same file as the input"):
        refuse_overwriting_input([b, a], None, a)
    with pytest.raises(ConfigError, match="folder holding the input"):  # a folder output replaces what it holds
        refuse_overwriting_input(tmp_path, a)


# ---- 3. a failing evaluation keeps the epoch -------------------------------------------------------------------------


class _EvalFailsOnce(_ToyTask):
    """The toy task whose first evaluation meets an unreadable validation image; its evaluation draws from the global
    torch RNG, so an exact resume must restore the RNG state from before the evaluation."""

    def __init__(self, cfg, fail: bool) -> None:
        super().__init__(cfg)
        self.fail = fail

    def evaluate(self, model):
        if self.fail:
            raise DataError("cannot read validation image val/7.png: remove it or pass --skip-corrupt")
        x = torch.randn(32, 4)
        with torch.no_grad():
            return {"mse": float(torch.nn.functional.mse_loss(model(x), x.sum(1, keepdim=True)))}


def test_a_failing_evaluation_keeps_the_epoch_and_the_resume_redoes_it_exactly(tmp_path, capsys):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    cfg = _toy_config(ref, **{"train.epochs": 3})
    assert Trainer(_EvalFailsOnce(cfg, fail=False), cfg, progress=False).fit().status == "completed"

    cfg = _toy_config(cut, **{"train.epochs": 3})
    with pytest.raises(DataError, match=r"val/7\.png"):
        Trainer(_EvalFailsOnce(cfg, fail=False), cfg, progress=False, callbacks=[_FailSecondEval()]).fit()
    state = load_training_state(cut / "last.pt")  # epoch 2's training is kept
    assert (state["epoch"], state["step"]) == (2, 0) and state["pending_eval"] is not None
    assert state["best"]["epoch"] == 1 and [r["epoch"] for r in read_jsonl(cut / "log.jsonl")] == [1]

    trainer = Trainer(_EvalFailsOnce(cfg, fail=False), cfg, resume=cut / "last.pt", progress=False)
    assert trainer.fit().status == "completed"
    assert "the evaluation of epoch 2" in capsys.readouterr().out
    keys = ("epoch", "step", "train_loss", "train_loss_mse", "val_mse", "ema_val_mse", "best_mse", "best_epoch", "lr")
    got, want = read_jsonl(cut / "log.jsonl"), read_jsonl(ref / "log.jsonl")
    assert [[r[k] for k in keys] for r in got] == [[r[k] for k in keys] for r in want]
    assert [r["loss"] for r in read_jsonl(cut / "steps.jsonl")] == [r["loss"] for r in read_jsonl(ref / "steps.jsonl")]
    assert load_training_state(cut / "best.pt")["best"] == load_training_state(ref / "best.pt")["best"]
    assert load_training_state(cut / "last.pt")["pending_eval"] is None


class _FailSecondEval(Callback):
    """Makes the task's evaluation fail at the end of epoch 2 (after its training steps)."""

    def on_train_epoch_end(self, trainer) -> None:
        trainer.task.fail = trainer.epoch == 1


def test_an_unreadable_validation_image_keeps_last_pt_of_the_epoch(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", n_train=8, n_val=2)
    bad = folder / "val" / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "run"
    args = ["train", "--no-progress", "--data", str(folder), "--output", str(out), "--epochs", "1", "--batch-size",
            "8", "--input-size", "32", "--workers", "0", "--no-ema", "--set", TINY, "--set", "aug.mixup=0",
            "--set", "aug.cutmix=0"]  # fmt: skip
    message = one_line_error(capsys, main(args), "train")
    assert str(bad) in message
    assert load_training_state(out / "last.pt")["epoch"] == 1  # the epoch's training survives the bad image
    bad.unlink()
    assert main(["train", "--no-progress", "--resume", str(out / "last.pt")]) == 0
    log = read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in log] == [1] and log[0]["val_top1"] is not None
    assert (out / "best.pt").is_file() and (out / "model_best.safetensors").is_file()


# ---- 4. a full disk or a killed save leaves no temporary file -------------------------------------------------------


def _write_then(error: BaseException):
    """A writer that writes some bytes, then fails as a full disk (or Ctrl-C) does."""

    def write(tmp: Path) -> None:
        Path(tmp).write_bytes(b"x" * 4096)
        raise error

    return write


class _SafetensorError(Exception):
    """What safetensors raises (its own type) when the disk fills up."""


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "is full"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
        (RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 4160"), "is full"),
        (RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "is full"),
        (_SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"), "is full"),
    ],
)
def test_a_full_disk_is_one_line_and_leaves_the_previous_file(error, said, tmp_path):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous")
    with pytest.raises(CheckpointError) as info:
        atomic_write(target, _write_then(error))
    message = str(info.value)
    assert "\n" not in message and str(tmp_path) in message and said in message and "free space" in message
    assert target.read_bytes() == b"previous" and temp_files(tmp_path) == []


def test_a_read_only_or_forbidden_folder_is_one_line(tmp_path):
    for number, said in ((errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")):
        with pytest.raises(CheckpointError, match=said):
            atomic_write(tmp_path / "x.pt", _write_then(OSError(number, os.strerror(number))))
    assert temp_files(tmp_path) == []


def test_ctrl_c_or_a_bug_during_a_save_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "last.pt"
    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, _write_then(KeyboardInterrupt()))
    with pytest.raises(ValueError, match="a bug"):  # not a disk problem: the traceback stays
        atomic_write(target, _write_then(ValueError("a bug")))
    assert temp_files(tmp_path) == [] and not target.exists()


def test_torch_save_on_a_full_disk_is_one_line_for_convert_and_the_trainer(weights, tmp_path, capsys, monkeypatch):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"previous")
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"PK" + b"\0" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1088 vs 977")

    monkeypatch.setattr(torch, "save", full_disk_save)
    message = one_line_error(capsys, main(["convert", str(weights), str(dst)]), "convert")
    assert "disk holding" in message and "full" in message and str(tmp_path) in message
    assert dst.read_bytes() == b"previous" and temp_files(tmp_path) == []

    run = tmp_path / "run"
    cfg = _toy_config(run, **{"train.epochs": 1})
    monkeypatch.setattr(torch, "save", real_save)
    assert Trainer(_ToyTask(cfg), cfg, progress=False).fit().status == "completed"
    before = (run / "last.pt").read_bytes()
    monkeypatch.setattr(torch, "save", full_disk_save)
    cfg = _toy_config(run, **{"train.epochs": 2})
    with pytest.raises(CheckpointError, match="full"):
        Trainer(_ToyTask(cfg), cfg, resume=run / "last.pt", progress=False).fit()
    assert (run / "last.pt").read_bytes() == before and temp_files(run) == []


def test_stale_temporary_files_of_killed_saves_are_removed_when_a_run_starts(tmp_path, capsys):
    run = tmp_path / "run"
    cfg = _toy_config(run, **{"train.epochs": 1})
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (run / f".last.pt.tmp{dead_pid}").write_bytes(b"41 MB of a killed save")
    (run / f".best.pt.tmp{os.getpid()}").write_bytes(b"left by an earlier process with this id")
    (run / f".model_best.safetensors.tmp{os.getppid()}").write_bytes(b"a live process is writing this")
    (run / ".notes.tmp").write_text("not ours")
    assert Trainer(_ToyTask(cfg), cfg, progress=False).fit().status == "completed"
    assert "removed 2 temporary file(s) left by an interrupted save" in capsys.readouterr().out
    assert temp_files(run) == sorted([f".model_best.safetensors.tmp{os.getppid()}", ".notes.tmp"])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_full_disk_while_logging_is_one_line(tmp_path, monkeypatch):
    import rapidnet.engine.runlog as runlog

    def full_open(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog, "open", full_open, raising=False)  # shadows the builtin in that module only
    with pytest.raises(CheckpointError, match="is full"):
        JsonlLog(tmp_path / "log.jsonl").append({"epoch": 1})


# ---- 5. the first epoch tells the time left -------------------------------------------------------------------------


def test_the_first_epoch_prints_and_logs_the_time_left(config, data, tmp_path, capsys):
    assert [format_duration(s) for s in (0.4, 42, 125, 3600 + 7 * 60 + 9)] == ["0s", "42s", "2m05s", "1h07m"]
    out = tmp_path / "demo"
    assert train(config, data, out, "--epochs", "3") == 0
    text = capsys.readouterr().out
    line = next(line for line in text.splitlines() if line.startswith("epoch 1 took "))
    assert "left for 2 more epochs" in line and "about " in line
    log = read_jsonl(out / "log.jsonl")
    assert isinstance(log[0]["eta_s"], float) and log[0]["eta_s"] >= 0
    assert all("eta_s" not in r for r in log[1:])
    assert text.count(" took ") == 1
