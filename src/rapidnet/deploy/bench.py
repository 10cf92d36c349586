"""Latency and throughput of RapidNet beside its peers, on the same machine, in one interleaved run.

Every model is put in its inference form first (RapidNet reparameterized; timm models through
``timm.utils.reparameterize_model`` where they fold); eager PyTorch runs that form as it is, ``torch-compile``
compiles it with Inductor, and onnxruntime, OpenVINO, ExecuTorch (XNNPACK), LiteRT and CUDA run it as exported, and
their ``-int8`` backends the file each runtime's own quantizer makes
(calibrated on a few synthetic batches: latency does not depend on the ranges). Timings interleave model by model
and backend by backend in each round, so a noisy neighbour slows every contestant alike; the report gives medians
and the interquartile range, the thread count, and each model's achieved GFLOP/s as a fraction of this machine's
fp32 peak: the fastest large matrix multiply that PyTorch, onnxruntime and OpenVINO reach here (the report names
which).
"""

from __future__ import annotations

import contextlib
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

from rapidnet.deploy import registry
from rapidnet.errors import ConfigError
from rapidnet.models import create_model, is_rapidnet, reparameterize
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
    device: str = "cpu"
    times_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    def summary(self, peak_gflops: float | None) -> dict[str, Any]:
        q1, _, q3 = statistics.quantiles(self.times_ms, n=4) if len(self.times_ms) > 1 else [self.median_ms] * 3
        gflops = 2 * self.gmacs * self.batch / (self.median_ms / 1e3) if self.gmacs else None  # files: unknown
        out = {k: v for k, v in asdict(self).items() if k != "times_ms"}
        out.update(
            median_ms=round(self.median_ms, 3),
            p25_ms=round(q1, 3),
            p75_ms=round(q3, 3),
            images_per_s=round(self.batch / (self.median_ms / 1e3), 1),
            achieved_gflops=round(gflops, 1) if gflops else None,
            # of the fp32 peak: an int8 model's arithmetic has another ceiling, and the GPU is not measured
            fraction_of_peak=round(gflops / peak_gflops, 3)
            if gflops and peak_gflops and self.device == "cpu" and not self.backend.endswith("int8")
            else None,
            samples=len(self.times_ms),
        )
        return out


SEGMENTER = "semantic_fpn:"  # "semantic_fpn:<backbone>": ADE20K's Semantic FPN (150 classes) over that backbone


def check_model_names(names: Iterable[str]) -> None:
    """Reject unknown names before any work starts."""
    known = set(timm.list_models())
    for name in names:
        backbone = name.removeprefix(SEGMENTER)
        if not is_rapidnet(backbone) and backbone.split(".")[0] not in known:
            raise ConfigError(
                f"unknown model {name!r}: give a RapidNet variant or any timm model name, or {SEGMENTER}<one of them>"
            )


def build_inference_model(name: str, resolution: Sequence[int] = (512, 512)) -> nn.Module:
    """A model in the form one would deploy: RapidNet fused; timm models reparameterized where they can be.

    RapidNet is the plain folded graph (what the exporters take). ``semantic_fpn:<backbone>`` is
    the exported graph of a Semantic FPN (ADE20K's 150 classes, the paper's 256-channel FPN) at ``resolution``.
    """
    check_model_names([name])
    if name.startswith(SEGMENTER):
        from rapidnet.deploy.dense import SegmenterGraph
        from rapidnet.models.segmentation import semantic_fpn

        model = semantic_fpn(name.removeprefix(SEGMENTER), num_classes=150, drop_path_rate=0.0).eval()
        return timm.utils.reparameterize_model(SegmenterGraph(model, resolution))
    if is_rapidnet(name):
        return reparameterize(create_model(name))
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
        for name in registry.names():
            # a runtime that is missing or cannot build the probe just does not compete
            with contextlib.suppress(Exception):
                runtime = registry.get(name)
                probe = runtime.matmul_probe(b.numpy(), threads, Path(tmp)) if runtime.available() else None
                if probe is not None:
                    label, runner = probe
                    peaks[label] = flops / best_seconds(lambda r=runner: r(a.numpy()), repeats) / 1e9
    best = max(peaks, key=peaks.get)
    return peaks[best], best


# ---- backends: "<runtime>" and "<runtime>-int8", each turned into a zero-argument callable by its runtime -------


def installed_backends() -> list[str]:
    """Every backend this machine can run: CUDA where there is a GPU, the runtimes whose packages are installed."""
    out = []
    for name in registry.backend_names():
        runtime, _ = registry.parse_backend(name)
        if runtime.available():
            out.append(name)
    return out


def available_backends(requested: Iterable[str]) -> list[str]:
    """The one name of each requested backend; unknown names are refused, CUDA is dropped where there is none, and a
    runtime whose package is missing is a one-line error naming the install command."""
    out = []
    for b in requested:
        runtime, _ = registry.parse_backend(b)
        if runtime.device != "cpu" and not runtime.available():
            continue  # an accelerator backend where there is none: skipped, as "every backend here" means
        runtime.require(f"the {b} backend")
        out.append(registry.backend_name(b))
    return out


