"""ONNX Runtime: ``.onnx`` files through PyTorch's ``torch.export``-based exporter, run by onnxruntime's CPU provider,
int8 through onnxruntime's static QDQ quantizer.

Quantization keeps GELU and the residual additions in float by default (only Conv, Gemm and MatMul are quantized),
which keeps onnxruntime's GELU fusion intact. On an x86 CPU without VNNI the weights keep to 7 bits
(``reduce_range``), as onnxruntime advises: its AVX2 kernels saturate on full-range ones.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rapidnet.constants import DEFAULT_OPSET
from rapidnet.deploy.common import (
    INPUT_NAME,
    METADATA_KEY,
    QUANTIZE_OPTIONS,
    Runner,
    Runtime,
    check_batch,
    check_resolution,
    check_writable,
    decode_metadata,
    metadata_json,
    one_line,
    output_names,
    prepare_model,
    quiet_logs,
    rebatch,
    replace_into,
    require,
)
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.utils import cpu_int8_saturates

QUANTIZED_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")


# ---- export --------------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: str | Mapping[str, Any] | None = None,
    batch_size: int = 1,
) -> Path:
    """Write the fused ``model`` as a single-file ONNX model with input ``input`` (N, 3, H, W) float32.

    Uses the ``torch.export``-based exporter (PyTorch's default since 2.9; offline, through onnxscript) with its
    graph optimiser: the result is plain Conv/Gemm/Erf arithmetic with no Constant/Identity clutter. With
    ``dynamic_batch`` the batch dimension is symbolic (``batch``); otherwise it is fixed at ``batch_size``. Any
    timm model exports too (fused where it has ``reparameterize`` methods), e.g. the benchmark's peers.
    """
    h, w = check_resolution(resolution)
    require("onnxscript", "ONNX export (PyTorch's exporter)")
    if opset < 17:
        raise ConfigError(f"ONNX opset {opset} is too old: use 17 or newer")
    check_batch(batch_size)
    path = check_writable(path)
    fused = prepare_model(model)
    names = output_names(fused)
    example = torch.zeros(2 if dynamic_batch else batch_size, 3, h, w)
    kwargs: dict[str, Any] = {}
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_logs():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            fused,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=names,
            optimize=True,
            verbose=False,
            **kwargs,
        )
    proto = program.model_proto
    proto.producer_name = "rapidnet"
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata_json(fused, (h, w), metadata)

    def save(tmp: Path) -> None:
        import onnx

        onnx.save_model(proto, str(tmp))

    return replace_into(path, save)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`export_onnx` wrote into an ONNX file (``{}`` for ONNX files from elsewhere); a value
    that is not a JSON object is a one-line :class:`CheckpointError`."""
    require("onnx", "reading ONNX files")
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable ONNX model ({one_line(e)[:120]})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    return decode_metadata(props.get(METADATA_KEY), path)


def check_external_data(path: Path, proto: Any) -> None:
    """Refuse ONNX external-data locations that would read outside the model's folder (``../``, absolute paths,
    symbolic links) or do not exist, before onnxruntime's tools follow them."""
    import onnx

    folder = path.resolve().parent
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = folder / location
        unsafe = not location or Path(location).is_absolute() or ".." in Path(location).parts or target.is_symlink()
        if unsafe or not target.resolve().is_relative_to(folder):
            raise CheckpointError(
                f"{path}: tensor {tensor.name!r} points its external data at {location!r}, outside the model's "
                "folder: keep external data files beside the .onnx (no '..', absolute paths or links)"
            )
        if not target.is_file():
            raise CheckpointError(
                f"{path}: external data file {location!r} of tensor {tensor.name!r} is missing: put it beside the model"
            )


def onnx_interface(path: Path) -> tuple[str, list[Any], list[list[Any]]]:
    """Input name and shape, and output shapes, of an ONNX file (read without building a session)."""
    require("onnx", "reading ONNX files")
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable ONNX model ({one_line(e)[:120]})") from None

    def dims(value: Any) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

    check_external_data(path, proto)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(f"{path} has {len(inputs)} inputs: expected an image model with one input")
    return inputs[0].name, dims(inputs[0]), [dims(o) for o in proto.graph.output]


# ---- running -------------------------------------------------------------------------------------------------------


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


# ---- int8 ----------------------------------------------------------------------------------------------------------


class ArrayCalibrationReader:
    """onnxruntime's ``CalibrationDataReader`` over ready-made input batches: one array per call.

    Not a subclass in code: that base class counts any class with ``get_next`` as its subclass, and importing it here
    would import onnxruntime's quantization tools (and onnx) with every ``import rapidnet.deploy``, ``predict``'s too.
    """

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = INPUT_NAME) -> None:
        self.batches, self.input_name = list(batches), input_name
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self.batches):
            return None
        batch = np.ascontiguousarray(self.batches[self._next], dtype=np.float32)
        self._next += 1
        self.seen += len(batch)
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._next, self.seen = 0, 0


