"""The learning-rate schedule of a run: timm's, from the ``sched`` section, stepped per epoch and per update.

Built again when a time budget fixes the epoch count mid-run, so that the schedule fits the epochs that will run.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.scheduler import create_scheduler_v2

from rapidnet.config import Config
from rapidnet.errors import ConfigError

__all__ = ["build_scheduler"]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, steps: int) -> Any:
    """timm's scheduler for ``cfg.train.epochs`` epochs of ``steps`` updates; a one-line ConfigError otherwise."""
    s = cfg.sched
    epochs = cfg.train.epochs
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=s.name,
            num_epochs=epochs,
            warmup_epochs=s.warmup_epochs,
            warmup_lr=s.warmup_lr,
            min_lr=s.min_lr,
            cooldown_epochs=s.cooldown_epochs,
            decay_milestones=[m if m >= 0 else epochs + m for m in s.decay_milestones],
            decay_rate=s.decay_rate,
            step_on_epochs=s.step_on_epochs,
            updates_per_epoch=steps,
        )
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"cannot build schedule {s.name!r} ({e}): use e.g. sched.name cosine") from None
    if scheduler is None:
        raise ConfigError(f"unknown schedule {s.name!r}: use cosine, step, multistep, plateau, poly or tanh")
    return scheduler
