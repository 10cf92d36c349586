"""The contract between ``Trainer.fit`` and its callbacks: the hooks, what they may read, and how a fit ends.

This module imports nothing else of the engine, so that the trainer (which calls the hooks) and the callbacks (which
implement them) both depend on it and never on each other. It follows Lightning's ``Callback`` and mmengine's
``Hook``: a callback overrides public hook methods, each of which receives the trainer through the public interface
:class:`TrainerAPI`.

A :class:`Callback` overrides any of its hooks. The trainer calls every callback's hook in list order (the defaults of
:func:`~rapidnet.engine.callbacks.default_callbacks` first, then the ones given to ``Trainer(callbacks=...)``), at
these points:

========================  ==========================================================================================
``setup``                 model, optimizer, schedule and scaler built, before a checkpoint is restored (every run)
``on_load_checkpoint``    resuming: read back what ``on_save_checkpoint`` added to the state (after the model's)
``on_fit_start``          everything built and restored, before the first step
``on_train_epoch_start``  before the (rest of the) epoch's steps
``on_optimizer_step``     after each optimizer update (``trainer.updates`` counts them)
``on_train_step_end``     after each step, with its ``steps.jsonl`` record on logged steps (else None)
``on_train_epoch_end``    the epoch's steps done and the schedule stepped, before ``last.pt`` and the evaluation
``on_save_checkpoint``    building the ``last.pt`` state (epoch ends and interruptions): add keys to ``state``;
                          an evaluated epoch saves twice, before its evaluation and after it
``on_evaluate``           after the model's evaluation (evaluated epochs only; ``trainer.epoch`` already counts the
                          epoch), with ``results``: weights name -> metrics; a callback may add its own weights'
                          results (``"ema"``) or read them
``on_epoch_end``          ``last.pt`` written; the epoch's ``log.jsonl`` record, which is logged next
``on_fit_end``            after the last epoch or an interruption, with the :class:`FitResult`
``teardown``              always last, also when ``fit`` raises (close files)
========================  ==========================================================================================

Besides the hooks, :meth:`Callback.output_note` lets a callback name what it writes into the run folder on the
run's opening ``output`` line (TensorBoard: its event folder).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # types only: none of these modules imports the trainer or the callbacks
    import torch
    from torch import nn

    from rapidnet.config import Config
    from rapidnet.engine.budget import TimeBudget
    from rapidnet.engine.distributed import DistInfo
    from rapidnet.engine.meter import EpochMeter
    from rapidnet.engine.runlog import JsonlLog
    from rapidnet.engine.task import RunContext, Task

__all__ = ["Callback", "FitResult", "TrainerAPI"]


@dataclass
class FitResult:
    """How ``fit`` ended, for the CLI's closing lines and for callers."""

    status: str  # "completed" or "interrupted"
    output: Path
    epochs_done: int
    best: dict[str, Any] | None
    last_epoch: dict[str, Any] | None = None
    signal: int | None = None
    notes: list[str] = field(default_factory=list)
    #: the final report on the task's ``report_split`` (``{"split", "best", "final", "best_epoch"}``), if it has one
    report: dict[str, Any] | None = None

    @property
    def exit_code(self) -> int:
        """0 when completed; 128 + signal number when interrupted (the shell's convention)."""
        return 0 if self.status == "completed" else 128 + int(self.signal or signal.SIGINT)


class TrainerAPI(Protocol):
    """What a callback may read of the trainer while it fits (and the few things it may change).

    ``model`` is the plain module, ``train_model`` the one wrapped for DDP/compile; ``weights`` maps a name to each
    set of weights that is evaluated (``"model"``, and ``"ema"`` with EMA: a callback adds its own in ``setup``);
    ``epoch`` counts the epochs done, ``step`` the steps done in the current one, ``updates`` the optimizer updates,
    ``steps`` the steps per epoch; ``best`` is the best result so far (``{"metric", "value", "epoch", "source"}``),
    which the selecting :class:`~rapidnet.engine.callbacks.BestCheckpoint` sets; ``log`` is ``log.jsonl`` (rank 0
    writes, the others' is disabled); :meth:`say` prints a line on rank 0. ``pending`` is the end of the epoch just
    trained while its evaluation is still to come (``{"lr", "evaluate"}``), ``budget`` the time budget (None without
    one), ``callbacks`` the callbacks in calling order.
    """

    cfg: Config
    task: Task
    info: DistInfo
    ctx: RunContext
    output: Path
    resume: Path | None
    model: nn.Module
    train_model: nn.Module
    weights: dict[str, nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    epoch: int
    step: int
    updates: int
    steps: int
    best: dict[str, Any] | None
    meter: EpochMeter
    log: JsonlLog
    pending: dict[str, Any] | None
    budget: TimeBudget | None
    callbacks: list[Callback]

    @property
    def last_path(self) -> Path: ...

    def say(self, text: str) -> None: ...


class Callback:
    """Base class: every hook does nothing; see the module docstring for when each is called."""

    def setup(self, trainer: TrainerAPI) -> None:
        pass

    def on_load_checkpoint(self, trainer: TrainerAPI, state: dict[str, Any]) -> None:
        pass

    def on_fit_start(self, trainer: TrainerAPI) -> None:
        pass

    def on_train_epoch_start(self, trainer: TrainerAPI) -> None:
        pass

    def on_optimizer_step(self, trainer: TrainerAPI) -> None:
        pass

    def on_train_step_end(self, trainer: TrainerAPI, record: dict[str, Any] | None) -> None:
        pass

    def on_train_epoch_end(self, trainer: TrainerAPI) -> None:
        pass

    def on_evaluate(self, trainer: TrainerAPI, results: dict[str, dict[str, float]]) -> None:
        pass

    def on_save_checkpoint(self, trainer: TrainerAPI, state: dict[str, Any]) -> None:
        pass

    def on_epoch_end(self, trainer: TrainerAPI, record: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, trainer: TrainerAPI, result: FitResult) -> None:
        pass

    def teardown(self, trainer: TrainerAPI) -> None:
        pass

    def output_note(self) -> str | None:
        """What this callback writes into the run folder, for the run's opening ``output`` line (None: nothing)."""
        return None
