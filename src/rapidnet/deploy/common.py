"""What every runtime module shares: the :class:`Runtime` contract, the :class:`Runner` of a loaded file, the model
to export, the metadata an exported file carries, output comparison, and the small guards around writing files.

A runtime module (``onnx.py``, ``openvino.py``, ``executorch.py``, ``litert.py``, ...) subclasses :class:`Runtime`
and imports only this module; :mod:`rapidnet.deploy.registry` maps names and file suffixes to them, and the verbs
(``export``, ``quantize``, ``bench``, the CLI's ``predict`` and ``eval``) go through the registry.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.models.checkpoint import is_features_model
from rapidnet.utils import write_error

_logger = logging.getLogger("rapidnet")

INPUT_NAME = "input"
METADATA_KEY = "rapidnet"  # ONNX metadata_props / TorchScript extra file / Core ML user metadata / LiteRT metadata
SIDECAR_SUFFIX = ".json"  # model.pte -> model.pte.json, for formats without a metadata slot
MIN_RESOLUTION = 32  # five stride-2 convolutions: below 32 pixels the last stage has no spatial extent left
# Preprocessing assumed for files that carry no rapidnet metadata: timm's ImageNet eval defaults.
FALLBACK_PREPROCESS = {
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.9,
    "crop_mode": "center",
}
PREPROCESS_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
MAX_METADATA_BYTES = 1 << 20  # a sidecar or embedded metadata larger than this is not ours


# ---- messages and optional packages --------------------------------------------------------------------------------


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def require(module: str, purpose: str, extra: str = "deploy") -> None:
    """A one-line ConfigError naming the install command when an optional runtime package is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{purpose} needs the {module} package: pip install 'rapidnet[{extra}]'")


@contextlib.contextmanager
def quiet_logs(
    names: Sequence[str] = ("onnx_ir", "onnxscript", "onnxruntime", "torch.onnx", "torch.export", "coremltools"),
) -> Iterator[None]:
    """Hold the exporters' and quantizers' INFO chatter (hundreds of lines per model) unless logging is at DEBUG."""
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


@contextlib.contextmanager
def native_stderr_to_devnull() -> Iterator[None]:
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


# ---- checks and files ----------------------------------------------------------------------------------------------


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


def check_batch(batch_size: int) -> int:
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    return batch_size


