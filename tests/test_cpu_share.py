"""The thread governor: training threads follow the cores that other processes leave free."""

from __future__ import annotations

from pathlib import Path

import pytest

from rapidnet.engine.cpu_share import ThreadGovernor, allowed_cpus, busy_ticks, own_ticks


class FakeMachine:
    """Two cores; ``others`` and ``ours`` are the cores in use by other processes and by us, per second."""

    def __init__(self) -> None:
        self.t = 0.0
        self.busy = self.total = self.own = 0.0
        self.others = self.ours = 0.0

    def run(self, seconds: float, ticks_per_s: float = 100.0) -> float:
        self.t += seconds
        self.busy += (self.others + self.ours) * seconds * ticks_per_s
        self.total += 2 * seconds * ticks_per_s
        self.own += self.ours * seconds * ticks_per_s
        return self.t

    def governor(self) -> ThreadGovernor:
        return ThreadGovernor(
            2,
            self.t,
            interval_s=5.0,
            cpus=[0, 1],
            read_busy=lambda cpus: (self.busy, self.total),
            read_own=lambda: self.own,
        )


def test_threads_drop_while_another_process_is_busy_and_come_back():
    m = FakeMachine()
    g = m.governor()
    m.ours = 2.0
    assert g.poll(m.run(6)) is None  # alone: keep both threads
    m.others, m.ours = 1.0, 1.0
    assert g.poll(m.run(2)) is None  # sampled at most every 5 s
    assert g.poll(m.run(4)) == 1 and g.others == pytest.approx(1.0)
    assert g.poll(m.run(6)) is None  # still busy: no change
    m.others, m.ours = 0.0, 1.0
    assert g.poll(m.run(6)) == 2 and g.others == pytest.approx(0.0)


def test_a_little_background_load_keeps_every_thread_and_never_below_one():
    m = FakeMachine()
    g = m.governor()
    m.others, m.ours = 0.1, 1.9
    assert g.poll(m.run(6)) is None
    m.others = 2.0  # both cores taken by others: still one thread
    assert g.poll(m.run(6)) == 1


def test_without_proc_it_never_decides():
    g = ThreadGovernor(2, 0.0, cpus=[0, 1], read_busy=lambda cpus: None, read_own=lambda: None)
    assert g.poll(100.0) is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")
def test_proc_readers_parse_this_machine():
    cpus = allowed_cpus()
    busy, total = busy_ticks(cpus)
    assert 0 <= busy <= total
    assert own_ticks() >= 0
    assert busy_ticks([10_000]) is None  # a CPU that does not exist: nothing to read


def test_busy_ticks_reads_only_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 10 50 10 0 0 0 0 0\ncpu0 10 0 5 20 5 0 0 0 0 0\ncpu1 20 0 5 30 5 0 0 0 0 0\nintr 12345\n"
    )
    assert busy_ticks([1], stat) == (25.0, 60.0)
    assert busy_ticks([0, 1], stat) == (40.0, 100.0)
