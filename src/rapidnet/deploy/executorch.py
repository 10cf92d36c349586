"""ExecuTorch with the XNNPACK delegate: ``.pte`` programs, the CPU kernels ExecuTorch runs on Android and iOS;
int8 through PyTorch 2 export quantization (pt2e) with ExecuTorch's ``XNNPACKQuantizer``.

The graph first gets :func:`rapidnet.deploy.xnnpack.for_xnnpack` (depthwise convs larger than XNNPACK's 5x5 tile
as strips it runs natively; outputs equal to float rounding). A ``.pte`` plans its memory for the shapes it was
exported with, so the batch size is fixed; ``.pte`` files have no metadata slot, so the metadata JSON is a sidecar
``<file>.pte.json``.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rapidnet.deploy.common import (
    Runner,
    Runtime,
    check_batch,
    check_resolution,
    check_writable,
    metadata_json,
    native_stderr_to_devnull,
    one_line,
    prepare_model,
    quiet_logs,
    replace_into,
    require,
    sidecar_path,
    write_sidecar,
)
from rapidnet.deploy.xnnpack import for_xnnpack
from rapidnet.errors import CheckpointError, ConfigError, DataError

_logger = logging.getLogger("rapidnet")


def _lowering() -> tuple[Any, Any]:
    require("executorch", "ExecuTorch export")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower, XnnpackPartitioner


def _check_output(path: str | os.PathLike, what: str = "output") -> Path:
    path = Path(path)
    if path.suffix != ".pte":
        raise ConfigError(f"ExecuTorch {what} {path} must end in .pte")
    return check_writable(path)


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    batch_size: int = 1,
    xnnpack_rewrites: bool = True,
    metadata: str | None = None,
) -> Path:
    """Write the fused ``model`` as an XNNPACK-delegated ``.pte``: ``torch.export`` of the plain folded graph
    (contiguous weights, as the lowering needs), ``to_edge_transform_and_lower`` with the XNNPACK partitioner,
    ``to_executorch``; the metadata JSON beside it."""
    _lowering()  # a missing package is a one-line error before any work
    h, w = check_resolution(resolution)
    check_batch(batch_size)
    path = _check_output(path)
    fused = prepare_model(model)
    meta = metadata_json(fused, (h, w), metadata)
    if xnnpack_rewrites:
        fused = for_xnnpack(fused)
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(fused, (torch.zeros(batch_size, 3, h, w),))
    save_executorch(program, path)
    write_sidecar(path, meta)
    return path


def save_executorch(program: Any, path: Path) -> Path:
    """Lower an exported program to XNNPACK (``to_edge_transform_and_lower``) and write the ``.pte`` atomically."""
    to_edge_transform_and_lower, partitioner = _lowering()
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        buffer = to_edge_transform_and_lower(program, partitioner=[partitioner()]).to_executorch().buffer
    return replace_into(path, lambda tmp: tmp.write_bytes(buffer))


def executorch_method(path: str | os.PathLike) -> Any:
    """The ``forward`` method of a ``.pte`` program, loaded through ExecuTorch's Python runtime."""
    require("executorch", "running ExecuTorch programs")
    from executorch.runtime import Runtime as ETRuntime

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ExecuTorch program not found: {path}: check the path")
    try:
        with native_stderr_to_devnull():
            method = ETRuntime.get().load_program(str(path)).load_method("forward")
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"ExecuTorch cannot load {path} ({one_line(e)[:160]})") from None
    return method


def run_executorch(method: Any, x: torch.Tensor) -> list[np.ndarray]:
    with native_stderr_to_devnull():
        outputs = method.execute([x.contiguous()])
    return [o.detach().numpy() for o in outputs]


