"""The contract between the generic training engine and a task (classification, detection, segmentation).

The engine owns everything that is the same for every task: processes and devices, AMP, channels_last,
torch.compile, DDP, EMA, optimizer and schedule, the loop, checkpoints, resume, signals, logs, progress and how all
of it is shown. A task owns what differs: data, model, loss, metrics and what "the best weights" are exported as;
it states facts (``summary``, ``metric_names``), the engine words and prints them. A new task subclasses
:class:`Task` and implements the abstract methods; ``Trainer(task, cfg).fit()`` does the rest.

The engine calls, in order: ``setup(ctx)``, ``build_model()``, ``check_state(...)`` (resuming),
``build_loaders()``, ``steps_per_epoch()``, ``build_optimizer(model, lr)``, ``summary()``; per epoch
``train_batches(epoch, start_step)`` and ``train_step(model, batch)`` per batch, ``evaluate(model)``,
``epoch_stats()``; ``state()``/``metadata(model)`` with every checkpoint, ``export(model, path)`` for new best
weights; ``finish()`` at the end; then, when the task names a ``report_split``, ``evaluate_report(model)`` for the best
and for the final weights.

Selection and reporting: ``evaluate`` scores the split that chooses the best epoch (``eval_split``, "val" unless the
task says otherwise). A task that keeps a split apart for reporting (the dense tasks select on a dev split) sets
``report_split``; the engine then scores it once, after a completed run, for the best and the final weights, so the
figure reported was never used to choose the weights.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2
from torch import nn

from rapidnet.config import Config
from rapidnet.engine.distributed import DistInfo
from rapidnet.errors import ConfigError
from rapidnet.utils import atomic_write, unwrap_model

#: timm optimizer names whose torch class has a fused (single-kernel) step on CPU and CUDA
FUSED_OPTIMIZERS = ("adam", "adamw", "sgd")

__all__ = ["RunContext", "StepOutput", "Task"]


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU (no scaler needed), float16 on CUDA (with GradScaler)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """The engine's mixed precision on ``device``; a no-op context without ``amp``."""
    if not amp:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=amp_dtype(device))


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
        return amp_dtype(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forward passes (a no-op context without ``--amp``)."""
        return autocast(self.device, self.amp)

    def images_to_device(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch of images to the device, in the memory format the model was put in."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return images


@dataclass
class StepOutput:
    """Result of one training forward pass: the loss to minimise, how many samples it covers, and its parts.

    ``losses`` names the terms worth watching (e.g. torchvision's ``loss_classifier``, ``loss_box_reg``...): the
    engine logs each one's mean beside ``loss`` (``steps.jsonl``, ``log.jsonl`` as ``train_<name>``, progress bar,
    TensorBoard) but only ever backpropagates ``loss``. A name not starting with ``loss_`` is logged as
    ``loss_<name>``. Under DDP every process must return the same names in the same order.
    """

    loss: torch.Tensor
    num_samples: int
    losses: dict[str, torch.Tensor] = field(default_factory=dict)


class Task(ABC):
    """Everything task-specific the engine calls (see the module docstring for the order)."""

    #: key of ``evaluate``'s result that decides which epoch is ``best``
    primary_metric: str = "top1"
    higher_is_better: bool = True
    #: ``evaluate`` key -> display name, for the metrics the per-epoch line shows (in this order); empty: all of them
    #: under their keys. Every metric is logged either way. A metric ``K`` with an interval ``K_ci`` shows it.
    metric_names: dict[str, str] = {}
    #: the split ``evaluate`` scores (set by ``setup`` at the latest): the prefix of its metrics in ``log.jsonl``
    #: (``val_top1``, ``dev_bbox_AP``) and in the epoch line
    eval_split: str = "val"
    #: the split ``evaluate_report`` scores after the run, for the best and the final weights (None: no report)
    report_split: str | None = None

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
        """The network to train, on CPU, with what its loss needs (e.g. a teacher); the engine moves and wraps it.

        Only the model: the data pipelines come from :meth:`build_loaders`, which the engine calls next.
        """

    def build_loaders(self) -> None:
        """Build the training and validation pipelines (after ``build_model``, whose eval transform they may use):
        what ``steps_per_epoch``, ``train_batches`` and ``evaluate`` read."""
        return None

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """Samples per step on this process (the engine scales the learning rate by the global batch)."""

    def build_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """timm's optimizer factory from ``cfg.optim``; 1-D parameters (norms, biases, layer scales) get no decay.

        A task that trains parts of the model at different rates returns groups from ``param_groups``.
        """

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
    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Metrics of ``model`` (in eval mode) on ``eval_split``, identical on every process (reduce across
        processes). Values are numbers, or ``[low, high]`` intervals under ``<metric>_ci``."""

    def evaluate_report(self, model: nn.Module) -> dict[str, Any]:
        """Metrics of ``model`` on ``report_split`` (called on every process, after a completed run, when the task
        names one); like ``evaluate``'s."""
        raise NotImplementedError(f"{type(self).__name__} names report_split but has no evaluate_report")

    # ---- bookkeeping --------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Facts about the run the engine prints at its start, one line per key (``"key: value"``): a value may be
        a mapping (shown ``"k v, k v"``), a list, a number or a string; None leaves the line out."""
        return {}

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
        """Write the weights users deploy (called with the best model) atomically; return the path.

        Default: safetensors of the (unwrapped) model's state dict with :meth:`metadata`.
        """

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in unwrap_model(model).state_dict().items()}
        meta = self.metadata(model)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def epoch_stats(self) -> dict[str, Any]:
        """Extra fields for this epoch's log record."""
        return {}

    def finish(self) -> list[str]:
        """Warnings for the end of a run, each a complete sentence (e.g. how many unreadable files were skipped)."""
        return []
