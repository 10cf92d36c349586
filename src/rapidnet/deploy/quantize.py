"""Static int8 post-training quantization through each runtime's own quantizer, and the accuracy check that says
whether it is safe.

- **onnxruntime** (``.onnx``): ``quantize_static``, QDQ format, per-channel int8 weights, uint8 activations. By
  default only the arithmetic-heavy ops (Conv, Gemm, MatMul) are quantized: GELU and the residual additions stay
  float, which keeps onnxruntime's GELU fusion intact. On an x86 CPU without VNNI the weights keep to 7 bits
  (``reduce_range``), as onnxruntime advises: its AVX2 kernels saturate on full-range ones, and on such a machine
  (AMD EPYC, AVX2 only) the full-range micro model's logits fell to cosine 0.968 of fp32's, against 0.995.
- **OpenVINO** (``.xml`` + ``.bin``): NNCF post-training quantization of the IR (FakeQuantize nodes, which the CPU
  plugin runs as int8 kernels), with fast bias correction.
- **ExecuTorch** (``.pte``): PyTorch 2 export quantization (pt2e) with ExecuTorch's ``XNNPACKQuantizer``, lowered to
  the XNNPACK delegate: the int8 kernels Android and iOS phones run.

All three calibrate on real images run through the model's eval transform. Whether int8 is good enough is
measured, not assumed: fp32 and int8 run side by side in the same runtime on a held-out split (never the calibration
images), giving the top-1 of each and how often their predictions agree. A JSON report is written beside the int8
model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from rapidnet.data import (
    FASHION_MNIST_NAME,
    IMG_EXTENSIONS,
    CorruptSample,
    build_dataset,
    is_fashion_mnist_folder,
    load_rgb,
)
from rapidnet.deploy.export import (
    METADATA_KEY,
    _replace_into,
    check_resolution,
    check_writable,
    eval_transform,
    export_executorch,
    export_onnx,
    export_openvino,
    is_features_model,
    prepare_model,
    preprocess_config,
    read_metadata,
    save_executorch,
    save_openvino,
)
from rapidnet.deploy.runtimes import RUNTIME_SUFFIXES, import_openvino, load_runner, quiet_logs, require
from rapidnet.deploy.xnnpack import for_xnnpack
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.utils import atomic_write, cpu_int8_saturates, subset_indices

_logger = logging.getLogger("rapidnet")

QUANTIZED_OPS: tuple[str, ...] = ("Conv", "Gemm", "MatMul")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
# Preprocessing assumed for ONNX files that carry no rapidnet metadata: timm's ImageNet eval defaults.
_FALLBACK_PREPROCESS = {
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.9,
    "crop_mode": "center",
}


# ---- images --------------------------------------------------------------------------------------------------------


class ImageFiles(Dataset):
    """Every image under a folder (recursively), unlabelled: enough for calibration, which needs no labels."""

    def __init__(self, root: str | os.PathLike, transform: Any = None) -> None:

        self.root = Path(root)
        self.files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        if not self.files:
            raise DataError(
                f"no images in {self.root}: calibration needs a folder of images ({', '.join(IMG_EXTENSIONS)}), "
                "a data set root, or 'fashion-mnist'"
            )
        self.transform = transform
        self.classes: list[str] = []

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, int]:

        path = self.files[index]
        try:
            image = load_rgb(path)
        except OSError as e:
            raise DataError(f"cannot read image {path} ({type(e).__name__}): remove or replace it") from None
        return (self.transform(image) if self.transform else image), -1


def is_labelled_dataset(data: str | os.PathLike) -> bool:
    """Whether ``data`` names a data set with splits and labels (Fashion-MNIST, its IDX folder, an ImageFolder root)."""

    if str(data) == FASHION_MNIST_NAME:
        return True
    path = Path(data).expanduser()
    return path.is_dir() and (is_fashion_mnist_folder(path) or (path / "train").is_dir() or (path / "val").is_dir())


def calibration_dataset(data: str | os.PathLike, transform: Any = None) -> Dataset:
    """Calibration images: the train split of a labelled data set, or every image in a plain folder."""

    if is_labelled_dataset(data):
        path = Path(data)
        split = "val" if path.is_dir() and (path / "val").is_dir() and not (path / "train").is_dir() else "train"
        return build_dataset(data, split, transform=transform)
    path = Path(data).expanduser()
    if not path.is_dir():
        raise DataError(
            f"calibration data {path} is not a folder: pass a folder of images, a data set, or 'fashion-mnist'"
        )
    return ImageFiles(path, transform=transform)


def numpy_batches(
    dataset: Dataset, indices: Sequence[int], batch_size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(float32 images (B, 3, H, W), int64 labels (B,))`` batches of a transformed data set, as onnxruntime wants.

    Unreadable images in ImageFolder data sets (``CorruptSample``) are skipped with a warning, like training does.
    """

    images: list[np.ndarray] = []
    labels: list[int] = []
    for i in indices:
        item = dataset[i]
        if isinstance(item, CorruptSample):
            _logger.warning("skipping unreadable image %s (%s)", item.path, item.reason)
            continue
        image, label = item
        images.append(np.asarray(image, dtype=np.float32))
        labels.append(int(label))
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels, dtype=np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, dtype=np.int64)


