"""Latency and throughput of RapidNet beside its peers, on the same machine, in one interleaved run.

Every model is put in its inference form first (RapidNet reparameterized; timm models through
``timm.utils.reparameterize_model`` where they fold); the eager PyTorch CPU backends run RapidNet through
:func:`rapidnet.deploy.cpu.optimize` (its eager-CPU form); onnxruntime, OpenVINO, ExecuTorch (XNNPACK) and CUDA run
the plain folded model as exported, and their ``-int8`` backends the file each runtime's own quantizer makes
(calibrated on a few synthetic batches: latency does not depend on the ranges). Timings interleave model by model
and backend by backend in each round, so a noisy neighbour slows every contestant alike; the report gives medians
and the interquartile range, the thread count, and each model's achieved GFLOP/s as a fraction of this machine's
fp32 peak: the fastest large matrix multiply that PyTorch, onnxruntime and OpenVINO reach here (the report names
which).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn
from tqdm import tqdm

from rapidnet.deploy import cpu
from rapidnet.deploy.export import export_executorch, export_onnx, export_openvino
from rapidnet.deploy.quantize import quantize_executorch, quantize_onnx, quantize_openvino
from rapidnet.deploy.runtimes import executorch_method, executorch_threads, openvino_session, ort_session, require
from rapidnet.errors import ConfigError
from rapidnet.models import RapidNet, create_model, is_rapidnet, reparameterize
from rapidnet.models.complexity import count_gmacs, count_params
from rapidnet.utils import cpu_model

DEFAULT_PEERS = (
    "mobilenetv2_140",
    "mobilenetv2_100",
    "efficientformerv2_s0",
    "fastvit_t8",
    "repvit_m1",
    "mobileone_s1",
    "mobilenetv4_conv_small",
    "mobilenetv4_conv_medium",
)
DEFAULT_MODELS = ("rapidnet_ti", *DEFAULT_PEERS)
BACKENDS = (
    "torch",
    "torch-cl",
    "ort-fp32",
    "ort-int8",
    "openvino",
    "openvino-int8",
    "executorch",
    "executorch-int8",
    "cuda",
)
CPU_BACKENDS = tuple(b for b in BACKENDS if b != "cuda")
# The backends whose runtime is an optional package, and the package.
_BACKEND_PACKAGES = {
    "ort-fp32": "onnxruntime",
    "ort-int8": "onnxruntime",
    "openvino": "openvino",
    "openvino-int8": "nncf",
    "executorch": "executorch",
    "executorch-int8": "executorch",
}

# ImageNet-1K top-1 as reported in each model's paper (used for the accuracy-latency plot when no results file is
# given). Only figures we can source: SPEC.md quotes the RapidNet paper for these two.
PAPER_TOP1: dict[str, tuple[float, str]] = {
    "rapidnet_ti": (76.3, "RapidNet paper"),
    "mobilenetv2_140": (74.7, "RapidNet paper (MobileNetV2 x1.4)"),
}


@dataclass
class BenchResult:
    model: str
    backend: str
    batch: int
    threads: int
    resolution: tuple[int, int]
    params: int
    gmacs: float
    times_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def summary(self, peak_gflops: float | None) -> dict[str, Any]:
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4) if len(self.times_ms) > 1 else [self.median_ms] * 3
        gflops = 2 * self.gmacs * self.batch / (self.median_ms / 1e3)
        out = {k: v for k, v in asdict(self).items() if k != "times_ms"}
        out.update(
            median_ms=round(self.median_ms, 3),
            p25_ms=round(q1, 3),
            p75_ms=round(q3, 3),
            images_per_s=round(self.batch / (self.median_ms / 1e3), 1),
            achieved_gflops=round(gflops, 1),
            # of the fp32 peak: an int8 model's arithmetic has another ceiling, and the GPU is not measured
            fraction_of_peak=round(gflops / peak_gflops, 3)
            if peak_gflops and self.backend != "cuda" and not self.backend.endswith("int8")
            else None,
            samples=len(self.times_ms),
        )
        return out


def check_model_names(names: Iterable[str]) -> None:
    """Reject unknown names before any work starts."""
    known = set(timm.list_models())
    for name in names:
        if not is_rapidnet(name) and name.split(".")[0] not in known:
            raise ConfigError(f"unknown model {name!r}: give a RapidNet variant or any timm model name")


def build_inference_model(name: str, cpu_optimized: bool = False) -> nn.Module:
    """A model in the form one would deploy: RapidNet fused; timm models reparameterized where they can be.

    RapidNet is the plain folded graph (what the exporters take), or with ``cpu_optimized`` its eager-CPU form
    (:func:`rapidnet.deploy.cpu.optimize`); the flag changes nothing for timm models.
    """
    check_model_names([name])
    if is_rapidnet(name):
        fused = reparameterize(create_model(name))
        return cpu.optimize_(fused) if cpu_optimized else fused
    model = timm.create_model(name, pretrained=False).eval()
    return timm.utils.reparameterize_model(model)


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after three untimed ones: a peak probe wants the best case."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_matmul_peak(threads: int, size: int = 1024, repeats: int = 10) -> tuple[float, str]:
    """The fastest fp32 GFLOP/s of a large square matmul among the runtimes installed (PyTorch's sgemm,
    onnxruntime's MLAS, OpenVINO's oneDNN): the ceiling a conv net can hope to approach, and who reached it.

    Measuring only PyTorch would understate the peak: OpenVINO runs RapidNet faster than PyTorch's sgemm here.
    """
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    flops = 2 * size**3
    peaks = {f"PyTorch {torch.__version__} matmul": flops / best_seconds(lambda: a @ b, repeats) / 1e9}
    with tempfile.TemporaryDirectory() as tmp:
        for label, runner in _runtime_matmuls(b, threads, Path(tmp)):
            with contextlib.suppress(Exception):  # a runtime that cannot build the probe just does not compete
                peaks[label] = flops / best_seconds(lambda r=runner: r(a.numpy()), repeats) / 1e9
    best = max(peaks, key=peaks.get)
    return peaks[best], best


def _runtime_matmuls(b: torch.Tensor, threads: int, workdir: Path) -> Iterable[tuple[str, Callable[[Any], Any]]]:
    """``x @ b`` in onnxruntime and OpenVINO, where installed (the model is a single MatMul with ``b`` constant)."""
    if importlib.util.find_spec("onnxruntime") and importlib.util.find_spec("onnx"):
        import onnx
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper

        n = b.shape[0]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", "b"], ["y"])],
            "matmul",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
            [numpy_helper.from_array(b.numpy(), "b")],
        )
        path = workdir / "matmul.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        session = ort_session(path, threads, config_entries={"session.intra_op.allow_spinning": "0"})
        yield f"onnxruntime {onnxruntime.__version__} MatMul (MLAS)", lambda x: session.run(None, {"x": x})
    if importlib.util.find_spec("openvino"):
        import openvino as ov
        from openvino import opset13 as ops

        x = ops.parameter(list(b.shape), ov.Type.f32)
        model = ov.Model([ops.matmul(x, ops.constant(b.numpy()), False, False)], [x])
        compiled = ov.Core().compile_model(
            model, "CPU", {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads}
        )
        yield f"OpenVINO {ov.__version__} MatMul (oneDNN)", lambda x: compiled(x)


# ---- backends: each turns (model, example input) into a zero-argument callable that runs one forward ------------


def _torch_runner(model: nn.Module, x: torch.Tensor, channels_last: bool) -> Callable[[], Any]:
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def run() -> Any:
        with torch.inference_mode():
            return model(x)

    return run


def _cuda_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    model = model.cuda().to(memory_format=torch.channels_last)
    x = x.cuda().contiguous(memory_format=torch.channels_last)

    def run() -> Any:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
            out = model(x)
        torch.cuda.synchronize()
        return out

    return run


def _ort_runner(model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool) -> Callable[[], Any]:

    path = workdir / f"{id(model)}_{x.shape[0]}.onnx"
    export_onnx(model, path, resolution=tuple(x.shape[-2:]), batch_size=x.shape[0])
    if int8:
        path = quantize_onnx(path, workdir / f"{path.stem}_int8.onnx", _calibration_batches(x))
    # no spin-waiting: idle onnxruntime workers would otherwise steal the cores of the next (interleaved) contestant
    session = ort_session(path, threads, config_entries={"session.intra_op.allow_spinning": "0"})
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def _calibration_batches(x: torch.Tensor, n: int = 4) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal(tuple(x.shape)).astype(np.float32) for i in range(n)]


def _openvino_runner(model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool) -> Callable[[], Any]:
    path = workdir / f"{id(model)}_{x.shape[0]}.xml"
    export_openvino(model, path, resolution=tuple(x.shape[-2:]), batch_size=x.shape[0])
    if int8:
        path = quantize_openvino(path, workdir / f"{path.stem}_int8.xml", _calibration_batches(x))
    compiled = openvino_session(path, threads)
    arr = x.numpy()
    return lambda: compiled(arr)


def _executorch_runner(model: nn.Module, x: torch.Tensor, threads: int, workdir: Path, int8: bool) -> Callable[[], Any]:
    path = workdir / f"{id(model)}_{x.shape[0]}{'_int8' if int8 else ''}.pte"
    hw = tuple(x.shape[-2:])
    if int8:
        calibration = [torch.from_numpy(a) for a in _calibration_batches(x)]
        quantize_executorch(model, path, calibration, hw, batch_size=x.shape[0])
    else:
        export_executorch(model, path, hw, batch_size=x.shape[0])
    method = executorch_method(path)
    inputs = [x.contiguous()]
    return lambda: method.execute(inputs)


def make_runner(backend: str, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path) -> Callable[[], Any]:
    if backend == "torch":
        return _torch_runner(model, x, channels_last=False)
    if backend == "torch-cl":
        return _torch_runner(model, x, channels_last=True)
    if backend in ("ort-fp32", "ort-int8"):
        return _ort_runner(model, x, threads, workdir, int8=backend == "ort-int8")
    if backend in ("openvino", "openvino-int8"):
        return _openvino_runner(model, x, threads, workdir, int8=backend.endswith("int8"))
    if backend in ("executorch", "executorch-int8"):
        return _executorch_runner(model, x, threads, workdir, int8=backend.endswith("int8"))
    if backend == "cuda":
        return _cuda_runner(model, x)
    raise ConfigError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")


def installed_backends() -> list[str]:
    """Every backend this machine can run: CUDA where there is a GPU, the runtimes whose packages are installed."""
    return [
        b
        for b in BACKENDS
        if (b != "cuda" or torch.cuda.is_available())
        and (b not in _BACKEND_PACKAGES or importlib.util.find_spec(_BACKEND_PACKAGES[b]) is not None)
    ]


def available_backends(requested: Iterable[str]) -> list[str]:
    """Reject unknown names; drop CUDA where there is none, and a runtime backend whose package is missing (a
    one-line error naming the install command)."""
    out = []
    for b in requested:
        if b not in BACKENDS:
            raise ConfigError(f"unknown backend {b!r}: choose from {', '.join(BACKENDS)}")
        if b == "cuda" and not torch.cuda.is_available():
            continue
        if b in _BACKEND_PACKAGES:
            require(_BACKEND_PACKAGES[b], f"the {b} backend")
        out.append(b)
    return out


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    backends: Sequence[str] = ("torch", "torch-cl", "ort-fp32", "ort-int8"),
    resolution: int | tuple[int, int] = 224,
    batch_sizes: Sequence[int] = (1,),
    threads: int = 2,
    rounds: int = 20,
    warmup: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Time every (model, backend, batch) in interleaved rounds; returns a JSON-ready report."""

    hw = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if min(hw) < 32:
        raise ConfigError(f"resolution {hw} is below 32 pixels: RapidNet downsamples by 32")
    check_model_names(models)
    torch.set_num_threads(threads)
    backends = available_backends(backends)
    peak, peak_source = measure_matmul_peak(threads)
    # ExecuTorch's thread pool is per process and can only be sized before its first program is loaded
    et_threads = executorch_threads(threads) if any(b.startswith("executorch") for b in backends) else None
    results: dict[tuple[str, str, int], BenchResult] = {}
    runners: dict[tuple[str, str, int], Callable[[], Any]] = {}
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(models, desc="preparing", disable=not progress):
            model = build_inference_model(name)
            params, gmacs = count_params(model), count_gmacs(model, hw)
            for batch in batch_sizes:
                x = torch.randn(batch, 3, *hw)
                for backend in backends:
                    key = (name, backend, batch)
                    try:
                        runner = make_runner(backend, _copy_for(backend, model), x, threads, Path(tmp))
                        for _ in range(warmup):
                            runner()
                    except ConfigError:
                        raise
                    except Exception as e:  # one peer that cannot export must not sink the whole comparison
                        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
                        failures.append({"model": name, "backend": backend, "batch": batch, "error": reason})
                        continue
                    runners[key] = runner
                    results[key] = BenchResult(name, backend, batch, threads, hw, params, gmacs)
        for r in tqdm(range(rounds), desc="timing rounds", disable=not progress):
            keys = list(runners) if r % 2 == 0 else list(reversed(runners))
            for key in keys:
                start = time.perf_counter()
                runners[key]()
                results[key].times_ms.append((time.perf_counter() - start) * 1e3)
    return {
        "machine": _machine_info(threads, peak, peak_source)
        | ({"executorch_threads": et_threads} if et_threads else {}),
        "results": [res.summary(peak) for res in results.values()],
        "failures": failures,
    }