def check_writable(path: str | os.PathLike) -> Path:
    """Fail now, in one line, if ``path`` cannot be written, rather than after a minutes-long conversion."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.parent / f".{path.name}.probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise write_error(path, e) or CheckpointError(f"cannot write {path}: choose a writable output path") from None
    if path.is_dir() and path.suffix != ".mlpackage":
        raise CheckpointError(f"cannot write {path}: it is a folder: give a file name")
    return path


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace_into(path: Path, save: Callable[[Path], Any]) -> Path:
    """``save(tmp)`` then move it over ``path`` (file or package folder), so a failure never leaves half a model."""
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove(tmp)
        save(tmp)
        remove(path)
        os.replace(tmp, path)
    except BaseException as e:
        remove(tmp)
        error = write_error(path, e)
        if error is not None:
            raise error from None
        raise
    return path


# ---- the model to export and what it is -----------------------------------------------------------------------------


_PREPARED = "_rapidnet_export_ready"  # set on the copies prepare_model makes


def prepare_model(model: nn.Module) -> nn.Module:
    """The model to export: the plain folded graph as an fp32 eval copy on the CPU, with contiguous weights.

    The original stays trainable and untouched. A compiled model (``torch.compile``'s wrapper or
    :func:`rapidnet.deploy.compile_for_cpu`) is unwrapped to the module it compiled: exports never carry compiled
    code. Task models (Semantic FPN) fold their backbone the same way. A model this function made is returned as it
    is: the verbs prepare once and hand the result to a runtime, whose exporter prepares what it is given.
    """
    from rapidnet.models import reparameterize

    if getattr(model, _PREPARED, False):
        return model
    model = getattr(model, "_orig_mod", model)  # torch.compile's OptimizedModule
    model = getattr(model, "plain_module", model)  # compile_for_cpu's wrapper
    if getattr(model, _PREPARED, False):
        return model
    prepared = reparameterize(model).float().cpu().eval()
    prepared = prepared.to(memory_format=torch.contiguous_format)
    setattr(prepared, _PREPARED, True)
    return prepared


def output_names(model: nn.Module) -> list[str]:
    """``["logits"]`` for a classifier or segmenter, ``["features_<stage>", ...]`` for a ``features_only`` backbone."""
    if is_features_model(model):
        return [f"features_{i}" for i in model.feature_info.out_indices]
    return list(getattr(model, "export_output_names", ["logits"]))


def torch_outputs(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    outs = list(out) if isinstance(out, (list, tuple)) else [out]
    return [o.detach().cpu().numpy() for o in outs]


# ---- metadata carried by exported files ----------------------------------------------------------------------------


def preprocess_config(model: nn.Module, resolution: Sequence[int] | None = None) -> dict[str, Any]:
    """The eval preprocessing of ``model`` (timm's data config), at ``resolution`` when given."""
    from timm.data import resolve_data_config

    cfg = dict(resolve_data_config(model=model))
    cfg = {k: cfg[k] for k in PREPROCESS_KEYS if k in cfg}
    if resolution is not None:
        h, w = check_resolution(resolution)
        cfg["input_size"] = (3, h, w)
    return cfg


def eval_transform(config: Mapping[str, Any]) -> Any:
    """timm's eval transform (resize, centre crop, normalise) for a :func:`preprocess_config` dict."""
    from rapidnet.data.transforms import eval_transform as bounded

    return bounded({k: config[k] for k in PREPROCESS_KEYS if k in config})


def export_metadata(model: nn.Module, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """JSON stored with an exported file: preprocessing, output names, the classifier's ``arch`` (the dict
    :func:`rapidnet.models.model_metadata` stores with weights; absent for backbones and task models) and ``extra``
    fields (class names, a task model's evaluation settings)."""
    from rapidnet.models.checkpoint import model_metadata

    meta: dict[str, Any] = {"preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}}
    meta["outputs"] = output_names(model)
    if not is_features_model(model) and not hasattr(model, "export_output_names"):
        with contextlib.suppress(CheckpointError):
            meta["arch"] = model_metadata(model)
    meta.update(extra or {})
    return json.dumps(meta)


def decode_metadata(text: str | bytes | None, path: str | os.PathLike) -> dict[str, Any]:
    """The metadata JSON object of ``path`` (``{}`` when there is none); anything else is a one-line error."""
    if text is None or text == "" or text == b"":
        return {}
    if len(text) > MAX_METADATA_BYTES:
        raise CheckpointError(f"{path} has {len(text)} bytes of {METADATA_KEY!r} metadata, over 1 MiB: re-export it")
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has unreadable {METADATA_KEY!r} metadata ({e}): re-export it") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has unreadable {METADATA_KEY!r} metadata (not a JSON object): re-export it")
    return meta


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, metadata: str) -> Path:
    """The metadata of a file whose format has no slot for it, as ``<file>.json`` beside it (written atomically)."""
    return replace_into(sidecar_path(path), lambda tmp: tmp.write_text(metadata))


def read_sidecar(path: str | os.PathLike) -> dict[str, Any]:
    side = sidecar_path(path)
    if not side.is_file():
        return {}
    return decode_metadata(side.read_bytes(), side)


# ---- comparing outputs ---------------------------------------------------------------------------------------------


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


# ---- a loaded file -------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    """A loaded model file: ``runner(batch)`` returns its outputs as numpy arrays, in graph order.

    ``fixed_batch`` is the batch size the file was exported for (``None``: any). A fixed-batch file is run chunk by
    chunk, the last chunk padded, so callers can hand any batch to any runtime. ``metadata`` is what the file
    carries (preprocessing, outputs, class names; ``{}`` for files made elsewhere).
    """

    path: Path
    runtime: str
    fixed_batch: int | None
    run: Callable[[np.ndarray], list[np.ndarray]]
    metadata: dict[str, Any] = field(default_factory=dict)

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

    @property
    def input_size(self) -> tuple[int, int, int] | None:
        size = (self.metadata.get("preprocess") or {}).get("input_size")
        return tuple(int(s) for s in size) if isinstance(size, (list, tuple)) and len(size) == 3 else None


def file_preprocess(metadata: Mapping[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The preprocessing an exported file's metadata states (lists as tuples, as timm's configs have them), else
    timm's ImageNet eval defaults with a warning (a file made elsewhere)."""
    pre = metadata.get("preprocess")
    if not isinstance(pre, dict) or not pre:
        _logger.warning("%s carries no preprocessing: assuming ImageNet mean/std, bicubic, crop 0.9", path)
        pre = FALLBACK_PREPROCESS
    return {k: tuple(v) if isinstance(v, list) else v for k, v in pre.items()}


class ExportedModel(nn.Module):
    """An exported file behind the interface of a PyTorch classifier: ``forward`` runs the file's runtime on a batch,
    ``pretrained_cfg`` is the preprocessing it carries (so timm's ``resolve_data_config`` and the eval transforms
    work unchanged) and ``num_classes`` what its first output has. ``predict`` and ``eval`` take it where they take
    a checkpoint's model. It holds no parameters: ``.to()``, ``.eval()`` and autocast change nothing.
    """

    def __init__(self, runner: Runner, input_shape: Sequence[Any] = ()) -> None:
        super().__init__()
        self.runner = runner
        meta = runner.metadata
        self.pretrained_cfg = file_preprocess(meta, runner.path)
        fixed = [int(d) for d in list(input_shape)[1:] if isinstance(d, int) and d > 0]
        if "input_size" not in self.pretrained_cfg and len(fixed) == 3:
            self.pretrained_cfg["input_size"] = tuple(fixed)
        if "input_size" not in self.pretrained_cfg:
            raise ConfigError(f"{runner.path} says neither its image size nor its preprocessing: re-export it")
        arch = meta.get("arch") if isinstance(meta.get("arch"), dict) else {}
        self.num_classes = int(arch.get("num_classes", 0) or 0)
        self.outputs = list(meta.get("outputs") or ["logits"])

    @property
    def fixed_size(self) -> tuple[int, int]:
        """The image size the file takes (H, W)."""
        return tuple(self.pretrained_cfg["input_size"][1:])  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outs = [torch.from_numpy(np.asarray(o)) for o in self.runner(x.detach().float().cpu().numpy())]
        return outs[0] if len(outs) == 1 else outs


# ---- the runtime contract ------------------------------------------------------------------------------------------

QUANTIZE_OPTIONS = ("per_channel", "activation_type", "calibrate_method", "op_types", "reduce_range", "preset")


class Runtime:
    """One deployment runtime: its file format, how a model gets there, how a file runs, how int8 is made for it.

    Subclasses set the class attributes and override what they support; the defaults say "not supported" in one
    line. ``export`` writes an fp32 file of the plain folded model (:func:`prepare_model`) with the metadata JSON;
    ``load`` returns a :class:`Runner`; ``quantize`` makes an int8 file with the runtime's own quantizer from the
    model (or the fp32 file ``export`` wrote) and calibration batches; ``bench_runner`` a zero-argument callable
    that runs one forward for the benchmark.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    suffix: ClassVar[str | None] = None  # None: nothing to export (eager backends of the benchmark)
    packages: ClassVar[tuple[str, ...]] = ()
    extra: ClassVar[str] = "deploy"
    fixed_batch: ClassVar[bool] = False  # files are made for one batch size
    runs_here: ClassVar[bool] = True  # files can be run on this OS
    device: ClassVar[str] = "cpu"  # where it runs: the benchmark relates CPU timings to the CPU's matmul peak
    quantizer: ClassVar[str | None] = None  # the int8 quantizer's name; None: no int8
    quantize_options: ClassVar[frozenset[str]] = frozenset()  # options of quantize_model this runtime takes
    bench_load_options: ClassVar[dict[str, Any]] = {}  # extra arguments of load() for the benchmark
    export_options: ClassVar[frozenset[str]] = frozenset()  # extra keyword arguments of export() (Core ML: fp16)
    note: ClassVar[str] = ""  # what an export's check could not cover

    def __repr__(self) -> str:
        return f"<runtime {self.name}>"

    def require(self, purpose: str | None = None) -> None:
        for package in self.packages:
            require(package, purpose or self.title, self.extra)

    def available(self) -> bool:
        return all(importlib.util.find_spec(p) is not None for p in self.packages)

    def check_suffix(self, path: str | os.PathLike, what: str = "output") -> Path:
        path = Path(path)
        if self.suffix is not None and path.suffix.lower() != self.suffix:
            raise ConfigError(f"{self.title} {what} {path} must end in {self.suffix}")
        return path

    def files(self, path: str | os.PathLike) -> list[Path]:
        """Every file an export to ``path`` writes (OpenVINO's .bin, a sidecar): none may be an input."""
        return [Path(path)]

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
        raise ConfigError(f"{self.name} has no file format to export to")

    def load(self, path: str | os.PathLike, threads: int | None = None) -> Runner:
        raise ConfigError(f"{self.title} files cannot be run here")

    def spec_problems(
        self, path: str | os.PathLike, input_shape: Sequence[int], outputs: Mapping[str, Sequence[int]]
    ) -> list[str]:
        """What is wrong with a file's interface, for runtimes that cannot run it here ([] if right)."""
        return []

    def input_shape(self, path: str | os.PathLike) -> list[Any]:
        """The file's input dimensions (N, C, H, W); a dimension that is not fixed is a name or -1."""
        size = (self.read_metadata(path).get("preprocess") or {}).get("input_size") or [3, -1, -1]
        return [-1, *size]

    def read_metadata(self, path: str | os.PathLike) -> dict[str, Any]:
        """The metadata an exported file carries; formats without a slot keep it in a sidecar JSON."""
        return read_sidecar(path)

    def quantize(
        self,
        model: nn.Module | None,
        fp32_path: Path,
        int8_path: Path,
        calibration: Sequence[np.ndarray],
        **options: Any,
    ) -> Path:
        raise ConfigError(f"{self.title} has no int8 quantizer here: choose one of the runtimes that has")

    def quantization_facts(self, **options: Any) -> dict[str, Any]:
        return {"runtime": self.title}

    def bench_setup(self, threads: int) -> dict[str, Any]:
        """Set up process-wide state before the benchmark loads anything; returns facts for its report."""
        return {}

    def matmul_probe(
        self, b: np.ndarray, threads: int, workdir: Path
    ) -> tuple[str, Callable[[np.ndarray], Any]] | None:
        """``(label, x -> x @ b)`` in this runtime, for the benchmark's fp32 peak; None: no probe."""
        return None

    def bench_runner(
        self, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool = False
    ) -> Callable[[], Any]:
        """Export (and quantize, on synthetic calibration: latency does not depend on the ranges), load, and return
        one forward of the raw runtime call."""
        stem = f"{id(model)}_{x.shape[0]}"
        path = self.export(model, workdir / f"{stem}{self.suffix}", tuple(x.shape[-2:]), batch_size=x.shape[0])
        if int8:
            calibration = synthetic_batches(tuple(x.shape))
            path = self.quantize(model, path, workdir / f"{stem}_int8{self.suffix}", calibration)
        runner = self.load(path, threads, **self.bench_load_options)
        arr = np.ascontiguousarray(x.numpy(), dtype=np.float32)
        return lambda: runner.run(arr)


def synthetic_batches(shape: tuple[int, ...], n: int = 4) -> list[np.ndarray]:
    """Seeded Gaussian batches: calibration for a latency benchmark, where the ranges do not matter."""
    return [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(n)]


def metadata_json(fused: nn.Module, resolution: Sequence[int], metadata: str | Mapping[str, Any] | None) -> str:
    """The metadata JSON an export stores: ``metadata`` itself when it is already JSON (the verbs build it once for
    every format), else :func:`export_metadata` of the fused model at ``resolution`` with ``metadata`` as extra
    fields."""
    if isinstance(metadata, str):
        return metadata
    return export_metadata(fused, preprocess_config(fused, resolution), metadata)


def rebatch(batches: Sequence[np.ndarray], size: int, pad: bool = False) -> list[np.ndarray]:
    """The images of ``batches`` regrouped into batches of ``size``: a file made for one batch size calibrates on
    that size. The remainder is dropped, or with ``pad`` filled up with copies of its last image."""
    images = [im for batch in batches for im in np.asarray(batch, dtype=np.float32)]
    out = [np.stack(images[i : i + size]) for i in range(0, len(images) - size + 1, size)]
    rest = images[len(out) * size :]
    if rest and (pad or not out):
        out.append(np.stack(rest + [rest[-1]] * (size - len(rest))))
    return out
