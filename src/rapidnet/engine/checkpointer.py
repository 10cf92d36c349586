"""A fit's ``last.pt``: what goes into it, writing it, and restoring a run from it (``--resume``).

The state is the trainer's (weights, optimizer, schedule, scaler, position, the epoch's running sums, RNG states,
config, thread count, time budget, a pending evaluation) plus whatever callbacks add in ``on_save_checkpoint``; a
resume refuses a checkpoint of another model or recipe and restores all of it, so that the following losses equal
an uninterrupted run's. The file layout and its reading are :mod:`rapidnet.engine.checkpoint`'s.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from rapidnet.config import Config, config_from_dict, config_to_dict
from rapidnet.engine.checkpoint import (
    capture_rng,
    check_resume_config,
    load_training_state,
    restore_rng,
    save_training_state,
)
from rapidnet.engine.distributed import barrier
from rapidnet.engine.hooks import TrainerAPI
from rapidnet.errors import CheckpointError

__all__ = ["MAY_DIFFER_ON_RESUME", "nonfinite_message", "read_resume_state", "restore", "save_last", "training_state"]

#: config keys a resumed run may change: they affect where and how fast it runs, not what it computes
MAY_DIFFER_ON_RESUME = (
    "train.output",
    "train.device",
    "train.compile",
    "train.trim_padding_taps",
    "train.adapt_threads",
    "train.log_interval",
    "train.epochs",
    "train.time_budget",
    "data.workers",
    "data.pin_memory",
    "data.eval_batch_size",
    "data.skip_corrupt",
)


def read_resume_state(path: Path, cfg: Config, world_size: int, say: Any) -> dict[str, Any]:
    """The state to resume from, refused (one line) when it was written for another model or recipe; notes on the
    settings that changed and on another process count (whose losses then differ)."""
    state = load_training_state(path)
    # through the current schema, so settings added since the checkpoint was written compare as their defaults
    saved = config_to_dict(config_from_dict(state["config"], source=f"the config stored in {path}"))
    for change in check_resume_config(path, saved, config_to_dict(cfg), MAY_DIFFER_ON_RESUME):
        say(f"note: resuming with a changed setting: {change}")
    saved_world = int(state.get("world_size", 1))
    if saved_world != world_size:
        say(
            f"note: {path} was written by {saved_world} process(es), this run has {world_size}: "
            "the global batch and the learning rate change, so losses will differ from an uninterrupted run"
        )
    return state


def training_state(trainer: TrainerAPI) -> dict[str, Any]:
    """Everything a resume needs, then the callbacks' additions (``on_save_checkpoint``)."""
    pending = trainer.pending
    state: dict[str, Any] = {
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "epoch": trainer.epoch,
        "step": trainer.step,
        "updates": trainer.updates,
        "meter": trainer.meter.state(),
        "rng": capture_rng(),
        "config": config_to_dict(trainer.cfg),
        "task": trainer.task.state(),
        "world_size": trainer.info.world_size,
        "threads": torch.get_num_threads(),  # a resume takes the same count: the same float rounding
        "budget": trainer.budget.state() if trainer.budget is not None else None,
        "rapidnet": trainer.task.metadata(trainer.model),
        # the epoch's steps are done but its evaluation is not: a resume evaluates first (and logs the epoch)
        "pending_eval": {"lr": pending["lr"]} if pending and pending["evaluate"] else None,
    }
    for callback in trainer.callbacks:
        callback.on_save_checkpoint(trainer, state)
    return state


def save_last(trainer: TrainerAPI) -> Path:
    """Write ``last.pt`` (rank 0), then wait for it so no process runs ahead of a half-written checkpoint."""
    path = trainer.last_path
    if trainer.info.is_main:
        save_training_state(path, training_state(trainer))
    barrier(trainer.info)
    return path


def restore(trainer: TrainerAPI, state: dict[str, Any]) -> None:
    """Put a built trainer where ``state`` left off (weights, optimizer, schedule, position, sums, callbacks, RNG)."""
    path = trainer.resume
    try:
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(
            f"{path} does not fit this model/optimizer ({first}): resume with the config it was trained with"
        ) from None
    if int(state["config"]["train"]["epochs"]) == trainer.cfg.train.epochs:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.step, trainer.updates = int(state["epoch"]), int(state["step"]), int(state["updates"])
    # timm schedules are functions of (epoch, update): setting them here gives the uninterrupted run's lr, and
    # the new schedule's when --epochs was changed
    trainer.scheduler.step(trainer.epoch)
    trainer.scheduler.step_update(num_updates=trainer.updates)
    trainer.meter.load(state["meter"])
    pending = state.get("pending_eval")
    trainer.pending = {"lr": float(pending["lr"]), "evaluate": True} if pending else None
    for callback in trainer.callbacks:
        callback.on_load_checkpoint(trainer, state)
    restore_rng(state["rng"])
    where = f"epoch {trainer.epoch + 1}, step {trainer.step}"
    if trainer.pending is not None:
        where = f"the evaluation of epoch {trainer.epoch}"
    trainer.say(f"resumed from {path}: {where} (optimizer update {trainer.updates})")


def nonfinite_message(last: Path, epoch: int, step: int, update: int, value: float) -> str:
    """The one line for a NaN/inf loss at (0-based) ``epoch``, ``step``: the run stopped before applying it."""
    kept = f"{last} (epoch {_saved_position(last)}) is kept" if last.exists() else "no checkpoint was written yet"
    return (
        f"loss is {'nan' if math.isnan(value) else value} at epoch {epoch + 1}, step {step} "
        f"(optimizer update {update}): training stopped before applying it; {kept}; "
        "try a lower --lr, --clip-grad 1.0, or no --amp"
    )


def _saved_position(path: Path) -> str:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return f"{int(state['epoch'])}, step {int(state['step'])}" if state["step"] else str(int(state["epoch"]))
    except Exception:
        return "?"
