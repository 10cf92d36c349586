"""Eager CPU training on a shared machine: train on the cores that other processes leave free.

PyTorch's CPU kernels split each operator over ``torch.get_num_threads()`` OpenMP threads, which meet at a barrier
at its end. When another process keeps one of the cores busy, one of our threads keeps losing that core, and every
operator waits for it at the barrier. Measured on the 2-core Intel Xeon with one other busy process
(``benchmarks/train_step_profile.py``, the demo's step): 2.48 s per step with 2 threads, 0.65 s with 1 thread, against
0.23 s on an idle machine.

So the trainer measures, when a run starts, how much CPU the *other* processes use on the cores this process may run
on (``/proc/stat`` minus ``/proc/self/stat``) and trains on the cores they leave free. The count is then kept for the
whole run and recorded in ``last.pt``, and a resume takes it again: a different thread count changes float
rounding, and a resumed run must give the losses of the uninterrupted one. While the run goes on,
:class:`ThreadGovernor` keeps watching and says (once) when the picture changes, so a user can restart if they
like. Where ``/proc`` is missing nothing is measured.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["ThreadGovernor", "allowed_cpus", "busy_ticks", "free_threads", "own_ticks", "pick_threads"]


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask), or all of them where the OS does not say."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def busy_ticks(cpus: list[int], stat: Path = Path("/proc/stat")) -> tuple[float, float] | None:
    """``(busy, total)`` clock ticks of ``cpus`` since boot (busy: everything but idle and iowait)."""
    try:
        lines = stat.read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{i}" for i in cpus}
    busy = total = 0.0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [float(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total > 0 else None


def own_ticks(stat: Path = Path("/proc/self/stat")) -> float | None:
    """Clock ticks of CPU this process has used (user + system, all threads)."""
    try:
        fields = stat.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return float(fields[11]) + float(fields[12])  # utime, stime (fields 14 and 15 of proc(5))


def free_threads(max_threads: int, seconds: float = 1.0) -> tuple[int, float]:
    """``(threads, cores the other processes use)`` measured over ``seconds`` now: what a run should start with."""
    import time

    governor = ThreadGovernor(max_threads, time.perf_counter(), interval_s=seconds)
    time.sleep(seconds)
    wanted = governor.poll(time.perf_counter())
    return (wanted if wanted is not None else governor.threads), governor.others


class ThreadGovernor:
    """Decides the intra-op thread count from what other processes use; call :meth:`poll` as often as you like.

    ``poll(now)`` samples at most every ``interval_s`` seconds and returns a new thread count when it should change,
    else None: ``max_threads`` while the others use less than a quarter of a core, else the cores they leave free
    (at least one).
    """

    def __init__(
        self,
        max_threads: int,
        now: float,
        interval_s: float = 5.0,
        cpus: list[int] | None = None,
        read_busy: Callable[[list[int]], tuple[float, float] | None] = busy_ticks,
        read_own: Callable[[], float | None] = own_ticks,
    ) -> None:
        self.max_threads = max_threads
        self.threads = max_threads
        self.interval_s = interval_s
        self.cpus = cpus if cpus is not None else allowed_cpus()
        self.read_busy, self.read_own = read_busy, read_own
        self.others = 0.0  # cores the other processes used over the last interval
        self._last = self._read(now)

    def _read(self, now: float) -> tuple[float, float, float, float] | None:
        busy, own = self.read_busy(self.cpus), self.read_own()
        return None if busy is None or own is None else (now, busy[0], busy[1], own)

    def poll(self, now: float) -> int | None:
        if self._last is None or now - self._last[0] < self.interval_s:
            return None
        current = self._read(now)
        if current is None:
            return None
        previous, self._last = self._last, current
        d_busy, d_total, d_own = (current[i] - previous[i] for i in (1, 2, 3))
        if d_total <= 0:
            return None
        cores = len(self.cpus)
        self.others = max(0.0, (d_busy - d_own) / d_total * cores)
        free = int(cores - self.others + 0.25)
        wanted = self.max_threads if self.others < 0.25 else max(1, min(self.max_threads, free))
        if wanted == self.threads:
            return None
        self.threads = wanted
        return wanted

    def note(self) -> str:
        """The line to show when :meth:`poll` saw the picture change: the run keeps its thread count regardless."""
        busy = f"other processes are now using {self.others:.1f} cores"
        if self.threads < torch.get_num_threads():
            return f"note: {busy}: this run keeps {torch.get_num_threads()} threads and will be slower"
        return f"note: {busy}: this run keeps {torch.get_num_threads()} threads ({self.threads} would be free)"


def pick_threads(
    device: torch.device, distributed: bool, recorded: Any, now: float, say: Callable[[str], None]
) -> ThreadGovernor | None:
    """Set the training thread count (a CPU run of one process): the cores other processes leave free, or the count
    a resumed run ``recorded``. Returns the governor that keeps watching, with ``now`` on the clock its
    :meth:`~ThreadGovernor.poll` will be called with (None where nothing is to decide)."""
    most = torch.get_num_threads()
    if device.type != "cpu" or distributed:
        return None
    if isinstance(recorded, int) and recorded >= 1:
        threads, others = min(recorded, most), 0.0
    else:
        threads, others = free_threads(most) if most > 1 else (1, 0.0)
    torch.set_num_threads(threads)
    governor = ThreadGovernor(most, now)
    governor.threads, governor.others = threads, others
    if threads < most and not isinstance(recorded, int):
        say(
            f"note: other processes are using {others:.1f} cores: training on {threads} of {most} threads, "
            "kept for the whole run (and by --resume) so that results stay reproducible (train.adapt_threads)"
        )
    return governor if most > 1 else None
