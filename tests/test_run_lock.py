"""One training process per run folder: ``RUN/train.lock`` names the process training there.

A second ``rapidnet train`` on the folder (or a ``--resume`` of the run while it trains) gets one line naming the
folder and the holder's PID; a lock whose process has ended is taken over; the lock goes when the run ends, however
it ends. Runs use the toy regression task of ``test_engine`` and, for the command line, the tiny RapidNet of
``test_train`` on a small fake Fashion-MNIST.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import rapidnet
from rapidnet.cli.main import main
from rapidnet.engine import Callback, RunLock, Trainer, load_training_state, read_jsonl
from rapidnet.engine.run_lock import LOCK, LockHolder
from rapidnet.errors import ConfigError, DataError
from test_engine import _Recorder, _toy_config, _ToyTask

SRC = str(Path(rapidnet.__file__).resolve().parents[1])


@pytest.fixture
def live_pid() -> Iterator[int]:
    """The id of a process that runs on this host while the test does."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    """The id of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def write_lock(folder: Path, pid: int, host: str | None = None, **extra: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    path.write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), **extra}) + "\n")
    return path


def one_line_error(capsys, code: int, command: str = "train") -> str:
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"rapidnet {command}: error: "), err
    return err[0]


# ---- the lock itself ------------------------------------------------------------------------------------------------


