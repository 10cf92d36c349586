"""``quantize``: static int8 post-training quantization through each runtime's own quantizer, and the accuracy check
that says whether it is safe.

Each runtime module brings its quantizer (onnxruntime's QDQ ``quantize_static``, NNCF for OpenVINO, pt2e with
ExecuTorch's ``XNNPACKQuantizer``, ai-edge-quantizer for LiteRT); this module feeds them the same calibration images
(real images through the model's eval transform) and judges the result the same way: fp32 and int8 run side by side
in the same runtime on a held-out split (never the calibration images), giving the top-1 of each and how often their
predictions agree. A JSON report is written beside the int8 model.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
from rapidnet.deploy import registry
from rapidnet.deploy.common import (
    Runtime,
    check_resolution,
    check_writable,
    eval_transform,
    export_metadata,
    file_preprocess,
    is_features_model,
    prepare_model,
    preprocess_config,
)
from rapidnet.deploy.onnx import QUANTIZED_OPS
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.utils import atomic_write, subset_indices

_logger = logging.getLogger("rapidnet")

# quantize_model's runtime options, their defaults and the flag that sets each
_OPTION_DEFAULTS: dict[str, tuple[Any, str]] = {
    "per_channel": (True, "--per-tensor"),
    "activation_type": ("uint8", "--activation-type"),
    "calibrate_method": ("minmax", "--method"),
    "op_types": (QUANTIZED_OPS, "--all-ops"),
    "reduce_range": (None, "--reduce-range"),
    "preset": ("performance", "--preset"),
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
    """A callable ``images -> logits``: a :class:`~rapidnet.deploy.common.Runner`, any such callable, or an
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

    Each model is a :class:`~rapidnet.deploy.common.Runner` (any runtime), an onnxruntime session, or a callable
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


def _source_preprocess(
    path: Path, metadata: dict[str, Any], dims: Sequence[Any], resolution: Sequence[int] | None
) -> dict[str, Any]:
    """Preprocessing for an exported file: its rapidnet metadata, else timm's ImageNet defaults (warned)."""
    config = file_preprocess(metadata, path)
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


def runtime_for_output(output: str | os.PathLike, runtime: str | None = None) -> Runtime:
    """The runtime to quantize for: ``runtime`` when given (it must match the suffix), else the output's suffix."""
    if runtime is not None:
        rt = registry.get(runtime)
        if rt.quantizer is None:
            raise ConfigError(
                f"{rt.title} has no int8 quantizer here: choose one of {', '.join(registry.quantizing())}"
            )
        rt.check_suffix(output, "int8 model")
        return rt
    suffix = Path(output).suffix.lower()
    name = registry.suffixes().get(suffix)
    if name not in registry.quantizing():
        known = ", ".join(f"{registry.get(n).suffix} ({n})" for n in registry.quantizing())
        raise ConfigError(f"int8 model {output} must end in one of {known}")
    return registry.get(name)


def _files_size(runtime: Runtime, path: Path) -> int:
    """Bytes of a model's files (OpenVINO's .bin too; a sidecar is not the model)."""
    return sum(p.stat().st_size for p in runtime.files(path) if p.is_file() and not p.name.endswith(".json"))


