"""The benchmark's eager PyTorch backends: nothing to export, the model runs as a module.

``torch`` runs the model as given (the bench hands it RapidNet folded, the form every exporter takes); ``torch-cl``
feeds a channels_last input to a channels_last copy, the layout oneDNN is fastest in. The fast CPU form in
PyTorch is ``torch-compile`` (:mod:`rapidnet.deploy.inductor`). ``cuda`` runs the plain folded model
on the GPU in fp16 autocast, channels_last, and waits for the GPU at the end of every call so the timing covers
the work rather than its launch.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from rapidnet.deploy.common import Runtime
from rapidnet.errors import ConfigError


def _no_int8(runtime: Runtime, int8: bool) -> None:
    if int8:
        raise ConfigError(f"{runtime.title} has no int8 quantizer here: choose one of the runtimes that has")


class EagerTorch(Runtime):
    """Eager PyTorch on the CPU, NCHW input, the model as given."""

    name = "torch"
    title = "PyTorch eager"
    channels_last: ClassVar[bool] = False

    def model_for(self, model: nn.Module) -> nn.Module:
        """The module this backend times: the model as given, or a copy where the layout changes (the caller's
        model is never changed)."""
        return copy.deepcopy(model) if self.channels_last else model

    def bench_runner(
        self, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool = False
    ) -> Callable[[], Any]:
        _no_int8(self, int8)
        model = self.model_for(model)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)

        def run() -> Any:
            with torch.inference_mode():
                return model(x)

        return run


class EagerTorchChannelsLast(EagerTorch):
    """Eager PyTorch on the CPU with a channels_last model copy and a channels_last input."""

    name = "torch-cl"
    title = "PyTorch eager (channels_last)"
    channels_last = True


class EagerCuda(Runtime):
    """Eager PyTorch on the GPU: the plain folded model (a copy), channels_last, fp16 autocast."""

    name = "cuda"
    title = "PyTorch CUDA (fp16 autocast)"
    device = "cuda"

    def available(self) -> bool:
        return torch.cuda.is_available()

    def bench_runner(
        self, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool = False
    ) -> Callable[[], Any]:
        _no_int8(self, int8)
        if not torch.cuda.is_available():
            raise ConfigError("the cuda backend needs a CUDA GPU and a CUDA build of PyTorch: none is available here")
        model = copy.deepcopy(model).cuda().to(memory_format=torch.channels_last)
        x = x.cuda().contiguous(memory_format=torch.channels_last)

        def run() -> Any:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
                out = model(x)
            torch.cuda.synchronize()
            return out

        return run