def executorch_threads(threads: int | None = None) -> int:
    """The size of ExecuTorch's XNNPACK thread pool (one per process; one thread per core by default).

    The pool is not resized: ExecuTorch's only way to do it (``_unsafe_reset_threadpool``) replaced a pool that other
    native code in the process still used, and the interpreter crashed minutes later. A request for another size is
    logged, and the return value says what ExecuTorch really runs with.
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    require("executorch", "running ExecuTorch programs")
    from executorch.extension.pybindings import portable_lib

    with native_stderr_to_devnull():
        current = int(portable_lib._threadpool_get_thread_count())
    if threads is not None and threads != current:
        _logger.warning("ExecuTorch runs on its process-wide pool of %d threads here, not %d", current, threads)
    return current


def quantize_executorch(
    model: nn.Module,
    int8_path: str | os.PathLike,
    calibration: Iterable[torch.Tensor | np.ndarray],
    resolution: Sequence[int] = (224, 224),
    batch_size: int = 1,
    per_channel: bool = True,
    xnnpack_rewrites: bool = True,
    metadata: str | None = None,
) -> Path:
    """pt2e static int8 quantization with ExecuTorch's ``XNNPACKQuantizer``, lowered to an XNNPACK ``.pte``.

    ``torch.export`` of the fused model, ``prepare_pt2e`` (observers where XNNPACK has int8 kernels: convolutions,
    linear layers, additions), calibration on ``calibration`` batches split into ``batch_size`` images,
    ``convert_pt2e``, then the same lowering as the fp32 export. Weights are int8 symmetric (per channel by default),
    activations int8 per tensor.
    """
    require("executorch", "ExecuTorch int8 quantization")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    h, w = check_resolution(resolution)
    int8_path = _check_output(int8_path, "int8 output")
    fused = prepare_model(model)
    meta = metadata_json(fused, (h, w), metadata)
    if xnnpack_rewrites:
        fused = for_xnnpack(fused)
    example = (torch.zeros(batch_size, 3, h, w),)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    seen = 0
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export(fused, example).module(), quantizer)
        for batch in calibration:
            batch = torch.as_tensor(batch)
            for start in range(0, len(batch), batch_size):
                part = batch[start : start + batch_size]
                if len(part) == batch_size:
                    prepared(part)
                    seen += len(part)
        if seen == 0:
            raise DataError("calibration produced no images: check the calibration data")
        converted = convert_pt2e(prepared)
        program = torch.export.export(converted, example)
    save_executorch(program, int8_path)
    write_sidecar(int8_path, meta)
    return int8_path


class ExecuTorch(Runtime):
    name = "executorch"
    title = "ExecuTorch (XNNPACK)"
    suffix = ".pte"
    packages = ("executorch",)
    fixed_batch = True
    quantizer = "pt2e XNNPACKQuantizer (static)"
    quantize_options = frozenset({"per_channel"})

    def files(self, path: str | os.PathLike) -> list[Path]:
        return [Path(path), sidecar_path(path)]

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
        if dynamic_batch:
            raise ConfigError(
                "--dynamic-batch: an ExecuTorch program is exported for one batch size: export one per size"
            )
        return export_executorch(model, path, resolution, batch_size, metadata=metadata)

    def load(self, path: str | os.PathLike, threads: int | None = None) -> Runner:
        executorch_threads(threads)
        method = executorch_method(path)
        fixed = int(method.metadata.input_tensor_meta(0).sizes()[0])
        run = lambda x: run_executorch(method, torch.from_numpy(x))  # noqa: E731
        return Runner(Path(path), self.name, fixed, run, self.read_metadata(path))

    def input_shape(self, path: str | os.PathLike) -> list[Any]:
        return [int(d) for d in executorch_method(path).metadata.input_tensor_meta(0).sizes()]

    def bench_setup(self, threads: int) -> dict[str, Any]:
        return {"executorch_threads": executorch_threads(threads)}

    def quantize(
        self,
        model: nn.Module | None,
        fp32_path: Path,
        int8_path: Path,
        calibration: Sequence[np.ndarray],
        per_channel: bool = True,
        **_: Any,
    ) -> Path:
        if model is None:
            raise ConfigError(f"ExecuTorch int8 starts from the checkpoint, not from {fp32_path}: pass --checkpoint C")
        batch, _, h, w = self.input_shape(fp32_path)  # the int8 program takes what the fp32 one takes
        meta = self.read_metadata(fp32_path)
        return quantize_executorch(
            model, int8_path, calibration, (h, w), batch, per_channel, metadata=json.dumps(meta) if meta else None
        )

    def quantization_facts(self, per_channel: bool = True, **_: Any) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "runtime": f"executorch {version('executorch')}",
            "format": "pt2e QDQ lowered to XNNPACK",
            "weights": ("int8 per-channel" if per_channel else "int8 per-tensor") + " symmetric",
            "activations": "int8 per-tensor asymmetric",
            "quantizer": "XNNPACKQuantizer (static)",
            "method": "minmax",
        }
