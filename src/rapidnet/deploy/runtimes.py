"""The runtimes a fused RapidNet is deployed to, behind one call: load a file, run a batch, get numpy outputs.

onnxruntime (``.onnx``), OpenVINO's CPU plugin (``.xml`` IR + ``.bin``) and ExecuTorch with XNNPACK (``.pte``) each
get a session constructor and a runner here, and :func:`load_runner` picks one by the file's suffix, so export
verification, the int8 accuracy check and the benchmark all run a file the same way. Thread counts are set per
runtime (onnxruntime and OpenVINO per session, ExecuTorch through its process-wide XNNPACK thread pool).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rapidnet.errors import CheckpointError, ConfigError

_logger = logging.getLogger("rapidnet")


@contextlib.contextmanager
def quiet_logs(
    names: Sequence[str] = ("onnx_ir", "onnxscript", "onnxruntime", "torch.onnx", "torch.export", "coremltools"),
) -> Any:
    """Hold the exporters' and quantizer's INFO chatter (hundreds of lines per model) unless logging is at DEBUG."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:  # coremltools warns about things it handles itself (e.g. flattening tuple outputs)
        lg.setLevel(logging.ERROR if lg.name == "coremltools" else logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def require(module: str, purpose: str) -> None:
    """A one-line ConfigError naming the install command when an optional deploy dependency is missing."""

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{purpose} needs the {module} package: pip install 'rapidnet[deploy]'")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# ---- onnxruntime ---------------------------------------------------------------------------------------------------


def ort_session(
    path: str | os.PathLike,
    threads: int | None = None,
    providers: Sequence[str] | None = None,
    config_entries: Mapping[str, str] | None = None,
) -> Any:
    """An onnxruntime ``InferenceSession`` with full graph optimisation and ``threads`` intra-op threads.

    ``threads=None`` lets onnxruntime choose (one per physical core). Inter-op parallelism is off (sequential
    execution), so ``threads`` is the whole thread budget, which is what a latency measurement needs to state.
    """
    require("onnxruntime", "running ONNX models")
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ONNX model not found: {path}: check the path")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads must be at least 1, got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    for key, value in (config_entries or {}).items():
        options.add_session_config_entry(key, value)
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
        raise CheckpointError(f"onnxruntime cannot load {path} ({one_line(e)[:160]})") from None


def run_ort(session: Any, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    """Run a single-input session on a batch; returns all outputs in graph order."""
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(arr, dtype=np.float32)})


# ---- OpenVINO ------------------------------------------------------------------------------------------------------


def import_openvino() -> Any:
    require("openvino", "OpenVINO export")
    import openvino as ov

    return ov


def openvino_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """OpenVINO's CPU plugin compiled for ``path`` (``.xml``) at float32 precision with ``threads`` threads."""
    ov = import_openvino()
    path = Path(path)
    if not path.is_file() or not path.with_suffix(".bin").is_file():
        raise CheckpointError(f"OpenVINO model not found: {path} (and {path.stem}.bin beside it): check the path")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}  # bf16 on AMX CPUs otherwise: 1e-2 off
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    try:
        return ov.Core().compile_model(str(path), "CPU", config)
    except RuntimeError as e:
        raise CheckpointError(f"OpenVINO cannot load {path} ({one_line(e)[:160]})") from None


def run_openvino(compiled: Any, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
    arr = x.numpy() if isinstance(x, torch.Tensor) else x
    result = compiled(np.ascontiguousarray(arr, dtype=np.float32))
    return [np.asarray(result[port]) for port in compiled.outputs]


# ---- ExecuTorch ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _native_stderr_to_devnull() -> Any:
    """Hold native libraries' stderr chatter (ExecuTorch's cpuinfo probes print a line per file they try)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def executorch_method(path: str | os.PathLike) -> Any:
    """The ``forward`` method of a ``.pte`` program, loaded through ExecuTorch's Python runtime."""
    require("executorch", "running ExecuTorch programs")
    from executorch.runtime import Runtime

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"ExecuTorch program not found: {path}: check the path")
    try:
        with _native_stderr_to_devnull():
            method = Runtime.get().load_program(str(path)).load_method("forward")
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"ExecuTorch cannot load {path} ({one_line(e)[:160]})") from None
    return method