def _copy_for(backend: str, model: nn.Module) -> nn.Module:
    """The model each backend runs: the eager CPU backends get RapidNet's eager-CPU form (a copy), the others the
    plain folded model; backends that convert a model in place (channels_last, CUDA) get their own copy."""

    if backend in ("torch", "torch-cl") and any(isinstance(m, RapidNet) for m in model.modules()):
        return cpu.optimize(model)
    return copy.deepcopy(model) if backend in ("torch-cl", "cuda") else model


def _machine_info(threads: int, peak: float, peak_source: str) -> dict[str, Any]:

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "matmul_peak_gflops": round(peak, 1),
        "matmul_peak_source": peak_source,
    }
    for package in ("onnxruntime", "openvino", "nncf", "executorch"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    info["cpu"] = cpu_model() or info["cpu"]
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def format_table(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}, fp32 peak {m['matmul_peak_gflops']} GFLOP/s "
        f"({m.get('matmul_peak_source', 'PyTorch matmul')})",
        f"{'model':<24} {'backend':<15} {'batch':>5} {'params M':>8} {'GMACs':>6} {'median ms':>10} "
        f"{'IQR ms':>15} {'img/s':>8} {'GFLOP/s':>8} {'of peak':>7}",
    ]
    lines.append("-" * len(lines[1]))
    for r in report["results"]:
        frac = f"{r['fraction_of_peak']:.0%}" if r["fraction_of_peak"] is not None else "-"
        lines.append(
            f"{r['model']:<24} {r['backend']:<15} {r['batch']:>5} {r['params'] / 1e6:>8.2f} {r['gmacs']:>6.3f} "
            f"{r['median_ms']:>10.2f} {r['p25_ms']:>7.2f}-{r['p75_ms']:<7.2f} {r['images_per_s']:>8.1f} "
            f"{r['achieved_gflops']:>8.1f} {frac:>7}"
        )
    for f in report.get("failures", []):
        lines.append(f"{f['model']:<24} {f['backend']:<15} {f['batch']:>5} failed: {f['error']}")
    return "\n".join(lines)