def quantize_onnx(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    reader: Any | Sequence[np.ndarray],
    per_channel: bool = True,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    op_types: Sequence[str] | None = QUANTIZED_OPS,
    reduce_range: bool | None = None,
) -> Path:
    """``quantize_static`` in QDQ format (int8 weights, per channel by default) after onnxruntime's pre-processing.

    ``reader`` is a ``CalibrationDataReader`` or a sequence of input batches. ``op_types=None`` quantizes every op
    onnxruntime can; the default keeps GELU and residual adds in float. ``reduce_range`` (7-bit weights) defaults to
    whether this CPU's int8 kernels saturate (x86 without VNNI).
    """
    require("onnxruntime", "int8 quantization")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibrate_method not in CALIBRATION_METHODS:
        raise ConfigError(f"unknown calibration method {calibrate_method!r}: choose {', '.join(CALIBRATION_METHODS)}")
    activations = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}.get(activation_type)
    if activations is None:
        raise ConfigError(f"activation type must be 'uint8' or 'int8', got {activation_type!r}")
    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[calibrate_method]
    int8_path = check_writable(int8_path)
    if not hasattr(reader, "get_next"):
        reader = ArrayCalibrationReader(reader, onnx_interface(Path(fp32_path))[0])
    with tempfile.TemporaryDirectory(prefix="rapidnet-quant-") as tmp, quiet_logs():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))  # shape inference + graph clean-up, as onnxruntime advises

        def save(target: Path) -> None:
            quantize_static(
                str(prepared),
                str(target),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=activations,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                op_types_to_quantize=list(op_types) if op_types else None,
                reduce_range=cpu_int8_saturates() if reduce_range is None else reduce_range,
            )

        replace_into(int8_path, save)
    if getattr(reader, "seen", 1) == 0:
        raise DataError("calibration produced no images: check the calibration data")
    return int8_path


# ---- the runtime ---------------------------------------------------------------------------------------------------


class OnnxRuntime(Runtime):
    name = "onnx"
    title = "ONNX Runtime"
    suffix = ".onnx"
    packages = ("onnx", "onnxscript", "onnxruntime")
    quantizer = "onnxruntime quantize_static (QDQ)"
    quantize_options = frozenset(QUANTIZE_OPTIONS) - {"preset"}
    # no spin-waiting in the benchmark: idle workers would steal the cores of the next (interleaved) contestant
    bench_load_options: ClassVar[dict[str, Any]] = {"spin": False}
    export_options: ClassVar[frozenset[str]] = frozenset({"opset"})

    def export(
        self,
        model: nn.Module,
        path: str | os.PathLike,
        resolution: Sequence[int],
        *,
        batch_size: int = 1,
        dynamic_batch: bool = False,
        metadata: str | None = None,
        opset: int = DEFAULT_OPSET,
    ) -> Path:
        return export_onnx(model, path, resolution, dynamic_batch, opset, metadata, batch_size)

    def load(self, path: str | os.PathLike, threads: int | None = None, spin: bool = True) -> Runner:
        """``spin=False`` stops idle workers busy-waiting: for accuracy runs beside other work on a shared CPU."""
        entries = None if spin else {"session.intra_op.allow_spinning": "0"}
        session = ort_session(path, threads, config_entries=entries)
        dim = session.get_inputs()[0].shape[0]
        fixed = dim if isinstance(dim, int) and dim > 0 else None
        feed_name = session.get_inputs()[0].name
        return Runner(Path(path), self.name, fixed, lambda x: session.run(None, {feed_name: x}), read_metadata(path))

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        return read_metadata(path)

    def input_shape(self, path: str | os.PathLike) -> list[Any]:
        return onnx_interface(Path(path))[1]

    def quantize(
        self,
        model: nn.Module | None,
        fp32_path: Path,
        int8_path: Path,
        calibration: Sequence[np.ndarray],
        per_channel: bool = True,
        activation_type: str = "uint8",
        calibrate_method: str = "minmax",
        op_types: Sequence[str] | None = QUANTIZED_OPS,
        reduce_range: bool | None = None,
        **_: Any,
    ) -> Path:
        # one image a batch, or the file's fixed batch; dynamic-batch files calibrate on batches of up to 8
        dim = onnx_interface(Path(fp32_path))[1][0]
        batches = rebatch(calibration, dim if isinstance(dim, int) and dim > 0 else 8)
        return quantize_onnx(
            fp32_path, int8_path, batches, per_channel, activation_type, calibrate_method, op_types, reduce_range
        )

    def quantization_facts(
        self,
        per_channel: bool = True,
        activation_type: str = "uint8",
        calibrate_method: str = "minmax",
        op_types: Sequence[str] | None = QUANTIZED_OPS,
        reduce_range: bool | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        import onnxruntime

        return {
            "runtime": f"onnxruntime {onnxruntime.__version__}",
            "format": "QDQ",
            "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
            "reduce_range": bool(cpu_int8_saturates() if reduce_range is None else reduce_range),
            "activations": activation_type,
            "ops": list(op_types) if op_types else "all",
            "method": calibrate_method,
        }

    def matmul_probe(self, b: np.ndarray, threads: int, workdir: Path) -> tuple[str, Any]:
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        n = b.shape[0]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "b"], ["y"])],
            "matmul",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(b, "b")],
        )
        path = workdir / "matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = ort_session(path, threads, config_entries={"session.intra_op.allow_spinning": "0"})
        return f"onnxruntime {onnxruntime.__version__} MatMul (MLAS)", lambda x: session.run(None, {"x": x})
