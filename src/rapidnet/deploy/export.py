"""Export the fused (reparameterized) RapidNet to ONNX, TorchScript, Core ML, OpenVINO IR and ExecuTorch (XNNPACK),
and check the result against PyTorch in that runtime.

Every export starts from :func:`rapidnet.reparameterize`: deployment never needs BatchNorm, layer scales or the
distillation head, and the fused graph is the one that is fast. The exported file is then run on a random input and
on a real photo (the bundled ankle boot through the model's eval transform), and its largest deviation from PyTorch
is reported: ONNX through onnxruntime, TorchScript through ``torch.jit.load``, OpenVINO IR through OpenVINO's CPU
plugin (fp32 inference precision), ``.pte`` through ExecuTorch's runtime with the XNNPACK delegate. Core ML packages
cannot be run off macOS, so there the saved package's spec (input and output names, shapes) is checked instead and
the result says so. Every exporter takes the plain folded graph (:func:`prepare_model`), never the eager-CPU pass.

Preprocessing (mean, std, resize, crop) is stored in each file's metadata so that tools like ``rapidnet quantize``
can feed an exported model correctly without the original checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from rapidnet.deploy.cpu import deoptimize_
from rapidnet.deploy.runtimes import (
    executorch_method,
    import_openvino,
    one_line,
    openvino_session,
    ort_session,
    quiet_logs,
    require,
    run_executorch,
    run_openvino,
    run_ort,
)
from rapidnet.deploy.xnnpack import for_xnnpack
from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.models import reparameterize
from rapidnet.models.checkpoint import is_features_model, model_metadata

FORMATS: dict[str, str] = {
    "onnx": ".onnx",
    "torchscript": ".pt",
    "coreml": ".mlpackage",
    "openvino": ".xml",
    "executorch": ".pte",
}
INPUT_NAME = "input"
MIN_RESOLUTION = 32  # five stride-2 convolutions: below 32 pixels the last stage has no spatial extent left
DEFAULT_OPSET = 20  # opset 20 has a native Gelu op: onnxruntime runs it fused (1.8x faster than the erf chain)
DEFAULT_TOLERANCE = 1e-4
SAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "sample_ankle_boot.png"
_PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
METADATA_KEY = "rapidnet"  # ONNX metadata_props / TorchScript extra file / Core ML user metadata key


# ---- inputs and checks ---------------------------------------------------------------------------------------------


def check_resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    """``(H, W)`` from one or two ints; the network downsamples 32x, so anything below 32 pixels is refused."""
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
    if len(res) != 2:
        raise ConfigError(f"resolution must be H W (two integers), got {list(res)}")
    if min(res) < MIN_RESOLUTION:
        raise ConfigError(
            f"resolution {res[0]}x{res[1]} is too small: RapidNet downsamples 32x, use at least "
            f"{MIN_RESOLUTION}x{MIN_RESOLUTION}"
        )
    return res  # type: ignore[return-value]


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, in one line, if ``path`` cannot be written, rather than after a minutes-long conversion."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}): choose a writable output path") from None
    if path.is_dir() and path.suffix != ".mlpackage":
        raise CheckpointError(f"cannot write {path}: it is a folder: give a file name")
    return path


def _replace_into(path: Path, save: Any) -> Path:
    """``save(tmp)`` then move it over ``path`` (file or package folder), so a failure never leaves half a model."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        save(tmp)
        _remove(path)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise CheckpointError(f"cannot write {path} ({e.strerror or e}): choose a writable output path") from None
    except BaseException:
        _remove(tmp)
        raise
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def output_names(model: nn.Module) -> list[str]:
    """``["logits"]`` for a classifier, ``["features_<stage>", ...]`` for a ``features_only`` backbone."""
    if is_features_model(model):
        return [f"features_{i}" for i in model.feature_info.out_indices]
    return ["logits"]


