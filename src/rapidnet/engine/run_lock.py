"""One training process per run folder: a lock file in the folder names the process that trains there.

Two ``rapidnet train`` on one ``--output``, or a ``--resume`` of a run that is still training, would write the same
``last.pt`` and logs in turn, and each would delete the other's files (a new run removes a stale ``steps.jsonl``).
So a run takes ``RUN/train.lock`` before it looks at the folder and removes it when it ends, however it ends: normally,
on an exception, on Ctrl-C (``KeyboardInterrupt`` unwinds) and on SIGTERM (the trainer's stop request ends the loop;
outside the loop :class:`RunLock` removes the lock before the signal ends the process). A process killed outright
(SIGKILL, power loss) leaves its lock behind; its PID is then no longer alive and the next run takes the lock over.

The file holds one JSON line: ``{"pid", "host", "started", "start_ticks", "token"}``. A lock of another host cannot be
checked and is respected; one of this host is stale when ``os.kill(pid, 0)`` raises ProcessLookupError, or when the
process with that PID started at another time than the holder (its PID was reused). A lock is created complete (a
temporary file hard-linked to the lock's name, which fails if the name exists), so a reader never sees half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rapidnet.errors import ConfigError
from rapidnet.utils import pid_alive, write_error

__all__ = ["LOCK", "LockHolder", "RunLock", "pid_alive"]

LOCK = "train.lock"

#: the tokens of the locks this process holds: a lock naming this PID with another token is a dead process's
_HELD: set[str] = set()


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, ``/proc/PID/stat`` field 22), where ``/proc`` says."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a run folder's lock."""

    pid: int
    host: str
    started: str = ""
    start_ticks: int | None = None
    token: str = ""

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            start_ticks=_start_ticks(os.getpid()),
            token=secrets.token_hex(8),
        )

    @classmethod
    def parse(cls, text: str) -> LockHolder | None:
        """A lock's holder: its JSON line, or (a lock written by hand) ``PID [HOST]``; None when neither."""
        try:
            data: Any = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            words = text.split()
            if not words or not words[0].isdigit():
                return None
            return cls(pid=int(words[0]), host=words[1] if len(words) > 1 else socket.gethostname())
        if not isinstance(data.get("pid"), int):
            return None
        ticks = data.get("start_ticks")
        return cls(
            pid=data["pid"],
            host=str(data.get("host") or socket.gethostname()),
            started=str(data.get("started") or ""),
            start_ticks=ticks if isinstance(ticks, int) else None,
            token=str(data.get("token") or ""),
        )

    def stale(self) -> bool:
        """Whether the holder has ended: checked on this host only (another host's lock is never stale here)."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():  # this process holds it, or an earlier one with the same id (a restarted container)
            return self.token not in _HELD
        if not pid_alive(self.pid):
            return True
        now = _start_ticks(self.pid)
        return self.start_ticks is not None and now is not None and now != self.start_ticks

    def describe(self) -> str:
        since = f", training there since {self.started}" if self.started else ""
        return f"process {self.pid} on host {self.host}{since}"


class RunLock:
    """``RUN/train.lock`` while this process trains in ``folder``; :meth:`acquire` creates the folder if needed, and
    :meth:`release` removes the lock and the folders it created if they are still empty (a run that failed to start
    leaves nothing behind)."""

    def __init__(self, folder: str | os.PathLike[str], name: str = LOCK) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.holder: LockHolder | None = None
        self._created: list[Path] = []
        self._previous_sigterm: Any = None

    @property
    def held(self) -> bool:
        return self.holder is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one; a live holder is a one-line :class:`ConfigError`."""
        if self.held:
            return self
        self._created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._created = []
            raise write_error(self.path, e) or e from None
        mine = LockHolder.this_process()
        try:
            for _ in range(10):  # each retry follows another process's move: a few suffice
                if self._create(mine):
                    break
                holder = self._read(self.path)
                if holder is None:
                    continue  # it went away meanwhile
                if not holder.stale():
                    raise ConfigError(
                        f"run folder {self.folder} is in use by {holder.describe()} (lock {self.path}): wait for that "
                        f"run to end or stop it (kill {holder.pid}), or choose another --output"
                        + ("; if that process has ended, delete the lock file" if not _same_host(holder) else "")
                    )
                self._take_over(holder)
            else:
                raise ConfigError(f"cannot take the lock {self.path}: other processes keep replacing it; try again")
        except BaseException:
            self._remove_created()
            raise
        self.holder = mine
        _HELD.add(mine.token)
        self._guard_sigterm()
        return self

    def release(self) -> None:
        """Remove the lock if it is still this process's (idempotent); restore the SIGTERM disposition."""
        holder, self.holder = self.holder, None
        if holder is None:
            return
        _HELD.discard(holder.token)
        self._unguard_sigterm()
        try:
            on_disk = self._read(self.path)
        except ConfigError:  # unreadable now: not ours to delete, and a release must not raise
            on_disk = None
        if on_disk is not None and on_disk.token == holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._remove_created()

    # ---- the file -----------------------------------------------------------------------------------------------

    def _create(self, holder: LockHolder) -> bool:
        """Write the lock complete under a private name, then link it to the lock's name: False if that exists."""
        text = json.dumps(asdict(holder)) + "\n"
        private = self.folder / f".{self.path.name}.{holder.pid}.{holder.token}"
        try:
            private.write_text(text)
        except OSError as e:
            raise write_error(self.path, e) or e from None
        try:
            os.link(private, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system: exclusive creation, written at once
            return self._create_exclusive(text)
        finally:
            with contextlib.suppress(OSError):
                private.unlink()

    def _create_exclusive(self, text: str) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise write_error(self.path, e) or e from None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    @staticmethod
    def _read(path: Path) -> LockHolder | None:
        """The holder named in ``path``; None when there is no such file. Garbled text names no live holder."""
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            text = ""
        except OSError as e:  # e.g. another user's lock: it cannot be judged, so it is not taken over
            raise ConfigError(
                f"cannot read the lock {path} ({e.strerror or e}): is another user training there?"
            ) from None
        return LockHolder.parse(text) or LockHolder(pid=0, host=socket.gethostname(), token="unreadable")

    def _take_over(self, stale: LockHolder) -> None:
        """Move the stale lock aside and delete it. Should another process have replaced it with its own lock in the
        meantime, what was moved is put back (the other process won)."""
        aside = self.folder / f".{self.path.name}.stale.{os.getpid()}"
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        moved = self._read(aside)
        if moved is not None and moved != stale:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        with contextlib.suppress(OSError):
            aside.unlink()

    def _remove_created(self) -> None:
        for folder in self._created:  # deepest first; stops at the first one that holds something
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    # ---- SIGTERM outside the training loop ----------------------------------------------------------------------

    def _guard_sigterm(self) -> None:
        """Where SIGTERM would end the process at once (its default), remove the lock first: the trainer's own
        handler replaces this one while the loop runs."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._previous_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _unguard_sigterm(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm)
        self._previous_sigterm = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self.release()  # restores the default disposition, which the signal sent again then takes
        os.kill(os.getpid(), signum)


def _same_host(holder: LockHolder) -> bool:
    return holder.host == socket.gethostname()