try:
    from onnxruntime.quantization import CalibrationDataReader as _ReaderBase
except ImportError:  # onnxruntime is the optional deploy extra; quantize_onnx says so when it is missing
    _ReaderBase = object  # type: ignore[assignment,misc]


class ImageCalibrationReader(_ReaderBase):  # type: ignore[misc]
    """onnxruntime's ``CalibrationDataReader`` over transformed images: one ``{input_name: batch}`` per call."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], input_name: str = "input", batch_size: int = 8):
        self.dataset, self.indices, self.input_name, self.batch_size = dataset, list(indices), input_name, batch_size
        self.seen = 0
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        if batch is None:
            return None
        self.seen += len(batch[0])
        return {self.input_name: batch[0]}

    def rewind(self) -> None:
        self.seen = 0
        self._batches = numpy_batches(self.dataset, self.indices, self.batch_size)


class ArrayCalibrationReader(_ReaderBase):  # type: ignore[misc]
    """Calibration from ready-made input batches (e.g. a benchmark's synthetic inputs): one array per call."""

    def __init__(self, batches: Sequence[np.ndarray], input_name: str = "input") -> None:
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


# ---- quantization --------------------------------------------------------------------------------------------------


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

    ``reader`` is a ``CalibrationDataReader`` (e.g. :class:`ImageCalibrationReader`) or a sequence of input
    batches. ``op_types=None`` quantizes every op onnxruntime can; the default keeps GELU and residual adds in float.
    ``reduce_range`` (7-bit weights) defaults to whether this CPU's int8 kernels saturate (x86 without VNNI).
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
        reader = ArrayCalibrationReader(reader, _onnx_interface(Path(fp32_path))[0])
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

        _replace_into(int8_path, save)
    if getattr(reader, "seen", 1) == 0:
        raise DataError("calibration produced no images: check the calibration data")
    return int8_path


def torch_batches(dataset: Dataset, indices: Sequence[int], batch_size: int = 1) -> Iterator[torch.Tensor]:
    """The calibration images as float32 tensors (what NNCF and pt2e calibration feed the model)."""
    for images, _ in numpy_batches(dataset, indices, batch_size):
        yield torch.from_numpy(images)


def quantize_openvino(
    fp32_path: str | os.PathLike,
    int8_path: str | os.PathLike,
    calibration: Iterable[np.ndarray | torch.Tensor],
    subset_size: int = 300,
    preset: str = "performance",
) -> Path:
    """NNCF post-training quantization of an OpenVINO IR: int8 weights (per channel, symmetric) and activations
    (per tensor), with NNCF's fast bias correction, calibrated on ``calibration`` batches.

    ``preset="mixed"`` makes activations asymmetric (for inputs that are not centred on zero). The metadata the
    fp32 IR carries (preprocessing, outputs) is kept; weights are stored without float16 compression.
    """
    require("nncf", "OpenVINO int8 quantization")
    ov = import_openvino()
    import nncf

    presets = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}
    if preset not in presets:
        raise ConfigError(f"unknown NNCF preset {preset!r}: choose {', '.join(presets)}")
    int8_path = Path(int8_path)
    if int8_path.suffix != ".xml":
        raise ConfigError(f"OpenVINO int8 output {int8_path} must end in .xml (the weights go to .bin beside it)")
    int8_path = check_writable(int8_path)
    model = ov.Core().read_model(str(fp32_path))
    items = [np.ascontiguousarray(b.numpy() if isinstance(b, torch.Tensor) else b, np.float32) for b in calibration]
    if not items:
        raise DataError("calibration produced no images: check the calibration data")
    with quiet_logs(("nncf",)), warnings.catch_warnings(), _no_progress_bars():
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(
            model, nncf.Dataset(items), preset=presets[preset], subset_size=min(subset_size, len(items))
        )
    if model.has_rt_info(METADATA_KEY):
        quantized.set_rt_info(model.get_rt_info(METADATA_KEY).astype(str), METADATA_KEY)
    save_openvino(quantized, int8_path)
    return int8_path


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """NNCF draws its own rich progress bars on stdout; ``rapidnet quantize --json`` must print only JSON."""
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def quantize_executorch(
    model: nn.Module,
    int8_path: str | os.PathLike,
    calibration: Iterable[torch.Tensor],
    resolution: Sequence[int] = (224, 224),
    batch_size: int = 1,
    per_channel: bool = True,
    xnnpack_rewrites: bool = True,
) -> Path:
    """pt2e static int8 quantization with ExecuTorch's ``XNNPACKQuantizer``, lowered to an XNNPACK ``.pte``.

    ``torch.export`` of the fused model, ``prepare_pt2e`` (observers placed where XNNPACK has int8 kernels:
    convolutions, linear layers, additions), calibration on ``calibration`` batches of ``batch_size`` images,
    ``convert_pt2e`` (quantize/dequantize pairs), then the same lowering as the fp32 export. Weights are int8
    symmetric (per channel by default), activations int8 per tensor. ``xnnpack_rewrites`` as in
    :func:`~rapidnet.deploy.export.export_executorch`.
    """
    require("executorch", "ExecuTorch int8 quantization")
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    h, w = check_resolution(resolution)
    int8_path = Path(int8_path)
    if int8_path.suffix != ".pte":
        raise ConfigError(f"ExecuTorch int8 output {int8_path} must end in .pte")
    int8_path = check_writable(int8_path)
    fused = prepare_model(model)
    if xnnpack_rewrites:
        fused = for_xnnpack(fused)
    example = (torch.zeros(batch_size, 3, h, w),)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=per_channel))
    seen = 0
    with warnings.catch_warnings(), quiet_logs(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export(fused, example).module(), quantizer)
        for batch in calibration:
            for start in range(0, len(batch), batch_size):
                part = batch[start : start + batch_size]
                if len(part) == batch_size:
                    prepared(part)
                    seen += len(part)
        if seen == 0:
            raise DataError("calibration produced no images: check the calibration data")
        converted = convert_pt2e(prepared)
        program = torch.export.export(converted, example)
    return save_executorch(program, int8_path)


