"""The contract between the generic training engine and a task (classification, detection, segmentation).

The engine owns everything that is the same for every task: processes and devices, AMP, channels_last,
torch.compile, DDP, EMA, optimizer and schedule, the loop, checkpoints, resume, signals, logs and progress. A task
owns what differs: data, model, loss, metrics and what "the best weights" are exported as. A new task subclasses
:class:`Task` and implements the abstract methods; ``Trainer(task, cfg).fit()`` does the rest.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rapidnet.config import Config
from rapidnet.engine.distributed import DistInfo
from rapidnet.errors import ConfigError

#: timm optimizer names whose torch class has a fused (single-kernel) step on CPU and CUDA
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")

__all__ = ["RunContext", "StepOutput", "Task"]


@dataclass
class RunContext:
    """What a task needs to know about the run it is part of (set up by the engine before ``Task.setup``)."""

    cfg: Config
    dist: DistInfo
    output: Path
    amp: bool = False
    channels_last: bool = False

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    @property
    def amp_dtype(self) -> torch.dtype:
        """bfloat16 on CPU (no scaler needed), float16 on CUDA (with GradScaler)."""
        return torch.float16 if self.device.type == "cuda" else torch.bfloat16

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (a no-op context without ``--amp``)."""
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch of images to the device, in the memory format the model was put in."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


@dataclass
class StepOutput:
    """Result of one training forward pass: the loss to minimise and how many samples it covers."""

    loss: torch.Tensor
    num_samples: int


class Task(ABC):
    """Everything task-specific the engine calls, in order: setup, build_model, then per epoch train/evaluate."""

    #: key of ``evaluate``'s result that decides which epoch is ``best``
    primary_metric: str = "top1"
    higher_is_better: bool = True

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.ctx: RunContext | None = None

    @property
    def context(self) -> RunContext:
        if self.ctx is None:
            raise RuntimeError("Task.setup(ctx) has not been called")
        return self.ctx

    # ---- building -----------------------------------------------------------------------------------------------

    def setup(self, ctx: RunContext) -> None:
        """Open data sets and check them (so bad data fails before the model is built). Override and call super."""
        self.ctx = ctx

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The network to train, on CPU; the engine moves and wraps it. Transforms may be finished here too."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Samples per step on this process (the engine scales the learning rate by the global batch)."""

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """timm's optimizer factory from ``cfg.optim``; 1-D parameters (norms, biases, layer scales) get no decay.

        A task that trains parts of the model at different rates returns groups from ``param_groups``.
        """
        from timm.optim import create_optimizer_v2

        o = self.cfg.optim
        kwargs: dict[str, Any] = {"eps": o.eps} if o.opt.lower() in ("adamw", "adam", "lamb", "nadamw") else {}
        if o.betas is not None:
            kwargs["betas"] = tuple(o.betas)
        if o.fused:
            if o.opt.lower() not in FUSED_OPTIMIZERS:
                raise ConfigError(f"optim.fused needs one of {', '.join(FUSED_OPTIMIZERS)}, not {o.opt!r}: drop fused")
            kwargs["fused"] = True
        groups = self.param_groups(model, lr)
        if groups is not None:
            kwargs["param_group_fn"] = lambda _: groups
        try:
            return create_optimizer_v2(
                model, opt=o.opt, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, **kwargs
            )
        except (ValueError, AssertionError, KeyError) as e:
            raise ConfigError(f"cannot build optimizer {o.opt!r} ({e}): see timm.optim.list_optimizers()") from None

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer parameter groups, or None for timm's default (one rate, no decay on 1-D parameters).

        A group's ``lr_scale`` multiplies the scheduled learning rate (timm's schedulers apply it every update).
        """
        return None

    # ---- running ------------------------------------------------------------------------------------------------

    @abstractmethod
    def steps_per_epoch(self) -> int:
        """Training steps in one epoch on this process (the same on every process)."""

    @abstractmethod
    def train_batches(self, epoch: int, start_step: int) -> Iterable[Any]:
        """The batches of ``epoch`` from ``start_step`` on, reproducibly (see ``rapidnet.engine.seeding``)."""

    @abstractmethod
    def train_step(self, model: nn.Module, batch: Any) -> StepOutput | None:
        """Forward pass and loss for one batch (the engine runs it under autocast and does the backward pass).

        Return None to skip a batch that holds nothing usable (e.g. all images unreadable, when skipping them).
        """

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics of ``model`` (in eval mode), identical on every process (reduce across processes)."""

    # ---- bookkeeping --------------------------------------------------------------------------------------------

    def format_metrics(self, metrics: dict[str, float]) -> str:
        """Short text of ``evaluate``'s result for the per-epoch line."""
        return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())

    def describe(self) -> list[str]:
        """Lines printed at the start of a run (data sizes, recipe)."""
        return []

    def state(self) -> dict[str, Any]:
        """What must match when resuming (e.g. class names); stored in training checkpoints."""
        return {}

    def check_state(self, saved: dict[str, Any], path: str) -> None:
        """Raise :class:`~rapidnet.errors.CheckpointError` when a checkpoint's task state does not fit this run."""
        return None

    def metadata(self, model: nn.Module) -> dict[str, str]:
        """String metadata stored with weights (read back by ``rapidnet eval``/``predict``)."""
        return {}

    def export(self, model: nn.Module, path: Path) -> Path:
        """Write the weights users deploy (called with the best model) atomically; return the path."""
        from rapidnet.models import save_weights

        return save_weights(model, path, self.metadata(model))

    def epoch_stats(self) -> dict[str, Any]:
        """Extra fields for this epoch's log record."""
        return {}

    def finish(self) -> list[str]:
        """Notes printed at the end of a run (e.g. how many unreadable files were skipped)."""
        return []
