"""Static int8 post-training quantization for onnxruntime, and the accuracy check that says whether it is safe.

The recipe is onnxruntime's own (``quantize_static``): QDQ format, per-channel int8 weights, uint8 activations with
ranges calibrated on real images run through the model's eval transform. By default only the arithmetic-heavy ops
(Conv, Gemm, MatMul) are quantized: the GELU (Erf arithmetic) and residual additions stay float, which keeps
onnxruntime's GELU fusion intact and costs little speed (they are a small share of the MACs).

Whether int8 is good enough is measured, not assumed: fp32 and int8 run side by side on a held-out split (never the
calibration images), giving the top-1 of each and how often their predictions agree. A JSON report is written beside
the int8 model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
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
    _replace_into,
    check_resolution,
    check_writable,
    eval_transform,
    export_onnx,
    is_features_model,
    ort_session,
    preprocess_config,
    quiet_logs,
    read_metadata,
    require,
)
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.utils import atomic_write, subset_indices

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
) -> Path:
    """``quantize_static`` in QDQ format (int8 weights, per channel by default) after onnxruntime's pre-processing.

    ``reader`` is a ``CalibrationDataReader`` (e.g. :class:`ImageCalibrationReader`) or a sequence of input
    batches. ``op_types=None`` quantizes every op onnxruntime can; the default keeps GELU and residual adds in float.
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
            )

        _replace_into(int8_path, save)
    if getattr(reader, "seen", 1) == 0:
        raise DataError("calibration produced no images: check the calibration data")
    return int8_path


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


def compare_accuracy(
    fp32_session: Any, int8_session: Any, dataset: Dataset, indices: Sequence[int], batch_size: int = 16
) -> Agreement:
    """Top-1 (%) of both models against the labels, and the % of images where their top-1 predictions agree."""
    input_name = fp32_session.get_inputs()[0].name
    n = correct32 = correct8 = agree = 0
    max_diff, sum_diff = 0.0, 0.0
    for images, labels in numpy_batches(dataset, indices, batch_size):
        logits32 = fp32_session.run(None, {input_name: images})[0]
        logits8 = int8_session.run(None, {int8_session.get_inputs()[0].name: images})[0]
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
        out = [
            f"wrote {self.int8_model}: int8 QDQ ({self.quantization['weights']}), "
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


def _onnx_interface(path: Path) -> tuple[str, list[Any], list[list[Any]]]:
    """Input name and shape, and output shapes, of an ONNX file (read without building a session)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable ONNX model ({' '.join(str(e).split())[:120]})") from None

    def dims(value: Any) -> list[Any]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

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
) -> QuantizeReport:
    """Quantize a RapidNet (a model, exported here first with a dynamic batch, or an existing ``.onnx``) to int8.

    Calibration uses ``calib_size`` images from ``calib`` (its train split when it is a labelled data set). When
    ``eval_data`` is given (a labelled data set), fp32 and int8 are compared on up to ``eval_size`` images of its
    held-out split. Inputs are checked before any slow step. The report is returned and written beside ``output``
    (same name, ``.json``).
    """

    output = Path(output)
    if output.suffix != ".onnx":
        raise ConfigError(f"quantized model {output} must end in .onnx")
    output, report_path = check_writable(output), check_writable(output.with_suffix(".json"))
    if fp32_output is not None:
        check_writable(fp32_output)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if isinstance(source, nn.Module):
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
    with tempfile.TemporaryDirectory(prefix="rapidnet-quant-") as tmp:
        if isinstance(source, nn.Module):
            start = time.perf_counter()
            fp32 = Path(fp32_output) if fp32_output else Path(tmp) / "fp32.onnx"
            export_onnx(source, fp32, config["input_size"][1:], dynamic_batch=True)
            timings["export"] = time.perf_counter() - start
            input_name, dims, _ = _onnx_interface(fp32)
        if isinstance(dims[0], int) and dims[0] > 0:
            if dims[0] != 1:
                raise ConfigError(f"{fp32} has a fixed batch of {dims[0]}: export it with --dynamic-batch or batch 1")
            batch_size = 1
        transform = eval_transform(config)
        calib_set.transform = transform
        calib_idx = subset_indices(len(calib_set), calib_size, seed)
        reader = ImageCalibrationReader(calib_set, calib_idx, input_name, batch_size=min(batch_size, 8))
        start = time.perf_counter()
        quantize_onnx(fp32, output, reader, per_channel, activation_type, calibrate_method, op_types)
        timings["calibrate_and_quantize"] = time.perf_counter() - start

        evaluation = None
        if eval_set is not None:
            start = time.perf_counter()
            eval_set.transform = transform
            indices = subset_indices(len(eval_set), eval_size, seed)
            no_spin = {"session.intra_op.allow_spinning": "0"}  # accuracy, not latency: don't busy-wait a shared CPU
            sessions = [ort_session(p, threads, config_entries=no_spin) for p in (fp32, output)]
            result = compare_accuracy(*sessions, eval_set, indices, batch_size)
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
            source=source_label or (str(source) if not isinstance(source, nn.Module) else default_label),
            int8_model=str(output),
            fp32_model=str(fp32) if fp32_output or not isinstance(source, nn.Module) else None,
            input_size=list(config["input_size"]),
            preprocess={k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            calibration={
                "data": str(calib),
                "split": "train" if is_labelled_dataset(calib) else "all images in the folder",
                "images": reader.seen,
                "method": calibrate_method,
                "seed": seed,
            },
            quantization={
                "format": "QDQ",
                "weights": "int8 per-channel" if per_channel else "int8 per-tensor",
                "activations": activation_type,
                "ops": list(op_types) if op_types else "all",
                "runtime": _ort_version(),
            },
            sizes_bytes={"fp32": fp32.stat().st_size, "int8": output.stat().st_size},
            evaluation=evaluation,
            seconds={k: round(v, 2) for k, v in timings.items()},
        )

    atomic_write(report_path, lambda p: Path(p).write_text(json.dumps(report.to_dict(), indent=2) + "\n"))
    return report


def _ort_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"