# ---- accuracy ------------------------------------------------------------------------------------------------------


@dataclass
class Agreement:
    """fp32 vs int8 on the same held-out images."""

    images: int
    fp32_top1: float
    int8_top1: float
    agreement: float
    max_abs_logit_diff: float
    mean_abs_logit_diff: float

    @property
    def top1_drop(self) -> float:
        return self.fp32_top1 - self.int8_top1


def _as_logits_fn(model: Any) -> Callable[[np.ndarray], np.ndarray]:
    """A callable ``images -> logits``: a :class:`~rapidnet.deploy.runtimes.Runner`, any such callable, or an
    onnxruntime-style session (``get_inputs`` / ``run``)."""
    if hasattr(model, "get_inputs"):
        return lambda images: model.run(None, {model.get_inputs()[0].name: images})[0]

    def logits(images: np.ndarray) -> np.ndarray:
        out = model(images)
        return np.asarray(out[0] if isinstance(out, (list, tuple)) else out)

    return logits


def compare_accuracy(
    fp32_model: Any, int8_model: Any, dataset: Dataset, indices: Sequence[int], batch_size: int = 16
) -> Agreement:
    """Top-1 (%) of both models against the labels, and the % of images where their top-1 predictions agree.

    Each model is a :class:`~rapidnet.deploy.runtimes.Runner` (any runtime), an onnxruntime session, or a callable
    returning the logits of a numpy batch.
    """
    run32, run8 = _as_logits_fn(fp32_model), _as_logits_fn(int8_model)
    n = correct32 = correct8 = agree = 0
    max_diff, sum_diff = 0.0, 0.0
    for images, labels in numpy_batches(dataset, indices, batch_size):
        logits32, logits8 = run32(images), run8(images)
        pred32, pred8 = logits32.argmax(1), logits8.argmax(1)
        n += len(labels)
        correct32 += int((pred32 == labels).sum())
        correct8 += int((pred8 == labels).sum())
        agree += int((pred32 == pred8).sum())
        diff = np.abs(logits32 - logits8)
        max_diff = max(max_diff, float(diff.max()))
        sum_diff += float(diff.mean()) * len(labels)
    if n == 0:
        raise DataError("the evaluation split has no readable images")
    return Agreement(n, 100 * correct32 / n, 100 * correct8 / n, 100 * agree / n, max_diff, sum_diff / n)