def preprocess_config(model: nn.Module, resolution: Sequence[int] | None = None) -> dict[str, Any]:
    """The eval preprocessing of ``model`` (timm's data config), at ``resolution`` when given."""

    cfg = dict(resolve_data_config(model=model))
    cfg = {k: cfg[k] for k in _PREPROCESS_KEYS if k in cfg}
    if resolution is not None:
        h, w = check_resolution(resolution)
        cfg["input_size"] = (3, h, w)
    return cfg


def eval_transform(config: Mapping[str, Any]) -> Any:
    """timm's eval transform (resize, centre crop, normalise) for a :func:`preprocess_config` dict."""

    return create_transform(**{k: config[k] for k in _PREPROCESS_KEYS if k in config}, is_training=False)


def sample_inputs(config: Mapping[str, Any], batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Two check inputs: seeded Gaussian noise of ``batch`` images, and the bundled photo through the eval transform."""

    _, h, w = config["input_size"]
    noise = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))
    image = eval_transform(config)(Image.open(SAMPLE_IMAGE).convert("RGB")).unsqueeze(0)
    return {"random": noise, "image": image}


def prepare_model(model: nn.Module) -> nn.Module:
    """The model to export: the plain folded graph as an fp32 eval copy on the CPU, with contiguous weights.

    The original stays trainable and untouched. A model that went through :func:`rapidnet.deploy.cpu.optimize` is
    turned back into the plain form too: exports never carry the eager-CPU modules or channels_last weights.
    """

    return deoptimize_(reparameterize(model)).float().cpu().eval()


def _torch_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.detach().cpu().numpy() for o in outs]


def export_metadata(model: nn.Module, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """JSON stored in the exported file: preprocessing, output names, the classifier's ``arch`` (the dict
    :func:`rapidnet.models.model_metadata` stores with weights; absent for a ``features_only`` backbone) and any
    ``extra`` fields."""
    meta: dict[str, Any] = {"preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    meta["outputs"] = output_names(model)
    if not is_features_model(model):
        meta["arch"] = model_metadata(model)
    meta.update(extra or {})
    return json.dumps(meta)


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
    try:
        meta = json.loads(props.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has unreadable {METADATA_KEY!r} metadata ({e.msg}): re-export it") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has unreadable {METADATA_KEY!r} metadata (not a JSON object): re-export it")
    return meta


# ---- exporters -----------------------------------------------------------------------------------------------------


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    dynamic_batch: bool = False,
    opset: int = DEFAULT_OPSET,
    metadata: Mapping[str, Any] | None = None,
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
    path = check_writable(path)
    fused = prepare_model(model)
    config = preprocess_config(fused, (h, w))
    names = output_names(fused)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
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
    entry.key, entry.value = METADATA_KEY, export_metadata(fused, config, metadata)

    def save(tmp: Path) -> None:
        import onnx

        onnx.save_model(proto, str(tmp))

    return _replace_into(path, save)


def trace(model: nn.Module, resolution: Sequence[int] = (224, 224)) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of the fused model (the graph has no data-dependent control flow, so tracing is exact)."""
    h, w = check_resolution(resolution)
    fused = prepare_model(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.trace(fused, torch.zeros(1, 3, h, w), strict=False, check_trace=False)


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write a traced TorchScript file of the fused model, loadable with ``torch.jit.load`` (C++ or Python).

    Convolutions generalise over batch size, so the traced model takes any batch; the preprocessing metadata is
    stored as the extra file ``rapidnet``.
    """
    h, w = check_resolution(resolution)
    path = check_writable(path)
    traced = trace(model, (h, w))
    fused = prepare_model(model)
    extra = {METADATA_KEY: export_metadata(fused, preprocess_config(fused, (h, w)), metadata)}

    def save(tmp: Path) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.jit.save(traced, str(tmp), _extra_files=extra)

    return _replace_into(path, save)


def _import_coremltools() -> Any:
    """Import coremltools without its Linux-only noise (missing native runtime, untested torch version)."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError as e:
        raise ConfigError(f"Core ML export needs coremltools ({one_line(e)}): pip install 'rapidnet[deploy]'") from None
    finally:
        ct_logger.setLevel(level)
    return ct


def export_coreml(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    fp16: bool = False,
    dynamic_batch: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Convert the traced fused model to a Core ML ML Program (``.mlpackage``, iOS 16 / macOS 13 or newer).

    Inputs and outputs stay float32 for the caller; ``fp16`` makes the computation half precision (what the Apple
    Neural Engine runs). With ``dynamic_batch`` the batch may range over 1..64.
    """
    ct = _import_coremltools()
    h, w = check_resolution(resolution)
    path = Path(path)
    if path.suffix != ".mlpackage":
        raise ConfigError(f"Core ML output {path} must end in .mlpackage")
    path = check_writable(path)
    fused = prepare_model(model)
    traced = trace(fused, (h, w))
    batch: Any = ct.RangeDim(1, 64, default=1) if dynamic_batch else 1
    inputs = [ct.TensorType(name=INPUT_NAME, shape=(batch, 3, h, w), dtype=np.float32)]
    outputs = [ct.TensorType(name=n, dtype=np.float32) for n in output_names(fused)]
    precision = ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), quiet_logs():
        warnings.simplefilter("ignore")
        mlmodel = ct.convert(
            traced,
            inputs=inputs,
            outputs=outputs,
            convert_to="mlprogram",
            compute_precision=precision,
            minimum_deployment_target=ct.target.iOS16,
        )
    config = preprocess_config(fused, (h, w))
    mlmodel.short_description = "RapidNet (reparameterized) exported by rapidnet"
    mlmodel.user_defined_metadata[METADATA_KEY] = export_metadata(fused, config, metadata)
    mlmodel.input_description[INPUT_NAME] = (
        f"float32 (N, 3, {h}, {w}) RGB scaled to [0, 1], then normalised with "
        f"mean {list(config['mean'])}, std {list(config['std'])}"
    )
    return _replace_into(path, lambda tmp: mlmodel.save(str(tmp)))


# ---- verification --------------------------------------------------------------------------------------------------


@dataclass
class Check:
    """How far an exported model's outputs are from PyTorch's on one input, over all outputs.

    ``max_rel_err`` is ``max |ours - ref| / (1 + |ref|)``: at most ``tol`` exactly when
    ``allclose(ours, ref, rtol=tol, atol=tol)`` holds, the project's tolerance convention (absolute for small
    values, relative for large ones, where float32 rounding alone exceeds any fixed absolute bound).
    """

    name: str
    max_abs_diff: float
    max_rel_err: float
    max_abs_ref: float
    input_shape: tuple[int, ...]

    def passed(self, tolerance: float) -> bool:
        return self.max_rel_err <= tolerance


def compare_outputs(
    name: str, ours: Sequence[np.ndarray], ref: Sequence[np.ndarray], input_shape: Sequence[int] = ()
) -> Check:
    """Compare output lists; a count or shape mismatch is an infinite difference, never a silent pass."""
    if not ref or len(ours) != len(ref) or any(a.shape != b.shape for a, b in zip(ours, ref, strict=False)):
        return Check(name, float("inf"), float("inf"), 0.0, tuple(input_shape))
    pairs = [(a.astype(np.float64), b.astype(np.float64)) for a, b in zip(ours, ref, strict=True)]
    diff = max(float(np.abs(a - b).max()) for a, b in pairs)
    rel = max(float((np.abs(a - b) / (1.0 + np.abs(b))).max()) for a, b in pairs)
    scale = max(float(np.abs(b).max()) for _, b in pairs)
    return Check(name, diff, rel, scale, tuple(input_shape))


def verify_onnx(
    path: str | os.PathLike, model: nn.Module, inputs: Mapping[str, torch.Tensor], threads: int | None = None
) -> list[Check]:
    """Run the ONNX file through onnxruntime and the fused model through PyTorch on each input."""
    fused = prepare_model(model)
    session = ort_session(path, threads=threads)
    return [compare_outputs(k, run_ort(session, x), _torch_outputs(fused, x), x.shape) for k, x in inputs.items()]


def verify_torchscript(path: str | os.PathLike, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[Check]:
    """Load the TorchScript file back with ``torch.jit.load`` and compare it with the fused eager model."""
    fused = prepare_model(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream but still the C++ route
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    return [compare_outputs(k, _torch_outputs(loaded, x), _torch_outputs(fused, x), x.shape) for k, x in inputs.items()]


def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    dynamic_batch: bool = False,
    metadata: Mapping[str, Any] | None = None,
    batch_size: int = 1,
) -> Path:
    """Write the fused ``model`` as OpenVINO IR: ``path`` (``.xml``, the graph) and the ``.bin`` beside it (weights).

    Weights stay float32 (OpenVINO's ``save_model`` would compress them to float16 by default: 1e-3 off on logits);
    the input is named ``input``, the outputs as in the other formats, and the preprocessing metadata is stored in
    the IR's ``rt_info`` under ``rapidnet``. Both files are written to temporary names and renamed.
    """
    ov = import_openvino()
    h, w = check_resolution(resolution)
    path = Path(path)
    if path.suffix != ".xml":
        raise ConfigError(f"OpenVINO output {path} must end in .xml (the weights go to {path.stem}.bin beside it)")
    path = check_writable(path)
    fused = prepare_model(model)
    example = torch.zeros(1, 3, h, w)
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        ov_model = ov.convert_model(
            fused, example_input=example, input=[ov.PartialShape([-1 if dynamic_batch else batch_size, 3, h, w])]
        )
    ov_model.inputs[0].get_tensor().set_names({INPUT_NAME})
    for port, name in zip(ov_model.outputs, output_names(fused), strict=True):
        port.get_tensor().set_names({name})
    ov_model.set_rt_info(export_metadata(fused, preprocess_config(fused, (h, w)), metadata), METADATA_KEY)
    return save_openvino(ov_model, path)


def save_openvino(ov_model: Any, path: Path) -> Path:
    """Save an OpenVINO model as ``path`` (.xml) + .bin, float32 weights, both written to temporary names first."""
    ov = import_openvino()
    weights = path.with_suffix(".bin")
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.xml")
    try:
        ov.save_model(ov_model, str(tmp), compress_to_fp16=False)
        os.replace(tmp.with_suffix(".bin"), weights)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"cannot write {path} ({one_line(e)[:120]}): choose a writable output path") from None
    finally:
        for leftover in (tmp, tmp.with_suffix(".bin")):
            leftover.unlink(missing_ok=True)
    return path


def _executorch_lowering() -> tuple[Any, Any]:
    require("executorch", "ExecuTorch export")
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    return to_edge_transform_and_lower, XnnpackPartitioner


def export_executorch(
    model: nn.Module,
    path: str | os.PathLike,
    resolution: Sequence[int] = (224, 224),
    batch_size: int = 1,
    xnnpack_rewrites: bool = True,
) -> Path:
    """Write the fused ``model`` as an ExecuTorch program (``.pte``) delegated to XNNPACK, the CPU kernels that
    ExecuTorch runs on Android and iOS: ``torch.export`` of the plain folded graph (contiguous weights, as the
    XNNPACK lowering needs), ``to_edge_transform_and_lower`` with the XNNPACK partitioner, ``to_executorch``.

    With ``xnnpack_rewrites`` (default) the graph first gets :func:`rapidnet.deploy.xnnpack.for_xnnpack` (depthwise
    convs larger than XNNPACK's 5x5 tile as strips it runs natively; outputs equal to float rounding). The batch size
    is fixed (``batch_size``): a ``.pte`` plans its memory for the shapes it was exported with.
    """
    _executorch_lowering()  # a missing package is a one-line error before any work
    h, w = check_resolution(resolution)
    path = Path(path)
    if path.suffix != ".pte":
        raise ConfigError(f"ExecuTorch output {path} must end in .pte")
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    path = check_writable(path)
    fused = prepare_model(model)
    if xnnpack_rewrites:
        fused = for_xnnpack(fused)
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.export.export(fused, (torch.zeros(batch_size, 3, h, w),))
    return save_executorch(program, path)


def save_executorch(program: Any, path: Path) -> Path:
    """Lower an exported program to XNNPACK (``to_edge_transform_and_lower``) and write the ``.pte`` atomically."""
    to_edge_transform_and_lower, partitioner = _executorch_lowering()
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        buffer = to_edge_transform_and_lower(program, partitioner=[partitioner()]).to_executorch().buffer
    return _replace_into(path, lambda tmp: tmp.write_bytes(buffer))


def verify_openvino(
    path: str | os.PathLike, model: nn.Module, inputs: Mapping[str, torch.Tensor], threads: int | None = None
) -> list[Check]:
    """Run the IR through OpenVINO's CPU plugin and the fused model through PyTorch on each input."""
    fused = prepare_model(model)
    compiled = openvino_session(path, threads)
    return [compare_outputs(k, run_openvino(compiled, x), _torch_outputs(fused, x), x.shape) for k, x in inputs.items()]


def verify_executorch(path: str | os.PathLike, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> list[Check]:
    """Run the ``.pte`` through ExecuTorch (XNNPACK) and the fused model through PyTorch on each input."""
    fused = prepare_model(model)
    method = executorch_method(path)
    return [compare_outputs(k, run_executorch(method, x), _torch_outputs(fused, x), x.shape) for k, x in inputs.items()]


def coreml_spec_problems(
    path: str | os.PathLike, input_shape: Sequence[int], outputs: Mapping[str, Sequence[int]]
) -> list[str]:
    """What is wrong with a saved ``.mlpackage``'s interface: input name/shape, output names/shapes ([] if right).

    This reads the package's protobuf spec only; coremltools cannot run Core ML models off macOS.
    """
    ct = _import_coremltools()
    try:
        spec = ct.utils.load_spec(str(path))
    except Exception as e:
        return [f"cannot read the package spec ({one_line(e)[:120]})"]
    problems: list[str] = []
    if spec.WhichOneof("Type") != "mlProgram":
        problems.append(f"model type is {spec.WhichOneof('Type')}, not mlProgram")
    ins = list(spec.description.input)
    if [i.name for i in ins] != [INPUT_NAME]:
        problems.append(f"inputs are {[i.name for i in ins]}, expected [{INPUT_NAME!r}]")
    else:
        arr = ins[0].type.multiArrayType
        shape = list(arr.shape)
        ranges = [(r.lowerBound, r.upperBound) for r in arr.shapeRange.sizeRanges]
        if ranges:  # flexible batch: the default shape is batch 1; check the fixed dims via the ranges
            shape = [lo if lo == hi else shape[i] for i, (lo, hi) in enumerate(ranges)]
        if shape != list(input_shape):
            problems.append(f"input shape is {shape}, expected {list(input_shape)}")
    outs = {o.name: list(o.type.multiArrayType.shape) for o in spec.description.output}
    if list(outs) != list(outputs):
        problems.append(f"outputs are {list(outs)}, expected {list(outputs)}")
    else:
        for name, want in outputs.items():
            if outs[name] and outs[name] != list(want):
                problems.append(f"output {name} has shape {outs[name]}, expected {list(want)}")
    return problems


# ---- one call: export + check --------------------------------------------------------------------------------------


@dataclass
class ExportResult:
    """What :func:`export` wrote and how it checked out."""

    path: Path
    format: str
    input_shape: tuple[int, ...]
    outputs: dict[str, tuple[int, ...]]
    seconds: float
    tolerance: float
    checks: list[Check] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.passed(self.tolerance) for c in self.checks)

    def lines(self) -> list[str]:
        """Human-readable report, one fact per line."""
        shapes = ", ".join(f"{k} {list(v)}" for k, v in self.outputs.items())
        out = [f"wrote {self.path} ({self.format}, {self.seconds:.1f} s): input {list(self.input_shape)} -> {shapes}"]
        for c in self.checks:
            verdict = "ok" if c.passed(self.tolerance) else "MISMATCH"
            out.append(
                f"  {c.name:6s} input {list(c.input_shape)}: max |{self.format} - pytorch| = {c.max_abs_diff:.3g} "
                f"(outputs up to {c.max_abs_ref:.3g}; allclose rtol=atol={self.tolerance:g}: {verdict})"
            )
        out += [f"  spec problem: {p}" for p in self.problems]
        if self.note:
            out.append(f"  {self.note}")
        return out


def export(
    model: nn.Module,
    path: str | os.PathLike,
    format: str = "onnx",
    resolution: Sequence[int] | None = None,
    dynamic_batch: bool = False,
    fp16: bool = False,
    opset: int = DEFAULT_OPSET,
    verify: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int | None = 1,
    metadata: Mapping[str, Any] | None = None,
) -> ExportResult:
    """Export the fused ``model`` in ``format`` and check it (see the module docstring for what is checked).

    ``resolution`` defaults to the model's ``pretrained_cfg`` input size. The random check input has batch 3 when
    ``dynamic_batch`` is set, so the symbolic batch is exercised too. A check passes when
    ``allclose(exported, pytorch, rtol=tolerance, atol=tolerance)`` (see :class:`Check`).
    ``threads`` is onnxruntime's (and OpenVINO's) for the check: one by default, as a check needs no speed and
    spinning worker threads on a busy machine can make a small model hundreds of times slower.
    """
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if fp16 and format != "coreml":
        raise ConfigError("--fp16 applies to Core ML only: the other formats export fp32 (see rapidnet quantize)")
    if dynamic_batch and format == "executorch":
        raise ConfigError("--dynamic-batch: an ExecuTorch program is exported for one batch size: export one per size")
    fused = prepare_model(model)
    config = preprocess_config(fused, resolution)
    hw = tuple(config["input_size"][1:])
    check_resolution(hw)
    path = check_writable(path)
    inputs = sample_inputs(config, batch=3 if dynamic_batch else 1)
    ref = _torch_outputs(fused, inputs["image"])
    names = output_names(fused)
    outputs = {n: tuple(r.shape) for n, r in zip(names, ref, strict=True)}
    start = time.perf_counter()
    checks: list[Check] = []
    problems: list[str] = []
    note = ""
    if format == "onnx":
        export_onnx(fused, path, hw, dynamic_batch=dynamic_batch, opset=opset, metadata=metadata)
        seconds = time.perf_counter() - start
        checks = verify_onnx(path, fused, inputs, threads) if verify else []
    elif format == "torchscript":
        export_torchscript(fused, path, hw, metadata=metadata)
        seconds = time.perf_counter() - start
        checks = verify_torchscript(path, fused, inputs) if verify else []
    elif format == "openvino":
        export_openvino(fused, path, hw, dynamic_batch=dynamic_batch, metadata=metadata)
        seconds = time.perf_counter() - start
        checks = verify_openvino(path, fused, inputs, threads) if verify else []
    elif format == "executorch":
        export_executorch(fused, path, hw)
        seconds = time.perf_counter() - start
        checks = verify_executorch(path, fused, inputs) if verify else []
    else:
        export_coreml(fused, path, hw, fp16=fp16, dynamic_batch=dynamic_batch, metadata=metadata)
        seconds = time.perf_counter() - start
        if verify:
            problems = coreml_spec_problems(path, (1, 3, *hw), outputs)
        note = (
            "Core ML: package spec (input/output names and shapes) checked; numerical checks need macOS "
            "(coremltools cannot run predictions on Linux)"
        )
    if not verify:
        note = (note + "; " if note else "") + "not verified (--no-verify)"
    return ExportResult(path, format, (1, 3, *hw), outputs, seconds, tolerance, checks, problems, note)