def run_executorch(method: Any, x: torch.Tensor) -> list[np.ndarray]:
    with _native_stderr_to_devnull():
        outputs = method.execute([x.contiguous()])
    return [o.detach().numpy() for o in outputs]


def executorch_threads(threads: int | None = None) -> int:
    """The size of ExecuTorch's XNNPACK thread pool (one per process; one thread per core by default).

    The pool is not resized: ExecuTorch's only way to do it (``_unsafe_reset_threadpool``) replaced a pool that other
    native code in the process still used, and the interpreter crashed minutes later (seen in this project's test
    suite). A request for another size is logged, and the return value says what ExecuTorch really runs with.
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    require("executorch", "running ExecuTorch programs")
    from executorch.extension.pybindings import portable_lib

    with _native_stderr_to_devnull():
        current = int(portable_lib._threadpool_get_thread_count())
    if threads is not None and threads != current:
        _logger.warning("ExecuTorch runs on its process-wide pool of %d threads here, not %d", current, threads)
    return current


# ---- one call for every runtime ------------------------------------------------------------------------------------

RUNTIME_SUFFIXES: dict[str, str] = {".onnx": "onnxruntime", ".xml": "openvino", ".pte": "executorch"}


@dataclass
class Runner:
    """A loaded model file: ``runner(batch)`` returns its outputs as numpy arrays, in graph order.

    ``fixed_batch`` is the batch size the file was exported for (``None``: any). A fixed-batch file is run chunk by
    chunk, the last chunk padded, so callers can hand any batch to any runtime.
    """

    path: Path
    runtime: str
    fixed_batch: int | None
    run: Callable[[np.ndarray], list[np.ndarray]]

    def __call__(self, x: np.ndarray | torch.Tensor) -> list[np.ndarray]:
        arr = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        step = self.fixed_batch
        if step is None or len(arr) == step:
            return self.run(arr)
        chunks: list[list[np.ndarray]] = []
        for start in range(0, len(arr), step):
            part = arr[start : start + step]
            pad = step - len(part)
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
            chunks.append([o[: step - pad] for o in self.run(part)])
        return [np.concatenate(outs) for outs in zip(*chunks, strict=True)]


def runtime_for(path: str | os.PathLike) -> str:
    """The runtime that runs a model file, from its suffix (one-line error for anything else)."""
    suffix = Path(path).suffix.lower()
    if suffix not in RUNTIME_SUFFIXES:
        known = ", ".join(f"{s} ({r})" for s, r in RUNTIME_SUFFIXES.items())
        raise ConfigError(f"cannot tell which runtime runs {path}: give one of {known}")
    return RUNTIME_SUFFIXES[suffix]


def load_runner(
    path: str | os.PathLike, threads: int | None = None, config_entries: Mapping[str, str] | None = None
) -> Runner:
    """Load ``.onnx`` (onnxruntime), ``.xml`` (OpenVINO CPU) or ``.pte`` (ExecuTorch XNNPACK) for ``threads``.

    ``config_entries`` are onnxruntime session options (e.g. no spin-waiting for accuracy runs on a shared CPU).
    """
    path = Path(path)
    runtime = runtime_for(path)
    if runtime == "onnxruntime":
        session = ort_session(path, threads, config_entries=config_entries)
        dim = session.get_inputs()[0].shape[0]
        return Runner(path, runtime, dim if isinstance(dim, int) and dim > 0 else None, lambda x: run_ort(session, x))
    if runtime == "openvino":
        compiled = openvino_session(path, threads)
        batch = compiled.inputs[0].get_partial_shape()[0]
        fixed = batch.get_length() if batch.is_static else None
        return Runner(path, runtime, fixed, lambda x: run_openvino(compiled, x))
    executorch_threads(threads)
    method = executorch_method(path)
    fixed = int(method.metadata.input_tensor_meta(0).sizes()[0])
    return Runner(path, runtime, fixed, lambda x: run_executorch(method, torch.from_numpy(x)))