def make_runner(backend: str, model: nn.Module, x: torch.Tensor, threads: int, workdir: Path) -> Callable[[], Any]:
    runtime, int8 = registry.parse_backend(backend)
    return runtime.bench_runner(model, x, threads, workdir, int8=int8)


def run_benchmark(
    models: Sequence[str] = DEFAULT_MODELS,
    backends: Sequence[str] = ("torch", "torch-cl", "onnx", "onnx-int8"),
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
    # facts each runtime states about its threads (ExecuTorch's pool is per process, sized before the first program)
    thread_facts: dict[str, Any] = {}
    for backend in backends:
        thread_facts |= registry.parse_backend(backend)[0].bench_setup(threads)
    results: dict[tuple[str, str, int], BenchResult] = {}
    runners: dict[tuple[str, str, int], Callable[[], Any]] = {}
    failures: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in tqdm(models, desc="preparing", disable=not progress):
            model = build_inference_model(name, resolution=hw)
            params, gmacs = count_params(model), count_gmacs(model, hw)
            for batch in batch_sizes:
                x = torch.randn(batch, 3, *hw)
                for backend in backends:
                    key = (name, backend, batch)
                    try:
                        runner = make_runner(backend, model, x, threads, Path(tmp))
                        for _ in range(warmup):
                            runner()
                    except ConfigError:
                        raise
                    except Exception as e:  # one peer that cannot export must not sink the whole comparison
                        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
                        failures.append({"model": name, "backend": backend, "batch": batch, "error": reason})
                        continue
                    runners[key] = runner
                    device = registry.parse_backend(backend)[0].device
                    results[key] = BenchResult(name, backend, batch, threads, hw, params, gmacs, device)
        time_interleaved(runners, results, rounds, progress)
    return {
        "machine": _machine_info(threads, peak, peak_source) | thread_facts,
        "results": [res.summary(peak) for res in results.values()],
        "failures": failures,
    }


def time_interleaved(
    runners: dict[Any, Callable[[], Any]], results: dict[Any, BenchResult], rounds: int, progress: bool = True
) -> None:
    """``rounds`` rounds, each running every contestant once, forward then backward order in turn, so that a noisy
    neighbour slows every contestant alike."""
    for r in tqdm(range(rounds), desc="timing rounds", disable=not progress):
        keys = list(runners) if r % 2 == 0 else list(reversed(runners))
        for key in keys:
            start = time.perf_counter()
            runners[key]()
            results[key].times_ms.append((time.perf_counter() - start) * 1e3)


def run_file_benchmark(
    paths: Sequence[str | os.PathLike],
    batch: int | None = None,
    threads: int = 2,
    rounds: int = 20,
    warmup: int = 3,
    progress: bool = True,
) -> dict[str, Any]:
    """Time exported files as they are, each in its own runtime (from the suffix), interleaved as
    :func:`run_benchmark` does. ``batch`` defaults to each file's own (1 where it takes any)."""
    torch.set_num_threads(threads)
    runtimes = [registry.for_path(p) for p in paths]  # every suffix is checked before any work
    for runtime, path in zip(runtimes, paths, strict=True):
        runtime.require(f"running {Path(path).name}")
        if not runtime.runs_here:
            raise ConfigError(f"{runtime.title} files cannot be run on this machine: leave {path} out")
        if not Path(path).exists():
            raise ConfigError(f"model file not found: {path}: check the path")
    peak, peak_source = measure_matmul_peak(threads)
    facts: dict[str, Any] = {}
    for runtime in runtimes:
        facts |= runtime.bench_setup(threads)
    runners: dict[Any, Callable[[], Any]] = {}
    results: dict[Any, BenchResult] = {}
    for runtime, path in zip(runtimes, paths, strict=True):
        shape = runtime.input_shape(path)
        if len(shape) != 4 or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise ConfigError(f"{path} has no fixed image size ({shape}): re-export it at one")
        n = batch or (shape[0] if isinstance(shape[0], int) and shape[0] > 0 else 1)
        loaded = runtime.load(path, threads, **runtime.bench_load_options)
        x = np.random.default_rng(0).standard_normal((n, *shape[1:])).astype(np.float32)
        arch = loaded.metadata.get("arch") if isinstance(loaded.metadata.get("arch"), dict) else {}
        key = (str(path), runtime.name, n)
        runners[key] = lambda r=loaded, x=x: r(x)
        for _ in range(warmup):
            runners[key]()
        name = str(arch.get("arch") or Path(path).name)
        results[key] = BenchResult(name, runtime.name, n, threads, tuple(shape[2:]), 0, 0.0, runtime.device)
    time_interleaved(runners, results, rounds, progress)
    out = [res.summary(None) | {"file": key[0]} for key, res in results.items()]
    return {"machine": _machine_info(threads, peak, peak_source) | facts, "results": out, "failures": []}


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
    for package in ("onnxruntime", "openvino", "nncf", "executorch", "litert-torch", "ai-edge-litert"):
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
            f"{r['achieved_gflops'] or 0:>8.1f} {frac:>7}"
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
