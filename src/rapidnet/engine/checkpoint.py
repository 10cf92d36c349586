"""Training-state checkpoints (``last.pt``, ``best.pt``): everything needed to continue a run exactly.

A state is a plain dict of tensors and Python primitives so that it loads with ``torch.load(weights_only=True)``:
model and EMA weights, optimizer, scheduler and GradScaler states, position (epoch, step, optimizer updates), the
running epoch statistics, the best result so far, RNG states of python/numpy/torch (numpy's as a tensor, since
``weights_only`` refuses numpy arrays) and the resolved config. Files are written to a temporary name and renamed,
so a crash or Ctrl-C during a save never leaves a truncated ``last.pt``.

The model weights sit under ``model`` / ``model_ema`` and architecture metadata under ``rapidnet``, the layout
``rapidnet.load_model`` reads, so ``rapidnet eval``/``predict``/``convert`` accept a training checkpoint directly.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rapidnet.config import config_diff
from rapidnet.errors import CheckpointError, clip
from rapidnet.utils import atomic_write, read_checkpoint

__all__ = [
    "TRAIN_STATE_FORMAT",
    "capture_rng",
    "check_resume_config",
    "copy_checkpoint",
    "load_training_state",
    "restore_rng",
    "save_training_state",
]

TRAIN_STATE_FORMAT = "rapidnet-train-state"
TRAIN_STATE_VERSION = 1


def capture_rng() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and every CUDA device) as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng` (CUDA states only when the same number of devices is visible)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_training_state(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Write a training state atomically (temporary file + rename)."""
    payload = {"format": TRAIN_STATE_FORMAT, "version": TRAIN_STATE_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def copy_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy a checkpoint file atomically (``best.pt`` from the ``last.pt`` just written)."""
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state written by :func:`save_training_state` (``weights_only=True``); one-line errors otherwise."""
    obj, _ = read_checkpoint(path)
    if not isinstance(obj, Mapping) or obj.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(
            f"{path} holds model weights, not a training state to resume: pass a last.pt/best.pt written by "
            "`rapidnet train`, or start a new run from these weights with --set model.checkpoint=" + str(path)
        )
    version = obj.get("version")
    if version != TRAIN_STATE_VERSION:
        raise CheckpointError(
            f"{path} is a version {version} training state; this rapidnet reads version {TRAIN_STATE_VERSION}"
        )
    return dict(obj)


def check_resume_config(
    path: str | os.PathLike[str],
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    may_differ: Iterable[str],
) -> list[str]:
    """Refuse to resume with a different model or recipe; return the allowed differences (to report them).

    A run continued with another model, data set or schedule would neither fit the saved weights nor give the
    losses the interrupted run would have given, so such a resume is a one-line :class:`CheckpointError` naming the
    first differing keys. Keys in ``may_differ`` (output folder, workers, device...) only change where or how fast.
    """

    allowed = set(may_differ)
    diffs = config_diff(dict(saved), dict(current))
    bad = [d for d in diffs if d[0] not in allowed]
    if bad:
        shown = "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        what = "another model" if any(k.startswith("model.") for k, _, _ in bad) else "another config"
        raise CheckpointError(
            f"{path} is a checkpoint of {what} ({shown}{more}): resume with the config it was trained with, "
            "e.g. give only --resume (it reuses the checkpoint's config)"
        )
    return [f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diffs]


def _short(value: Any) -> str:
    return clip(repr(value))