# ---- one call: export (if needed), calibrate, quantize, check ------------------------------------------------------


@dataclass
class QuantizeReport:
    """Everything ``rapidnet quantize`` did, as written to ``<output>.json``."""

    source: str
    int8_model: str
    fp32_model: str | None
    input_size: list[int]
    preprocess: dict[str, Any]
    calibration: dict[str, Any]
    quantization: dict[str, Any]
    sizes_bytes: dict[str, int]
    evaluation: dict[str, Any] | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        mb = {k: v / 1e6 for k, v in self.sizes_bytes.items()}
        q = self.quantization
        out = [
            f"wrote {self.int8_model}: {q['runtime']} int8, {q['format']} ({q['weights']}"
            + (", 7-bit range: this CPU's int8 kernels saturate on 8 bits" if q.get("reduce_range") else "")
            + f"), "
            f"{mb['int8']:.2f} MB vs {mb['fp32']:.2f} MB fp32",
            f"  calibrated on {self.calibration['images']} images from {self.calibration['data']} "
            f"({self.calibration['split']}, {self.calibration['method']})",
        ]
        ev = self.evaluation
        if ev:
            out.append(
                f"  {ev['data']} {ev['split']}, {ev['images']} images: top-1 fp32 {ev['fp32_top1']:.2f}%, "
                f"int8 {ev['int8_top1']:.2f}% (drop {ev['top1_drop']:+.2f} points), agreement {ev['agreement']:.2f}%"
            )
        else:
            out.append("  no accuracy check: pass --eval-data with a labelled held-out split")
        return out


def _check_external_data(path: Path, proto: Any) -> None:
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