def _check_options(runtime: Runtime, options: dict[str, Any]) -> dict[str, Any]:
    """The options set away from their defaults must be ones this runtime's quantizer takes."""
    for name, value in options.items():
        default, flag = _OPTION_DEFAULTS[name]
        if value != default and name not in runtime.quantize_options:
            raise ConfigError(f"{flag} is not an option of {runtime.title}'s quantizer: drop it for {runtime.name}")
    return {k: v for k, v in options.items() if k in runtime.quantize_options}


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
    metadata: Mapping[str, Any] | None = None,
) -> QuantizeReport:
    """Quantize a RapidNet (or any timm classifier) to int8 for ``runtime`` (default: from ``output``'s suffix).

    ``source`` is a model (exported here to the runtime's fp32 format first) or an fp32 file of that runtime made by
    ``rapidnet export`` (runtimes whose quantizer starts from a file: onnxruntime, OpenVINO, LiteRT). Calibration
    uses ``calib_size`` images from ``calib`` (its train split when it is a labelled data set). When ``eval_data`` is
    given (a labelled data set), fp32 and int8 are compared in the same runtime on up to ``eval_size`` images of its
    held-out split. Inputs are checked before any slow step. The report is returned and written beside ``output``
    (same name, ``.json``). ``metadata`` adds fields to the files' metadata (a task model's classes and settings).
    """
    output = Path(output)
    rt = runtime_for_output(output, runtime)
    rt.require(f"{rt.title} int8 quantization")
    options = _check_options(
        rt,
        {
            "per_channel": per_channel,
            "activation_type": activation_type,
            "calibrate_method": calibrate_method,
            "op_types": tuple(op_types) if op_types else None,
            "reduce_range": reduce_range,
            "preset": preset,
        },
    )
    is_model = isinstance(source, nn.Module)
    if not is_model:
        if Path(source).suffix.lower() != rt.suffix:
            raise ConfigError(f"{rt.title} int8 starts from the checkpoint or a {rt.suffix} file, not {source}")
        if not Path(source).is_file():
            raise CheckpointError(f"{rt.title} model not found: {source}: check the path")
    if fp32_output is not None:
        rt.check_suffix(fp32_output, "--save-fp32 file")
    output, report_path = check_writable(output), check_writable(output.with_suffix(".json"))
    if fp32_output is not None:
        check_writable(fp32_output)
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    if is_model:
        fused = prepare_model(source)
        config = preprocess_config(fused, resolution)
        n_classes = 0 if is_features_model(fused) else getattr(fused, "num_classes", 0)  # 0: no class logits
        n_outputs = len(fused.feature_info.out_indices) if is_features_model(fused) else 1
    else:
        fused, fp32 = None, Path(source)
        meta = rt.read_metadata(fp32)
        config = _source_preprocess(fp32, meta, rt.input_shape(fp32), resolution)
        n_outputs = len(meta.get("outputs") or ["logits"])
        n_classes = int((meta.get("arch") or {}).get("num_classes", -1))
        class_names = class_names or meta.get("class_names")
    calib_set = calibration_dataset(calib)
    eval_set = None
    if eval_data is not None:
        if n_outputs == 1 and n_classes == 0:
            raise ConfigError("--eval-data checks classifiers: score a task model's files with its own eval command")
        eval_set = build_dataset(eval_data, "val")
        _check_classes(eval_set, eval_data, n_outputs, n_classes if n_classes >= 0 else None, class_names)

    timings: dict[str, float] = {}
    hw = check_resolution(tuple(config["input_size"][1:]))
    with tempfile.TemporaryDirectory(prefix="rapidnet-quant-") as tmp:
        transform = eval_transform(config)
        calib_set.transform = transform
        calib_idx = subset_indices(len(calib_set), calib_size, seed)
        start = time.perf_counter()
        if is_model:
            fp32 = Path(fp32_output) if fp32_output else Path(tmp) / f"fp32{output.suffix}"
            extra = {"class_names": list(class_names)} if class_names else {}
            meta_json = export_metadata(fused, config, {**extra, **(metadata or {})})
            rt.export(fused, fp32, hw, dynamic_batch=not rt.fixed_batch, metadata=meta_json)
            timings["export"] = time.perf_counter() - start
        start = time.perf_counter()
        batches = [images for images, _ in numpy_batches(calib_set, calib_idx, batch_size=1)]
        if not batches:
            raise DataError("calibration produced no images: check the calibration data")
        rt.quantize(fused, fp32, output, batches, **options)
        timings["calibrate_and_quantize"] = time.perf_counter() - start

        evaluation = None
        if eval_set is not None:
            start = time.perf_counter()
            eval_set.transform = transform
            indices = subset_indices(len(eval_set), eval_size, seed)
            # accuracy, not latency: runtimes that busy-wait are told not to on a shared CPU
            runners = [rt.load(p, threads, **rt.bench_load_options) for p in (fp32, output)]
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
                "images": len(batches),
                "method": options.get("calibrate_method", "minmax"),
                "seed": seed,
            },
            quantization=rt.quantization_facts(**options),
            sizes_bytes={"fp32": _files_size(rt, fp32), "int8": _files_size(rt, output)},
            evaluation=evaluation,
            seconds={k: round(v, 2) for k, v in timings.items()},
        )

    atomic_write(report_path, lambda p: Path(p).write_text(json.dumps(report.to_dict(), indent=2) + "\n"))
    return report
