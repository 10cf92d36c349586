"""Small helpers below every other layer: safe checkpoint reading, atomic file writing, model unwrapping, subsets.

Nothing here imports another part of rapidnet except :mod:`rapidnet.errors`, so ``config``, ``data``, ``engine``,
``models``, ``tasks`` and ``deploy`` can all use it.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from rapidnet.errors import CheckpointError, ConfigError

__all__ = ["atomic_write", "jsonable", "read_checkpoint", "subset_indices", "unwrap_model"]


# ---- files ---------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> tuple[Any, dict[str, str]]:
    """Load a checkpoint file safely; returns ``(object, safetensors_metadata)``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}: check the path")
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder: pass the file inside it (e.g. last.pt or model.safetensors)"
        )
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the file was not written completely")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.suffix == ".safetensors" or (len(head) > 9 and head[8:9] == b"{"):
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} holds Python objects that safe loading refuses (they could run code): "
                "re-save just the state_dict with torch.save(model.state_dict(), ...)"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({detail}): is it truncated?") from None
    except Exception as e:  # a cut file fails in many ways: zip, unpickler (KeyError), EOF, ...
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({detail[:120]}): re-download or re-export it"
        ) from None
    return obj, {}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:  # safetensors raises its own SafetensorError / OSError types
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is truncated or not a safetensors file ({detail[:120]})") from None
    return tensors, metadata


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a half-written file behind."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # some writers create 0600 temp files: give the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}): choose a writable output path") from None
    return path


# ---- models and data -----------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP (``module``) and ``torch.compile`` (``_orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def subset_indices(length: int, limit: int | None, seed: int = 0) -> list[int]:
    """A fixed random subset of ``limit`` indices (sorted), the same in training, ``eval`` and calibration.

    Random rather than the first ``limit`` because folder data sets are sorted by class; ``None`` or 0 means all.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"subset size must be 0 (all) or positive, got {limit}")
    if not limit or limit >= length:
        return list(range(length))
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(length, generator=generator)[:limit].tolist())


def jsonable(value: Any) -> Any:
    """Tuples to lists, recursively: the form in which builder arguments are stored with weights (JSON/YAML)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value