def _onnx_interface(path: Path) -> tuple[str, list[Any], list[list[Any]]]:
    """Input name and shape, and output shapes, of an ONNX file (read without building a session)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable ONNX model ({' '.join(str(e).split())[:120]})") from None

    def dims(value: Any) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

    _check_external_data(path, proto)
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ConfigError(f"{path} has {len(inputs)} inputs: quantize expects an image model with one input")
    return inputs[0].name, dims(inputs[0]), [dims(o) for o in proto.graph.output]


def _source_preprocess(path: Path, dims: list[Any], resolution: Sequence[int] | None) -> dict[str, Any]:
    """Preprocessing for an existing ONNX file: its rapidnet metadata, else timm's ImageNet defaults (warned)."""
    meta = read_metadata(path).get("preprocess")
    if meta:
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
    else:
        _logger.warning(
            "%s has no rapidnet preprocessing metadata: assuming ImageNet mean/std, bicubic, crop 0.9", path
        )
        config = dict(_FALLBACK_PREPROCESS)
    fixed = tuple(d for d in dims[2:] if isinstance(d, int) and d > 0)
    if len(fixed) == 2:
        if resolution is not None and tuple(check_resolution(resolution)) != fixed:
            raise ConfigError(
                f"{path} takes {fixed[0]}x{fixed[1]} images, not {resolution[0]}x{resolution[1]}: "
                "drop --resolution or re-export at that size"
            )
        config["input_size"] = (3, *fixed)
    elif resolution is not None:
        config["input_size"] = (3, *check_resolution(resolution))
    elif "input_size" not in config:
        raise ConfigError(f"{path} has a dynamic image size: pass --resolution H W")
    return config


def _check_classes(
    dataset: Dataset, data: str | os.PathLike, n_outputs: int, n_classes: Any, class_names: Sequence[str] | None
) -> None:
    """Refuse an accuracy check that could only produce noise: no classifier, or other classes than the data's."""
    if n_outputs != 1 or n_classes == 0:
        raise ConfigError("the accuracy check needs a classifier: this model has no class logits (features only?)")
    if isinstance(n_classes, int) and n_classes != len(dataset.classes):
        raise DataError(
            f"the model predicts {n_classes} classes but {data} has {len(dataset.classes)}: "
            "evaluate on the data set the checkpoint was trained for"
        )
    if class_names is not None and list(class_names) != list(dataset.classes):
        pairs = [(a, b) for a, b in zip(class_names, dataset.classes, strict=False) if a != b]
        first = f" (first: model {pairs[0][0]!r}, data {pairs[0][1]!r})" if pairs else ""
        raise DataError(f"the checkpoint's class names differ from those of {data}{first}: evaluate on its data set")


QUANTIZE_RUNTIMES: tuple[str, ...] = ("onnxruntime", "openvino", "executorch")


def runtime_for_output(output: str | os.PathLike, runtime: str | None = None) -> str:
    """The runtime to quantize for: ``runtime`` when given (it must match the suffix), else the output's suffix."""
    if runtime is not None and runtime not in QUANTIZE_RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}: choose {', '.join(QUANTIZE_RUNTIMES)}")
    suffix = Path(output).suffix.lower()
    want = {r: s for s, r in RUNTIME_SUFFIXES.items()}
    if runtime is not None and RUNTIME_SUFFIXES.get(suffix) != runtime:
        raise ConfigError(f"int8 model {output} for {runtime} must end in {want[runtime]}")
    if suffix not in RUNTIME_SUFFIXES:
        raise ConfigError(f"int8 model {output} must end in .onnx (onnxruntime), .xml (OpenVINO) or .pte (ExecuTorch)")
    return RUNTIME_SUFFIXES[suffix]


def _files_size(path: Path) -> int:
    """Bytes of a model file, with the OpenVINO ``.bin`` beside an ``.xml``."""
    extra = path.with_suffix(".bin") if path.suffix == ".xml" else None
    return path.stat().st_size + (extra.stat().st_size if extra and extra.is_file() else 0)


