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

__all__ = ["BUDGET_SHARE", "Budget", "epochs_within_budget", "remaining_s"]

#: the share of the budget the projection may fill: the hosts measured so far drift by 10-30% within half an hour,
#: and an epoch is the smallest unit a run can give back
BUDGET_SHARE = 0.9


def remaining_s(done: int, total: int, epoch_s: float, eval_s: float, evaluates: Callable[[int, int], bool]) -> float:
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
    evaluates: Callable[[int, int], bool],
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

    def choose(self, done: int, most: int, evaluates: Callable[[int, int], bool]) -> int:
        """Fix the epoch count from the mean epoch and evaluation measured over the ``done`` epochs so far."""
        epoch_s, eval_s = self.means(done)
        self.epochs = epochs_within_budget(
            self.usable_s, self.train_s + self.eval_s, done, epoch_s, eval_s, most, evaluates
        )
        return self.epochs
