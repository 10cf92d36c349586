"""Deployment: one module per runtime behind one registry, and the verbs that use them.

Runtimes (:mod:`rapidnet.deploy.registry` maps one name and one file suffix to each): ``onnx`` (ONNX Runtime),
``openvino``, ``executorch`` (XNNPACK), ``litert`` (.tflite), ``coreml``, ``torchscript``, ``aoti`` (AOTInductor
.pt2), and the benchmark's eager backends ``torch``, ``torch-cl``, ``torch-compile`` and ``cuda``. Each module holds
what its runtime needs: export, load-and-run, int8 through the runtime's own quantizer, graph rewrites, bench backend.
The verbs are :func:`export` (file + check against PyTorch), :func:`quantize_model` (int8 + accuracy check),
:func:`load_runner` (run any exported file) and :mod:`rapidnet.deploy.bench`.

:func:`compile_for_cpu` (``rapidnet.deploy.inductor``) is the fast form for CPU inference in this process: the
folded model compiled by Inductor with frozen weights. Exports never take it; they take :func:`prepare_model`.
"""

from __future__ import annotations

import os

from rapidnet.deploy import registry
from rapidnet.deploy.common import (
    Check,
    Runner,
    Runtime,
    compare_outputs,
    eval_transform,
    export_metadata,
    prepare_model,
    preprocess_config,
)
from rapidnet.deploy.exporter import ExportResult, export, sample_inputs, verify_file
from rapidnet.deploy.inductor import compile_for_cpu
from rapidnet.deploy.quantize import (
    Agreement,
    QuantizeReport,
    calibration_dataset,
    compare_accuracy,
    numpy_batches,
    quantize_model,
)


def load_runner(path: str | os.PathLike, threads: int | None = None) -> Runner:
    """Load any exported file (its runtime from the suffix) to run numpy batches: ``runner(x) -> [outputs]``."""
    return registry.for_path(path).load(path, threads)


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata JSON an exported file carries (preprocessing, outputs, class names; ``{}`` if none)."""
    return registry.for_path(path).read_metadata(path)


__all__ = [
    "Agreement",
    "Check",
    "ExportResult",
    "QuantizeReport",
    "Runner",
    "Runtime",
    "calibration_dataset",
    "compare_accuracy",
    "compare_outputs",
    "compile_for_cpu",
    "eval_transform",
    "export",
    "export_metadata",
    "load_runner",
    "numpy_batches",
    "prepare_model",
    "preprocess_config",
    "quantize_model",
    "read_metadata",
    "registry",
    "sample_inputs",
    "verify_file",
]