def _quantization_facts(
    runtime: str,
    per_channel: bool,
    activation_type: str,
    calibrate_method: str,
    op_types: Any,
    preset: str,
    reduce_range: bool = False,
) -> dict[str, Any]:
    """How the int8 model was made, for the report."""
    weights = "int8 per-channel" if per_channel else "int8 per-tensor"
    if runtime == "onnxruntime":
        import onnxruntime

        return {
            "runtime": f"onnxruntime {onnxruntime.__version__}",
            "format": "QDQ",
            "weights": weights,
            "reduce_range": reduce_range,
            "activations": activation_type,
            "ops": list(op_types) if op_types else "all",
            "method": calibrate_method,
        }
    if runtime == "openvino":
        import nncf
        import openvino

        return {
            "runtime": f"openvino {openvino.__version__}, nncf {nncf.__version__}",
            "format": "NNCF FakeQuantize IR",
            "weights": "int8 per-channel symmetric",
            "activations": "int8 per-tensor " + ("symmetric" if preset == "performance" else "asymmetric"),
            "preset": preset,
            "method": "minmax + fast bias correction",
        }
    from importlib.metadata import version

    return {
        "runtime": f"executorch {version('executorch')}",
        "format": "pt2e QDQ lowered to XNNPACK",
        "weights": weights + " symmetric",
        "activations": "int8 per-tensor asymmetric",
        "quantizer": "XNNPACKQuantizer (static)",
        "method": "minmax",
    }