def test_a_lock_names_this_process_and_a_second_one_is_refused(tmp_path):
    run = tmp_path / "runs" / "a"
    with RunLock(run) as lock:
        holder = json.loads((run / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"run folder {run} is in use by process {os.getpid()} on host"):
            RunLock(run).acquire()  # another trainer in this very process
        assert lock.held
    assert not (run / LOCK).exists()
    assert not (tmp_path / "runs").exists()  # the folders the lock created, empty again, are gone


def test_stale_locks_are_taken_over(tmp_path):
    run = tmp_path / "run"
    stale = [
        {"pid": dead_pid()},
        {"pid": os.getpid(), "token": "an earlier process with this id"},  # a restarted container reuses ids
        {"pid": os.getppid(), "start_ticks": -1},  # a live process that started after the holder: the id was reused
    ]
    for holder in stale:
        write_lock(run, **holder)  # type: ignore[arg-type]
        with RunLock(run):
            assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
        assert not (run / LOCK).exists() and run.is_dir()  # the folder was there before: it stays
    (run / LOCK).write_text("")  # unreadable: no holder to wait for
    RunLock(run).acquire().release()


def test_a_live_holder_or_another_hosts_lock_is_respected(tmp_path, live_pid):
    run = tmp_path / "run"
    lock = write_lock(run, live_pid)
    with pytest.raises(ConfigError, match=rf"in use by process {live_pid} on host .*kill {live_pid}"):
        RunLock(run).acquire()
    lock.write_text(f"{live_pid}\n")  # written by hand: PID only
    with pytest.raises(ConfigError, match=str(live_pid)):
        RunLock(run).acquire()
    write_lock(run, dead_pid(), host="another-host")
    with pytest.raises(ConfigError, match=r"on host another-host.*delete the lock file"):
        RunLock(run).acquire()
    assert json.loads(lock.read_text())["host"] == "another-host"  # untouched


def test_racing_processes_take_a_stale_lock_once(tmp_path):
    """Four processes start together on a folder whose lock is stale: one takes it, the others are refused."""
    run = tmp_path / "run"
    write_lock(run, dead_pid())
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {SRC!r})
        from rapidnet.engine.run_lock import RunLock
        from rapidnet.errors import ConfigError
        start = float(sys.argv[1])
        while time.time() < start:
            time.sleep(0.001)
        try:
            lock = RunLock({str(run)!r}).acquire()
        except ConfigError:
            print("refused")
        else:
            print("took it")
            time.sleep(1.5)
            lock.release()
        """
    )
    start = str(time.time() + 8)  # after every process has imported rapidnet
    procs = [
        subprocess.Popen([sys.executable, "-c", script, start], stdout=subprocess.PIPE, text=True) for _ in range(4)
    ]
    said = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert said == ["refused", "refused", "refused", "took it"]
    assert not (run / LOCK).exists() and [p.name for p in run.iterdir()] == []


def test_sigterm_outside_the_loop_removes_the_lock_and_still_ends_the_process(tmp_path):
    run = tmp_path / "run"
    script = (
        f"import os, signal, sys, time; sys.path.insert(0, {SRC!r})\n"
        "from rapidnet.engine.run_lock import RunLock\n"
        f"RunLock({str(run)!r}).acquire()\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], timeout=60)
    assert proc.returncode == -signal.SIGTERM  # killed by the signal, as without a lock
    assert not run.exists()  # lock and the folder it created are gone


# ---- the trainer holds it ------------------------------------------------------------------------------------------


class _SeesTheLock(Callback):
    def on_fit_start(self, trainer) -> None:
        self.holder = LockHolder.parse((trainer.output / LOCK).read_text())


def test_a_trainer_holds_the_lock_while_it_trains_and_gives_it_back(tmp_path):
    out = tmp_path / "run"
    cfg = _toy_config(out, **{"train.epochs": 1})
    sees = _SeesTheLock()
    assert Trainer(_ToyTask(cfg, steps=2), cfg, progress=False, callbacks=[sees]).fit().status == "completed"
    assert sees.holder is not None and sees.holder.pid == os.getpid()
    assert not (out / LOCK).exists()


def test_a_second_trainer_or_a_resume_of_a_run_still_training_is_refused(tmp_path, live_pid):
    out = tmp_path / "run"
    cfg = _toy_config(out, **{"train.epochs": 1})
    assert Trainer(_ToyTask(cfg, steps=2), cfg, progress=False).fit().status == "completed"
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    lock = write_lock(out, live_pid)
    cfg = _toy_config(out, **{"train.epochs": 2})
    for resume in (None, out / "last.pt"):
        with pytest.raises(ConfigError, match=rf"run folder {out} is in use by process {live_pid}"):
            Trainer(_ToyTask(cfg, steps=2), cfg, resume=resume, progress=False, force=True).fit()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p != lock} == before  # nothing touched
    assert json.loads(lock.read_text())["pid"] == live_pid


def test_a_dead_holders_lock_is_taken_over_and_removed_at_the_end(tmp_path):
    out = tmp_path / "run"
    write_lock(out, dead_pid())
    cfg = _toy_config(out, **{"train.epochs": 1})
    assert Trainer(_ToyTask(cfg, steps=2), cfg, progress=False).fit().status == "completed"
    assert not (out / LOCK).exists() and (out / "last.pt").is_file()


class _FailingEval(_ToyTask):
    def evaluate(self, model):
        raise DataError("cannot read validation image val/7.png")


def test_the_lock_goes_on_an_error_and_on_sigterm(tmp_path):
    out = tmp_path / "run"
    cfg = _toy_config(out, **{"train.epochs": 1})
    with pytest.raises(DataError):
        Trainer(_FailingEval(cfg, steps=2), cfg, progress=False).fit()
    assert not (out / LOCK).exists() and (out / "last.pt").is_file()

    out = tmp_path / "stopped"
    cfg = _toy_config(out)
    result = Trainer(_ToyTask(cfg), cfg, progress=False, callbacks=[_Recorder(stop_at=(0, 2))]).fit()
    assert result.status == "interrupted" and not (out / LOCK).exists()
    assert load_training_state(out / "last.pt")["step"] == 3  # the step under way when the signal came finishes
    assert Trainer(_ToyTask(cfg), cfg, resume=out / "last.pt", progress=False).fit().status == "completed"
    assert not (out / LOCK).exists()


def test_a_run_that_fails_to_start_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "run"
    cfg = _toy_config(out)
    with pytest.raises(DataError, match="no full batch"):
        Trainer(_ToyTask(cfg, steps=0), cfg, progress=False).fit()
    assert not (tmp_path / "new").exists()


# ---- rapidnet train -----------------------------------------------------------------------------------------------


def test_rapidnet_train_on_a_locked_folder_is_one_line_then_a_stale_lock_is_taken_over(
    config, data, tmp_path, capsys, live_pid
):
    out = tmp_path / "run"
    write_lock(out, live_pid)
    args = ["train", "--no-progress", "--config", str(config), "--data", str(data), "--output", str(out)]
    message = one_line_error(capsys, main(args))
    assert f"run folder {out} is in use by process {live_pid}" in message
    assert sorted(p.name for p in out.iterdir()) == [LOCK]

    write_lock(out, dead_pid())
    assert main(args) == 0
    assert not (out / LOCK).exists() and [r["epoch"] for r in read_jsonl(out / "log.jsonl")] == [1]


def test_under_ddp_a_locked_folder_stops_every_process(config, data, tmp_path, live_pid, torchrun):
    out = tmp_path / "run"
    write_lock(out, live_pid)
    proc = torchrun("train", "--config", config, "--data", data, "--output", out, "--no-progress", timeout=180)
    assert proc.returncode != 0
    assert f"is in use by process {live_pid}" in proc.stderr  # rank 0's line
    assert "rank 0 could not take the lock" in proc.stderr  # rank 1 stopped too, instead of waiting for rank 0
    assert sorted(p.name for p in out.iterdir()) == [LOCK]
