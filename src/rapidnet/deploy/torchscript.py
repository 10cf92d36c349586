"""TorchScript: a traced ``.pt`` of the fused model, loadable with ``torch.jit.load`` from Python or C++ (LibTorch).

The graph has no data-dependent control flow, so tracing is exact; convolutions generalise over batch size, so the
traced file takes any batch. The metadata JSON is the extra file ``rapidnet``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rapidnet.deploy.common import (
    METADATA_KEY,
    Runner,
    Runtime,
    check_resolution,
    check_writable,
    decode_metadata,
    metadata_json,
    one_line,
    prepare_model,
    replace_into,
)
from rapidnet.errors import CheckpointError


def trace(model: nn.Module, resolution: Sequence[int] = (224, 224)) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the fused model."""
    h, w = check_resolution(resolution)
    fused = prepare_model(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(fused, torch.zeros(1, 3, h, w), strict=False, check_trace=False)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    metadata: str | Mapping[str, Any] | None = None,
) -> Path:
    """Write a traced TorchScript file of the fused model with its metadata as the extra file ``rapidnet``."""
    h, w = check_resolution(resolution)
    path = check_writable(path)
    fused = prepare_model(model)
    traced = trace(fused, (h, w))
    extra = {METADATA_KEY: metadata_json(fused, (h, w), metadata)}

    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, str(tmp), _extra_files=extra)

    return replace_into(path, save)


def load_torchscript(path: str | os.PathLike) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """The scripted module and its metadata; a file that is not TorchScript is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"TorchScript file not found: {path}: check the path")
    extra = {METADATA_KEY: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still the C++ route
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} is not a TorchScript file ({one_line(e)[:120]})") from None
    return module, decode_metadata(extra[METADATA_KEY], path)


class TorchScript(Runtime):
    name = "torchscript"
    title = "TorchScript"
    suffix = ".pt"

    def export(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        resolution: Sequence[int],
        *,
        batch_size: int = 1,
        dynamic_batch: bool = False,
        metadata: str | None = None,
    ) -> Path:
        return export_torchscript(model, path, resolution, metadata)

    def load(self, path: str | os.PathLike, threads: int | None = None) -> Runner:
        """Runs in this process's torch (``threads`` sets torch's process-wide intra-op thread count)."""
        module, meta = load_torchscript(path)
        if threads is not None:
            torch.set_num_threads(threads)

        def run(x: Any) -> list[Any]:
            with torch.inference_mode():
                out = module(torch.from_numpy(x))
            return [o.numpy() for o in (out if isinstance(out, (list, tuple)) else [out])]

        return Runner(Path(path), self.name, None, run, meta)

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        return load_torchscript(path)[1]
