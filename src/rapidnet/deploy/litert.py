"""LiteRT (the runtime formerly called TensorFlow Lite): ``.tflite`` files converted from the fused model by
litert-torch, run by ai-edge-litert's interpreter (XNNPACK CPU kernels), int8 through ai-edge-quantizer.

The input is NCHW float32 like every other format (litert-torch puts the transpose to NHWC inside the graph) and the
outputs come in the model's order. The dilated 3x3 convolutions of the MLDC blocks stay native ``CONV_2D`` ops with
their dilation factors (no ``SPACE_TO_BATCH_ND`` detour). A file has one batch size: litert-torch cannot convert the
model with a symbolic batch, and resizing a fixed-batch file's input runs but computes garbage, so the runner only
ever feeds the batch the file was made for (:class:`~rapidnet.deploy.common.Runner` splits and pads).

The metadata JSON is a flatbuffer ``Metadata`` entry named ``rapidnet`` inside the file (the TFLite schema's slot for
it, which the interpreter ignores), so a ``.tflite`` needs no sidecar. The int8 file has float32 input and output
(``QUANTIZE``/``DEQUANTIZE`` at the ends) so it takes the same preprocessed arrays as the fp32 one.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rapidnet.deploy.common import (
    METADATA_KEY,
    Runner,
    Runtime,
    check_batch,
    check_resolution,
    check_writable,
    decode_metadata,
    metadata_json,
    native_stderr_to_devnull,
    one_line,
    prepare_model,
    quiet_logs,
    replace_into,
    require,
)
from rapidnet.deploy.xnnpack import for_xnnpack
from rapidnet.errors import CheckpointError, ConfigError, DataError

FILE_IDENTIFIER = b"TFL3"  # bytes 4..8 of every TFLite flatbuffer
_LOGGERS = ("litert_torch", "ai_edge_quantizer", "absl", "torch.export", "torch._dynamo", "torch.fx")
_PROGRESS_ENV = "LITERT_TORCH_SHOW_PROGRESS"


# ---- quiet conversion ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold litert-torch's progress tree (stdout), the converter's and interpreter's native log lines (stderr),
    the quantizer's progress bars and report, and the warnings of all three, unless logging is at DEBUG."""
    if logging.getLogger().getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    before = os.environ.get(_PROGRESS_ENV)
    os.environ[_PROGRESS_ENV] = "n"  # litert-torch reads it at every step
    try:
        with (
            warnings.catch_warnings(),
            quiet_logs(_LOGGERS),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
            native_stderr_to_devnull(),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        if before is None:
            os.environ.pop(_PROGRESS_ENV, None)
        else:
            os.environ[_PROGRESS_ENV] = before


# ---- the file and its metadata -------------------------------------------------------------------------------------


def _read_tflite(path: str | os.PathLike, what: str = "LiteRT model", header_only: bool = False) -> bytes:
    """The bytes of a ``.tflite`` file (its first 8 with ``header_only``); a missing file or one that is not a TFLite
    flatbuffer is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}: check the path")
    try:
        with path.open("rb") as f:
            content = f.read(8 if header_only else -1)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or e}): check its permissions") from None
    if content[4:8] != FILE_IDENTIFIER:
        raise CheckpointError(f"{path} is not a LiteRT model (no TFLite flatbuffer identifier): give a .tflite file")
    return content


def _metadata_bytes(content: bytes, path: str | os.PathLike) -> bytes | None:
    """The bytes of the ``rapidnet`` metadata entry of a TFLite flatbuffer (``None`` when it has none)."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(content, 0)
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            if entry.Name() != METADATA_KEY.encode():
                continue
            buffer = model.Buffers(entry.Buffer())
            if buffer.Offset():  # stored after the flatbuffer (how large models keep their buffers)
                return bytes(content[buffer.Offset() : buffer.Offset() + buffer.Size()])
            return buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
    except Exception as e:  # a truncated or corrupt flatbuffer fails anywhere in the generated accessors
        raise CheckpointError(f"{path} is not a readable LiteRT model ({one_line(e)[:120]}): re-export it") from None
    return None


def with_metadata(content: bytes, metadata: str | bytes) -> bytes:
    """``content`` (a TFLite flatbuffer) with ``metadata`` as its ``rapidnet`` entry, added or replaced.

    The flatbuffer is unpacked and packed again with ai-edge-litert's own schema classes (what its
    ``flatbuffer_utils`` and the TFLite metadata writers do); buffers stored after the flatbuffer are pulled inline,
    which is fine below the format's 2 GB limit.
    """
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    data = np.frombuffer(metadata.encode() if isinstance(metadata, str) else metadata, np.uint8)
    model = flatbuffer_utils.read_model_from_bytearray(content)
    model.metadata = list(model.metadata or [])
    names = [m.name.decode() if isinstance(m.name, bytes) else m.name for m in model.metadata]
    if METADATA_KEY in names:
        model.buffers[model.metadata[names.index(METADATA_KEY)].buffer].data = data
    else:
        buffer = schema.BufferT()
        buffer.data = data
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = METADATA_KEY, len(model.buffers) - 1
        model.metadata.append(entry)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


# ---- running -------------------------------------------------------------------------------------------------------


def _default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def interpreter(path: str | os.PathLike, threads: int | None = None) -> Any:
    """ai-edge-litert's ``Interpreter`` for ``path`` with ``threads`` CPU threads (default: one per usable core),
    tensors allocated; the XNNPACK delegate is applied by default."""
    require("ai_edge_litert", "running LiteRT files", "litert")
    from ai_edge_litert.interpreter import Interpreter

    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    _read_tflite(path, header_only=True)
    try:
        with _quiet():
            interp = Interpreter(model_path=str(path), num_threads=threads or _default_threads())
            interp.allocate_tensors()
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable LiteRT model ({one_line(e)[:120]}): re-export it") from None
    return interp


def _output_order(names: Sequence[str]) -> list[str]:
    """litert-torch names a signature's outputs ``output_0``, ``output_1``, ...: put them in that order."""
    if names and all(re.fullmatch(r"output_\d+", n) for n in names):
        return sorted(names, key=lambda n: int(n.rsplit("_", 1)[1]))
    return list(names)


def _run_function(interp: Any, path: Path) -> tuple[Any, tuple[int, ...], bool]:
    """``run(x) -> outputs``, the input shape, and whether the batch is fixed, for the file's first signature (or
    its main graph when it has none)."""
    signatures = interp.get_signature_list()
    if signatures:
        key = next(iter(signatures))
        runner = interp.get_signature_runner(key)
        (input_name, details), *more = runner.get_input_details().items()
        outputs = _output_order(list(runner.get_output_details()))

        def call(x: np.ndarray) -> list[np.ndarray]:
            result = runner(**{input_name: x})
            return [result[n] for n in outputs]

    else:
        details, *more = interp.get_input_details()
        indices = [d["index"] for d in interp.get_output_details()]

        def call(x: np.ndarray) -> list[np.ndarray]:
            interp.set_tensor(details["index"], x)
            interp.invoke()
            return [interp.get_tensor(i) for i in indices]

    if more:
        raise ConfigError(f"{path} has {len(more) + 1} inputs: rapidnet runs image models with one input")
    if details["dtype"] != np.float32:
        raise ConfigError(f"{path} takes {np.dtype(details['dtype']).name} input: rapidnet feeds float32 images")
    shape = tuple(int(s) for s in details["shape"])
    signature = details.get("shape_signature")
    fixed = not (signature is not None and len(signature) and int(signature[0]) == -1)
    return call, shape, fixed


# ---- the runtime ---------------------------------------------------------------------------------------------------


class LiteRT(Runtime):
    name = "litert"
    title = "LiteRT"
    suffix = ".tflite"
    packages = ("litert_torch", "ai_edge_litert")
    extra = "litert"
    fixed_batch = True  # litert-torch cannot convert a symbolic batch; resizing a fixed file's input is wrong
    quantizer = "ai-edge-quantizer (static int8)"
    quantize_options = frozenset({"per_channel"})

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
        """Write the fused ``model`` as a ``.tflite`` for ``batch_size`` images with the metadata inside.

        ``litert_torch.convert`` of the plain folded graph (``torch.export``, then litert-torch's lowering and the
        LiteRT converter passes). LiteRT's CPU kernels are XNNPACK's, so the graph first gets the same rewrite as
        for ExecuTorch (:func:`rapidnet.deploy.xnnpack.for_xnnpack`: 7x7 depthwise convs as strips XNNPACK has
        kernels for): fp32 runs as fast either way, and the int8 file made from it ran 1.5x faster
        (``docs/performance.md``).
        """
        require("litert_torch", "LiteRT export", self.extra)
        if dynamic_batch:
            raise ConfigError(
                "LiteRT files have a fixed batch size (litert-torch cannot convert a symbolic one): drop "
                "--dynamic-batch; other batch sizes are run in chunks of the exported one"
            )
        h, w = check_resolution(resolution)
        check_batch(batch_size)
        path = check_writable(self.check_suffix(path))
        fused = prepare_model(model)
        text = metadata_json(fused, (h, w), metadata)
        fused = for_xnnpack(fused)
        with _quiet(), torch.no_grad():
            import litert_torch  # its import logs through absl and torch to stderr

            try:
                content = litert_torch.convert(fused, (torch.zeros(batch_size, 3, h, w),)).model_content()
            except Exception as e:  # the converter fails on ops it cannot lower, with pages of MLIR
                raise ConfigError(f"litert-torch cannot convert this model ({one_line(e)[:200]})") from None
            content = with_metadata(content, text)
        return replace_into(path, lambda tmp: tmp.write_bytes(content))

    def load(self, path: str | os.PathLike, threads: int | None = None) -> Runner:
        path = Path(path)
        interp = interpreter(path, threads)
        call, shape, fixed = _run_function(interp, path)

        def run(x: np.ndarray) -> list[np.ndarray]:
            if x.shape[1:] != shape[1:] or (fixed and x.shape[0] != shape[0]):
                raise ConfigError(f"{path} takes input {list(shape)}, got {list(x.shape)}")
            return call(x)

        return Runner(path, self.name, shape[0] if fixed else None, run, self.read_metadata(path))

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        require("ai_edge_litert", "reading LiteRT files", self.extra)
        return decode_metadata(_metadata_bytes(_read_tflite(path), path), path)

    def quantize(
        self,
        model: nn.Module | None,
        fp32_path: Path,
        int8_path: Path,
        calibration: Sequence[np.ndarray],
        per_channel: bool = True,
        **_: Any,
    ) -> Path:
        """Static int8 of the fp32 ``.tflite`` with ai-edge-quantizer: weights int8 symmetric (per output channel by
        default), activations int8 per tensor (asymmetric, min/max over ``calibration``), every op the quantizer
        supports (convolutions, GELU, additions, mean, the classifier). Input and output stay float32.

        ``calibration`` batches may have any batch size: they are regrouped into the file's, the last group filled
        up with images from the start (repeats, not zeros, so no range is stretched).
        """
        require("ai_edge_quantizer", "LiteRT int8 quantization", self.extra)
        from ai_edge_quantizer import quantizer

        int8_path = check_writable(self.check_suffix(int8_path, "int8 output"))
        content = _read_tflite(fp32_path, "fp32 LiteRT model")
        interp = interpreter(fp32_path, 1)
        signatures = interp.get_signature_list()
        if not signatures:
            raise ConfigError(f"{fp32_path} has no signature: quantize a .tflite written by rapidnet export")
        key = next(iter(signatures))
        (input_name, details), *more = interp.get_signature_runner(key).get_input_details().items()
        if more:
            raise ConfigError(f"{fp32_path} has {len(more) + 1} inputs: rapidnet quantizes image models with one input")
        shape = tuple(int(s) for s in details["shape"])
        samples = _calibration_batches(calibration, shape, fp32_path)

        recipe = _recipe(per_channel)
        with _quiet():
            try:
                q = quantizer.Quantizer(content, recipe)
                ranges = q.calibrate({key: [{input_name: s} for s in samples]}, num_threads=_default_threads())
                quantized = bytes(q.quantize(ranges, enable_progress_report=False).quantized_model)
            except (ValueError, RuntimeError) as e:
                raise ConfigError(f"ai-edge-quantizer cannot quantize {fp32_path} ({one_line(e)[:200]})") from None
            meta = _metadata_bytes(content, fp32_path)
            if meta is not None and _metadata_bytes(quantized, int8_path) != meta:
                quantized = with_metadata(quantized, meta)
        return replace_into(int8_path, lambda tmp: tmp.write_bytes(quantized))

    def quantization_facts(self, per_channel: bool = True, **_: Any) -> dict[str, Any]:
        from importlib.metadata import version

        return {
            "runtime": f"ai-edge-litert {version('ai-edge-litert')}, ai-edge-quantizer {version('ai-edge-quantizer')}",
            "format": "TFLite int8 (float32 input and output)",
            "weights": "int8 " + ("per-channel" if per_channel else "per-tensor") + " symmetric",
            "activations": "int8 per-tensor asymmetric",
            "quantizer": "ai-edge-quantizer static_wi8_ai8",
            "method": "minmax",
        }


def _recipe(per_channel: bool) -> list[dict[str, Any]]:
    """ai-edge-quantizer's ``static_wi8_ai8`` recipe (every supported op), with the model's input and output left
    float32 so that callers feed the same arrays as to the fp32 file, and GELU left float between a dequantize and a
    quantize: XNNPACK has no int8 GELU, so each int8 one split the delegated graph (56 partitions for RapidNet-Ti,
    21 with float GELUs), while LiteRT's int8 GELU is a table of the same float function, so the outputs are equal
    to the bit and the file runs faster (``docs/performance.md``)."""
    from ai_edge_quantizer import qtyping, recipe_manager
    from ai_edge_quantizer.algorithm_manager import AlgorithmName

    granularity = qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
    manager = recipe_manager.RecipeManager()
    manager.add_static_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 8, 8, weight_granularity=granularity)
    for op in (qtyping.TFLOperationName.INPUT, qtyping.TFLOperationName.OUTPUT, qtyping.TFLOperationName.GELU):
        manager.add_quantization_config(".*", op, algorithm_key=AlgorithmName.NO_QUANTIZE)
    return manager.get_quantization_recipe()


def _calibration_batches(calibration: Sequence[np.ndarray], shape: tuple[int, ...], path: Path) -> list[np.ndarray]:
    """The calibration images regrouped into batches of the file's input ``shape``."""
    arrays = [np.asarray(b.numpy() if isinstance(b, torch.Tensor) else b, np.float32) for b in calibration]
    arrays = [a[None] if a.ndim == len(shape) - 1 else a for a in arrays]
    for a in arrays:
        if a.shape[1:] != shape[1:]:
            raise ConfigError(f"calibration images are {list(a.shape[1:])} but {path} takes {list(shape[1:])}")
    if not arrays or sum(len(a) for a in arrays) == 0:
        raise DataError("calibration produced no images: check the calibration data")
    images = np.concatenate(arrays)
    batch = shape[0]
    if len(images) % batch:
        images = np.concatenate([images, np.resize(images, (batch - len(images) % batch, *images.shape[1:]))])
    return [np.ascontiguousarray(images[i : i + batch]) for i in range(0, len(images), batch)]
