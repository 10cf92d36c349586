"""A run sized to a time budget (``train.time_budget``): how many epochs fit, from what this machine measured.

The same config runs 66-second Semantic FPN epochs on one 2-core CPU and 127-second ones on another; a fixed epoch
count either overruns the slow machine or leaves the fast one idle. With a budget, the trainer measures the first
epochs and the first evaluation, then fixes the epoch count once: later drift of the host is not chased (another
count mid-run would bend a schedule already half walked), and the count is stored with the run so that a resume
keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rapidnet.engine.console import format_duration
from rapidnet.engine.distributed import DistInfo, all_reduce_sum

__all__ = ["BUDGET_SHARE", "Budget", "TimeBudget", "epochs_text", "epochs_within_budget", "remaining_s", "time_left"]

#: ``evaluates(epoch, total)``: whether epoch ``epoch`` (1-based) is evaluated in a run of ``total`` epochs
Evaluates = Callable[[int, int], bool]

#: the share of the budget the projection may fill: the hosts measured so far drift by 10-30% within half an hour,
#: and an epoch is the smallest unit a run can give back
BUDGET_SHARE = 0.9


def remaining_s(done: int, total: int, epoch_s: float, eval_s: float, evaluates: Evaluates) -> float:
    """The seconds epochs ``done + 1 .. total`` take: ``epoch_s`` each, plus ``eval_s`` for each that
    ``evaluates(epoch, total)`` says is evaluated in a run of ``total`` epochs."""
    evaluations = sum(evaluates(e, total) for e in range(done + 1, total + 1))
    return (total - done) * epoch_s + evaluations * eval_s


def epochs_within_budget(
    budget_s: float,
    spent_s: float,
    done: int,
    epoch_s: float,
    eval_s: float,
    most: int,
    evaluates: Evaluates,
) -> int:
    """The most epochs, between ``done`` and ``most``, whose projected time fits ``budget_s``.

    ``spent_s`` is what the ``done`` epochs took; each further epoch adds ``epoch_s`` and, where
    ``evaluates(epoch, total)`` says it is evaluated in a run of ``total`` epochs, ``eval_s``.
    """
    fits = done
    for total in range(done + 1, most + 1):
        if spent_s + remaining_s(done, total, epoch_s, eval_s, evaluates) > budget_s:
            break
        fits = total
    return fits


@dataclass
class Budget:
    """What a budgeted run has spent (seconds of training steps and of evaluations) and the count it chose."""

    minutes: float
    train_s: float = 0.0
    eval_s: float = 0.0
    evaluations: int = 0
    epochs: int | None = None  # chosen after the first evaluation; None until then

    def state(self) -> dict[str, float | int | None]:
        return {
            "minutes": self.minutes,
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "evaluations": self.evaluations,
            "epochs": self.epochs,
        }

    @classmethod
    def from_state(cls, state: dict[str, float | int | None]) -> Budget:
        epochs = state.get("epochs")
        return cls(
            minutes=float(state["minutes"] or 0.0),
            train_s=float(state.get("train_s") or 0.0),
            eval_s=float(state.get("eval_s") or 0.0),
            evaluations=int(state.get("evaluations") or 0),
            epochs=int(epochs) if epochs is not None else None,
        )

    @property
    def usable_s(self) -> float:
        """The seconds a projection may fill (``BUDGET_SHARE`` of the budget)."""
        return self.minutes * 60.0 * BUDGET_SHARE

    def passed_before(self, first: int, done: int, train_s: float) -> bool:
        """Whether epochs ``1 .. first``, at the mean of the ``done`` that took ``train_s`` seconds, would alone fill
        more than the usable budget: then the run cannot wait for an evaluation at epoch ``first`` to choose."""
        return train_s * first / done > self.usable_s

    def means(self, done: int) -> tuple[float, float]:
        """The mean epoch and the mean evaluation (seconds) over the ``done`` epochs so far."""
        return self.train_s / max(done, 1), self.eval_s / max(self.evaluations, 1)

    def choose(self, done: int, most: int, evaluates: Evaluates) -> int:
        """Fix the epoch count from the mean epoch and evaluation measured over the ``done`` epochs so far."""
        epoch_s, eval_s = self.means(done)
        self.epochs = epochs_within_budget(
            self.usable_s, self.train_s + self.eval_s, done, epoch_s, eval_s, most, evaluates
        )
        return self.epochs


class TimeBudget:
    """The trainer's collaborator for ``train.time_budget``: it counts what the run spends, fixes the epoch count once
    and says so. Under DDP every process decides alike, from the times averaged over processes (one collective).

    ``evaluates`` tells which epochs are evaluated (``train.eval_interval``); ``say`` prints a line on rank 0.
    """

    def __init__(self, budget: Budget, info: DistInfo, evaluates: Evaluates, say: Callable[[str], None]) -> None:
        self.budget = budget
        self.info = info
        self.evaluates = evaluates
        self.say = say

    @classmethod
    def resumed(
        cls,
        minutes: float | None,
        state: dict[str, Any] | None,
        info: DistInfo,
        evaluates: Evaluates,
        say: Callable[[str], None],
    ) -> TimeBudget | None:
        """The run's budget (None without one); resumed from ``state``, what it had spent and the count it chose,
        which the caller then puts in place of ``train.epochs`` (the budget was spent choosing it)."""
        if minutes is None:
            return None
        recorded = (state or {}).get("budget")
        budget = Budget.from_state(recorded) if isinstance(recorded, dict) else Budget(minutes)
        budget.minutes = float(minutes)
        return cls(budget, info, evaluates, say)

    @property
    def epochs(self) -> int | None:
        """The epoch count chosen (None until the first evaluation has been measured)."""
        return self.budget.epochs

    def state(self) -> dict[str, float | int | None]:
        return self.budget.state()

    def _mean(self, values: list[float]) -> list[float]:
        if not self.info.distributed:
            return values
        return [v / self.info.world_size for v in all_reduce_sum(self.info, values)]

    def after_training(self, train_s: float, done: int, most: int) -> bool:
        """Count an epoch's training; True when this epoch must be evaluated although none is planned, because the
        epochs up to the first planned evaluation would alone pass the budget at the mean epoch so far: then the
        count is fixed before it is too late (a slow CPU: 20-minute Mask R-CNN epochs against an evaluation every
        second one and a 30-minute budget)."""
        budget = self.budget
        budget.train_s += train_s
        if budget.epochs is not None or self.evaluates(done, most):
            return False
        first = next(e for e in range(done + 1, most + 1) if self.evaluates(e, most))
        if not budget.passed_before(first, done, self._mean([budget.train_s])[0]):
            return False
        self.say(
            f"time budget {budget.minutes:g} min: {first} epochs would pass it here before the first planned "
            f"evaluation (epoch {first}), so epoch {done} is evaluated now to fix the count"
        )
        return True

    def after_evaluation(self, seconds: float, done: int, most: int) -> bool:
        """Count an evaluation; after the first, fix the epoch count (of at most ``most``), say how it was chosen and
        return True: the caller then fits the schedule to :attr:`epochs` and saves the config."""
        budget = self.budget
        budget.eval_s += seconds
        budget.evaluations += 1
        if budget.epochs is not None:
            return False
        spent = self._mean([budget.train_s, budget.eval_s])
        measured = Budget(budget.minutes, *spent, budget.evaluations)
        budget.epochs = measured.choose(done, most, self.evaluates)
        epoch_s, eval_s = measured.means(done)
        total_s = sum(spent) + remaining_s(done, budget.epochs, epoch_s, eval_s, self.evaluates)
        self.say(
            f"time budget {budget.minutes:g} min: an epoch takes {format_duration(epoch_s)} and an evaluation "
            f"{format_duration(eval_s)} here, so the run takes {budget.epochs} of up to {most} epochs "
            f"(about {format_duration(total_s)}); the schedule follows (--epochs N sets them yourself)"
        )
        return True


def epochs_text(epochs: int, budget: TimeBudget | None) -> str:
    """The run's length for its opening line: ``7 epochs``, fitted to a budget, or still to be fitted."""
    if budget is None or budget.epochs is not None:
        return f"{epochs} epochs" + (f" (fitted to {budget.budget.minutes:g} min)" if budget is not None else "")
    return f"up to {epochs} epochs, as many as fit in {budget.budget.minutes:g} min (train.time_budget)"


def time_left(
    done: int, epochs: int, epoch_s: float, eval_s: float | None, evaluates: Evaluates, budget: TimeBudget | None
) -> float | None:
    """The seconds the epochs after ``done`` should take, each training ``epoch_s`` and each evaluated one adding
    ``eval_s``: None when nothing is left or a time budget has not fixed the count yet."""
    if done >= epochs or (budget is not None and budget.epochs is None):
        return None
    return remaining_s(done, epochs, epoch_s, eval_s or 0.0, evaluates)
