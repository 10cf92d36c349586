"""The run folder: which files a run writes, the guard that keeps a run from destroying another, and its lock.

A new run refuses a folder holding another run, and so does a resume into another run's folder, unless ``force``
(``--force``), which deletes that run's files first; a resume into a new folder starts its logs from the resumed
run's; stale temporary files of killed saves are removed at the start; and while a process trains in the folder,
it holds the folder's lock (:mod:`rapidnet.engine.run_lock`), so that no second process trains there meanwhile.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from rapidnet.config import Config, save_config
from rapidnet.engine.checkpoint import copy_checkpoint
from rapidnet.engine.distributed import DistInfo, all_reduce_sum
from rapidnet.engine.run_lock import RunLock
from rapidnet.engine.runlog import JsonlLog
from rapidnet.errors import ConfigError, RapidNetError
from rapidnet.utils import remove_stale_temp_files, write_error

__all__ = [
    "BEST",
    "BEST_WEIGHTS",
    "CONFIG",
    "LAST",
    "LOG",
    "RUN_FILES",
    "RUN_RESULTS",
    "STEPS_LOG",
    "RunFolder",
    "same_folder",
]

LAST, BEST, BEST_WEIGHTS = "last.pt", "best.pt", "model_best.safetensors"
LOG, STEPS_LOG, CONFIG = "log.jsonl", "steps.jsonl", "config.yaml"
#: what a finished epoch leaves in a run folder: a folder with any of them holds a run that a new one would destroy
RUN_RESULTS = (LAST, BEST, BEST_WEIGHTS, LOG)
#: every file a run writes into its folder (a resume into another run's folder would replace or splice them all)
RUN_FILES = (*RUN_RESULTS, STEPS_LOG, CONFIG)


def same_folder(a: Path, b: Path) -> bool:
    """Whether two paths name one folder (symbolic links followed; a folder not yet created is compared by path)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


class RunFolder:
    """The folder ``output`` a run (new, or resumed from ``resume``) writes; ``say`` prints a note (rank 0)."""

    def __init__(
        self, output: Path, resume: Path | None, force: bool, info: DistInfo, say: Callable[[str], None]
    ) -> None:
        self.output, self.resume, self.force = output, resume, force
        self.info = info
        self.say = say
        self.lock = RunLock(output)

    @property
    def resumes_here(self) -> bool:
        """A resume into the checkpoint's own folder (what resuming means), not into another run's."""
        return self.resume is not None and same_folder(self.resume.parent, self.output)

    def acquire(self) -> None:
        """Rank 0 takes the folder's lock; every process learns whether it did (one collective under DDP), so that a
        refused run stops on every process with one line instead of leaving the others waiting."""
        error: RapidNetError | None = None
        if self.info.is_main:
            try:
                self.lock.acquire()
            except RapidNetError as e:
                error = e
        if self.info.distributed:
            refused = all_reduce_sum(self.info, [float(error is not None)])[0] > 0
            if refused and error is None:
                raise ConfigError(f"rank 0 could not take the lock of run folder {self.output}: see its message")
        if error is not None:
            raise error

    def release(self) -> None:
        self.lock.release()

    def check(self) -> tuple[str, ...]:
        """Refuse to write over another run (one-line ConfigError) unless ``force``; return the run files to delete
        before this run writes (:meth:`prepare` deletes them once the run has been built, so a run that fails to
        start leaves the old one as it was).

        A new run refuses a folder holding results (:data:`RUN_RESULTS`); the logs of a run that stopped before its
        first checkpoint (``steps.jsonl``, TensorBoard events) are no run, and are removed rather than mixed with the
        new ones. A resume into the checkpoint's own folder is what resuming means; into another folder, any run file
        there would be replaced or spliced.
        """
        output, resume = self.output, self.resume
        if self.resumes_here:
            return ()
        found = [name for name in (RUN_RESULTS if resume is None else RUN_FILES) if (output / name).exists()]
        if found and not self.force:
            if resume is None:
                last = output / LAST
                how = f"continue it with --resume {last}, " if last.exists() else ""
                raise ConfigError(
                    f"output folder {output} already holds a run ({', '.join(found)}): {how}choose another --output, "
                    "or pass --force to replace it"
                )
            raise ConfigError(
                f"output folder {output} already holds another run ({', '.join(found)}): resuming {resume} there "
                f"would overwrite it; leave out --output to continue in {resume.parent}, choose an empty --output, "
                "or pass --force to replace that run"
            )
        if found:
            self.say(f"note: --force: replacing the run in {output} ({', '.join(found)})")
            return RUN_FILES
        return (STEPS_LOG,) if resume is None else ()

    def prepare(self, delete: Sequence[str]) -> None:
        """Rank 0, just before the first write: remove stale temporary files of killed saves, delete ``delete`` and
        the TensorBoard events (when replacing a run), and resuming into another folder than the checkpoint's, start
        the logs from the resumed run's so they read as one run."""
        output = self.output
        stale = remove_stale_temp_files(output)
        if stale:
            names = ", ".join(p.name for p in stale)
            self.say(f"note: removed {len(stale)} temporary file(s) left by an interrupted save: {names}")
        board = output / "tensorboard"
        events = sorted(board.glob("events.out.tfevents.*")) if delete and board.is_dir() else []
        for path in [output / name for name in delete] + events:
            try:
                if path.is_file() or path.is_symlink():
                    path.unlink()
            except OSError as e:
                raise ConfigError(f"cannot delete {path} ({e.strerror or e}): remove it by hand") from None
        resume = self.resume
        if resume is not None and not same_folder(resume.parent, output):
            for name in (LOG, STEPS_LOG):
                if (resume.parent / name).is_file():
                    copy_checkpoint(resume.parent / name, output / name)

    def rewind_logs(self, log: JsonlLog, steps_log: JsonlLog, done_epochs: int, logged_steps: tuple[int, int]) -> None:
        """Resuming: drop the log lines the run is about to redo, so the logs read as one uninterrupted run: the
        epochs after ``done_epochs`` (and the final report of a finished run: a run resumed to more epochs reports
        again at its end), and the steps from ``logged_steps`` (0-based epoch, step) on."""
        log.keep_only(lambda r: int(r.get("epoch", 0)) <= done_epochs and "report" not in r)
        steps_log.keep_only(lambda r: (int(r.get("epoch", 1)) - 1, int(r.get("step", 0))) < logged_steps)

    def save_config(self, cfg: Config) -> None:
        """Write ``config.yaml`` (rank 0), creating the folder where needed."""
        if not self.info.is_main:
            return
        try:
            self.output.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise write_error(self.output / CONFIG, e) or e from None
        save_config(cfg, self.output / CONFIG)
