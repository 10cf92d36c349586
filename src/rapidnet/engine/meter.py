"""The running sums of the epoch in progress: the total loss and every named loss a step returns.

They are saved in checkpoints so that a resumed epoch reports the same means as an uninterrupted one. Under DDP a
step's sums are reduced in one collective with the total, so every process must list the named losses in the same
order: :class:`LossNames` keeps that order for the whole run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EpochMeter", "LossNames", "loss_key", "short_loss"]


def loss_key(name: str) -> str:
    """The log key of a named loss: its name when it starts with ``loss_`` (torchvision's), else ``loss_NAME``."""
    return name if name.startswith("loss_") else f"loss_{name}"


def short_loss(name: str) -> str:
    """``loss_box_reg`` -> ``box_reg``: the progress bar's and the epoch line's label."""
    return loss_key(name)[len("loss_") :]


def _floats(values: Iterable[Any]) -> list[float]:
    """Python floats of scalar tensors (one device sync for all of them) or numbers."""
    items = list(values)
    tensors = [v.detach().float().reshape(()) for v in items if isinstance(v, torch.Tensor)]
    if len(tensors) != len(items):
        return [float(v.detach().float()) if isinstance(v, torch.Tensor) else float(v) for v in items]
    if not tensors:
        return []
    return torch.stack([t.to(tensors[0].device) for t in tensors]).tolist()


@dataclass
class EpochMeter:
    """Running sums of the epoch in progress (saved in checkpoints so a resumed epoch reports the same losses)."""

    loss_sum: float = 0.0
    samples: float = 0.0
    time: float = 0.0
    steps: int = 0
    #: named loss -> [sum of value x samples, samples of the steps that returned it]
    parts: dict[str, list[float]] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "samples": self.samples,
            "time": self.time,
            "steps": self.steps,
            "losses": {name: {"sum": s, "samples": n} for name, (s, n) in self.parts.items()},
        }

    def load(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.samples = float(state["loss_sum"]), float(state["samples"])
        self.time, self.steps = float(state["time"]), int(state["steps"])
        self.parts = {k: [float(v["sum"]), float(v["samples"])] for k, v in (state.get("losses") or {}).items()}

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")

    @property
    def losses(self) -> dict[str, float]:
        """Epoch means of the named losses so far."""
        return {name: s / n if n else float("nan") for name, (s, n) in self.parts.items()}

    @property
    def rate(self) -> float:
        return self.samples / self.time if self.time > 0 else 0.0


class LossNames:
    """The named losses seen so far, in the order they were first returned (the same on every process)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names: list[str] = list(names)

    def sums(self, losses: dict[str, Any], samples: float) -> list[float]:
        """``[value x samples, samples]`` per named loss seen so far (0, 0 where this step has none): reduced with the
        total in the step's one collective, so every rank must return the same names in the same order."""
        for name in losses:
            if name not in self.names:
                self.names.append(name)
        values = dict(zip(losses, _floats(losses.values()), strict=True))
        sums: list[float] = []
        for name in self.names:
            value = values.get(name)
            if value is None:
                sums += [0.0, 0.0]
            else:
                sums += [value * samples if math.isfinite(value) else 0.0, samples]
        return sums

    def add(self, meter: EpochMeter, sums: Sequence[float]) -> dict[str, float]:
        """Add a step's reduced named-loss sums to ``meter``; return the step's (global) mean of each."""
        step: dict[str, float] = {}
        for i, name in enumerate(self.names):
            total, samples = sums[2 * i], sums[2 * i + 1]
            if samples > 0:
                part = meter.parts.setdefault(name, [0.0, 0.0])
                part[0] += total
                part[1] += samples
                step[name] = total / samples
        return step