def quantize_model(
    source: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    calib: str | os.PathLike,
    calib_size: int | None = 256,
    eval_data: str | os.PathLike | None = None,
    eval_size: int | None = 2000,
    resolution: Sequence[int] | None = None,
    threads: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    per_channel: bool = True,
    activation_type: str = "uint8",
    calibrate_method: str = "minmax",
    op_types: Sequence[str] | None = QUANTIZED_OPS,
    fp32_output: str | os.PathLike | None = None,
    class_names: Sequence[str] | None = None,
    source_label: str | None = None,
    runtime: str | None = None,
    preset: str = "performance",
    reduce_range: bool | None = None,
) -> QuantizeReport:
    """Quantize a RapidNet (or any timm classifier) to int8 for ``runtime`` (default: from ``output``'s suffix).

    ``source`` is a model (exported here to the runtime's fp32 format first) or, for onnxruntime only, an existing
    fp32 ``.onnx``. Calibration uses ``calib_size`` images from ``calib`` (its train split when it is a labelled data
    set). When ``eval_data`` is given (a labelled data set), fp32 and int8 are compared in the same runtime on up to
    ``eval_size`` images of its held-out split. Inputs are checked before any slow step. The report is returned and
    written beside ``output`` (same name, ``.json``). ``reduce_range``: see :func:`quantize_onnx` (onnxruntime only).
    """

    output = Path(output)
    runtime = runtime_for_output(output, runtime)
    is_model = isinstance(source, nn.Module)
    if not is_model and runtime != "onnxruntime":
        raise ConfigError(f"{runtime} int8 starts from the checkpoint, not from {source}: pass --checkpoint C")
    if runtime != "onnxruntime" and (op_types != QUANTIZED_OPS or calibrate_method != "minmax" or reduce_range):
        raise ConfigError("--all-ops, --method and --reduce-range are onnxruntime options: drop them for " + runtime)
    if runtime == "onnxruntime" and reduce_range is None:
        reduce_range = cpu_int8_saturates()
    if runtime == "openvino" and not per_channel:
        raise ConfigError("--per-tensor: NNCF quantizes OpenVINO weights per channel: drop --per-tensor")
    if fp32_output is not None and Path(fp32_output).suffix.lower() != output.suffix.lower():
        raise ConfigError(f"--save-fp32 {fp32_output} must be a {runtime} file ending in {output.suffix}")
    output, report_path = check_writable(output), check_writable(output.with_suffix(".json"))
    if fp32_output is not None:
        check_writable(fp32_output)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    if is_model:
        config = preprocess_config(source, resolution)
        n_outputs = len(source.feature_info.out_indices) if is_features_model(source) else 1
        n_classes = 0 if is_features_model(source) else source.num_classes
    else:
        fp32 = Path(source)
        if not fp32.is_file():
            raise CheckpointError(f"ONNX model not found: {fp32}: check the path")
        input_name, dims, out_dims = _onnx_interface(fp32)
        config = _source_preprocess(fp32, dims, resolution)
        n_outputs, n_classes = len(out_dims), out_dims[0][-1] if out_dims and out_dims[0] else 0
    calib_set = calibration_dataset(calib)
    eval_set = None
    if eval_data is not None:
        eval_set = build_dataset(eval_data, "val")
        _check_classes(eval_set, eval_data, n_outputs, n_classes, class_names)

    timings: dict[str, float] = {}
    hw = tuple(config["input_size"][1:])
    with tempfile.TemporaryDirectory(prefix="rapidnet-quant-") as tmp:
        transform = eval_transform(config)
        calib_set.transform = transform
        calib_idx = subset_indices(len(calib_set), calib_size, seed)
        start = time.perf_counter()
        if is_model:
            fp32 = Path(fp32_output) if fp32_output else Path(tmp) / f"fp32{output.suffix}"
            if runtime == "onnxruntime":
                export_onnx(source, fp32, hw, dynamic_batch=True)
            elif runtime == "openvino":
                export_openvino(source, fp32, hw, dynamic_batch=True)
            else:
                export_executorch(source, fp32, hw)
            timings["export"] = time.perf_counter() - start
        start = time.perf_counter()
        if runtime == "onnxruntime":
            input_name, dims, _ = _onnx_interface(fp32)
            if isinstance(dims[0], int) and dims[0] > 0:
                if dims[0] != 1:
                    raise ConfigError(
                        f"{fp32} has a fixed batch of {dims[0]}: export it with --dynamic-batch or batch 1"
                    )
                batch_size = 1
            reader = ImageCalibrationReader(calib_set, calib_idx, input_name, batch_size=min(batch_size, 8))
            quantize_onnx(fp32, output, reader, per_channel, activation_type, calibrate_method, op_types, reduce_range)
            seen = reader.seen
        else:
            batches = list(torch_batches(calib_set, calib_idx, batch_size=1))
            seen = len(batches)
            if runtime == "openvino":
                quantize_openvino(fp32, output, batches, subset_size=len(batches), preset=preset)
            else:
                quantize_executorch(source, output, batches, hw, per_channel=per_channel)
        timings["calibrate_and_quantize"] = time.perf_counter() - start

        evaluation = None
        if eval_set is not None:
            start = time.perf_counter()
            eval_set.transform = transform
            indices = subset_indices(len(eval_set), eval_size, seed)
            no_spin = {"session.intra_op.allow_spinning": "0"}  # accuracy, not latency: don't busy-wait a shared CPU
            runners = [load_runner(p, threads, config_entries=no_spin) for p in (fp32, output)]
            result = compare_accuracy(*runners, eval_set, indices, batch_size)
            timings["evaluate"] = time.perf_counter() - start
            evaluation = {
                "data": str(eval_data),
                "split": "test (held out)" if getattr(eval_set, "split", "val") == "test" else "val (held out)",
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(result).items()},
                "top1_drop": round(result.top1_drop, 4),
                "threads": threads,
            }
        default_label = getattr(source, "pretrained_cfg", {}).get("architecture", "model")
        report = QuantizeReport(
            source=source_label or (str(source) if not is_model else default_label),
            int8_model=str(output),
            fp32_model=str(fp32) if fp32_output or not is_model else None,
            input_size=list(config["input_size"]),
            preprocess={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            calibration={
                "data": str(calib),
                "split": "train" if is_labelled_dataset(calib) else "all images in the folder",
                "images": seen,
                "method": calibrate_method if runtime == "onnxruntime" else "minmax",
                "seed": seed,
            },
            quantization=_quantization_facts(
                runtime, per_channel, activation_type, calibrate_method, op_types, preset, bool(reduce_range)
            ),
            sizes_bytes={"fp32": _files_size(fp32), "int8": _files_size(output)},
            evaluation=evaluation,
            seconds={k: round(v, 2) for k, v in timings.items()},
        )

    atomic_write(report_path, lambda p: Path(p).write_text(json.dumps(report.to_dict(), indent=2) + "\n"))
    return report
