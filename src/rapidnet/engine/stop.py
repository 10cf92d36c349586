"""Stopping a run cleanly: the first SIGINT/SIGTERM asks the loop to stop after the current step (every process at
the same step, ``last.pt`` saved); a second Ctrl-C aborts at once, keeping the previous ``last.pt``."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

from rapidnet.engine.run_folder import LAST

__all__ = ["StopRequest"]


class StopRequest:
    """SIGINT/SIGTERM handler while the loop runs: ``signum`` is the signal received (None: none yet); the previous
    handlers are back when the ``with`` block ends. ``announce``: say so on stderr (rank 0)."""

    def __init__(self, announce: bool) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.announce:
            name = signal.Signals(signum).name
            print(
                f"rapidnet train: {name} received: finishing this step, then saving {LAST} "
                "(Ctrl-C again aborts without saving)",
                file=sys.stderr,
                flush=True,
            )
