"""One temporary folder per command, removed when the command ends however it ends.

Exporters, quantizers and compilers (ours, ONNX Runtime's, OpenVINO's, ExecuTorch's, Inductor's) write temporary
files through :mod:`tempfile` or the ``TMPDIR`` their subprocesses inherit. :func:`scratch_folder` points both at a
fresh ``rapidnet-<pid>-*`` folder under the system's temporary folder for the life of the command and deletes it at
the end: a normal exit, an error, Ctrl-C or SIGTERM (turned into an exception by :func:`terminate_as_exception` so
that ``finally`` blocks run). Only SIGKILL skips the clean-up; the next command sweeps the folders of processes that
no longer run. Caches meant to outlive a command (Inductor's compiled kernels) go to the user's cache folder instead.

Standard library only: the command line sets this up before it imports torch.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

__all__ = ["PREFIX", "Terminated", "pid_alive", "scratch_folder", "sweep_stale", "terminate_as_exception"]

PREFIX = "rapidnet-"
_OWNED = re.compile(rf"^{PREFIX}(\d+)-")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process was so that clean-up code runs (a ``KeyboardInterrupt``, like Ctrl-C)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (one of another user counts as running)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):
        return False
    return True


def sweep_stale(base: str | os.PathLike[str]) -> list[Path]:
    """Remove the ``rapidnet-<pid>-*`` folders under ``base`` whose process no longer runs; the paths removed."""
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        owner = _OWNED.match(entry.name)
        if owner and int(owner.group(1)) != os.getpid() and not pid_alive(int(owner.group(1))):
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _user_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rapidnet"


@contextlib.contextmanager
def scratch_folder() -> Iterator[Path]:
    """Run the body with :mod:`tempfile` and ``TMPDIR`` pointing at a fresh folder, deleted afterwards."""
    base = tempfile.gettempdir()
    sweep_stale(base)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=base))
    saved_env = {k: os.environ.get(k) for k in ("TMPDIR", "TORCHINDUCTOR_CACHE_DIR")}
    saved_tempdir = tempfile.tempdir
    os.environ["TMPDIR"] = str(folder)
    if saved_env["TORCHINDUCTOR_CACHE_DIR"] is None:  # by default Inductor caches under TMPDIR: keep it, elsewhere
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_user_cache() / "torchinductor")
    tempfile.tempdir = str(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_tempdir
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


@contextlib.contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` for the body (the main thread only; elsewhere a no-op)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