def load_accuracies(path: str | Path | None) -> dict[str, tuple[float, str]]:
    """Paper top-1 figures, overridden by a JSON file ``{"model": top1}`` of measured ones."""
    acc = dict(PAPER_TOP1)
    if path:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read accuracies from {path} ({e}): give a JSON object {{model: top1}}") from None
        acc.update({k: (float(v), f"measured ({Path(path).name})") for k, v in data.items()})
    return acc


def plot_latency_vs_accuracy(
    report: dict[str, Any], accuracies: dict[str, tuple[float, str]], backend: str, path: str | Path, batch: int = 1
) -> Path | None:
    """Scatter of median latency (x) against top-1 (y) for models with a known accuracy; None if none has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (r["model"], r["median_ms"], accuracies[r["model"]][0])
        for r in report["results"]
        if r["backend"] == backend and r["batch"] == batch and r["model"] in accuracies
    ]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, ms, top1 in points:
        ours = name.startswith("rapidnet")
        ax.scatter(ms, top1, s=60, marker="*" if ours else "o", color="tab:red" if ours else "tab:blue", zorder=3)
        ax.annotate(name, (ms, top1), textcoords="offset points", xytext=(5, 4), fontsize=8)
    m = report["machine"]
    ax.set_xlabel(f"latency, batch {batch}, {backend} (ms, median) — {m['threads']} threads")
    ax.set_ylabel("ImageNet-1K top-1 (%)")
    ax.set_title("Accuracy vs latency on this machine")
    ax.grid(alpha=0.3)
    sources = sorted({accuracies[n][1] for n, _, _ in points})
    fig.text(0.01, 0.01, "top-1: " + "; ".join(sources), fontsize=6, color="gray")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
