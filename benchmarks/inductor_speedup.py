"""Inductor against eager PyTorch on the CPU: what ``torch.compile`` and AOTInductor gain over the folded model.

Times, in one process with interleaved rounds (a noisy neighbour slows every contestant alike):

* ``eager``: the plain folded model (``rapidnet.reparameterize``) in eager mode, NCHW;
* ``eager-cl``: the same with channels_last weights and input;
* ``torch-compile[<mode>]``: ``rapidnet.deploy.inductor.compile_for_cpu`` of the plain folded model (freezing);
* ``aoti[<static|dynamic>]``: an AOTInductor ``.pt2`` package of it, written and loaded back;

and reports per contestant the median latency, the setup time (compile or export+load), the largest absolute
difference of its outputs from the plain folded eager model, and its speed relative to ``eager``. One JSON line
per result, after one line describing the machine.

    python benchmarks/inductor_speedup.py --batch 1 32 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import rapidnet
from rapidnet.deploy.common import prepare_model
from rapidnet.deploy.inductor import AOTInductor, compile_for_cpu
from rapidnet.utils import cpu_flags, cpu_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="rapidnet_ti", help="RapidNet variant (random weights)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default: 1 32)")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per contestant")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per contestant before the rounds")
    p.add_argument(
        "--compile-modes",
        nargs="*",
        default=["default"],
        help="torch.compile modes to time (e.g. default max-autotune-no-cudagraphs); none: skip torch.compile",
    )
    p.add_argument(
        "--warm-cache",
        action="store_true",
        help="reuse Inductor's on-disk cache (default: a fresh one per contestant, so setup_s is a first compile)",
    )
    p.add_argument(
        "--aoti",
        nargs="*",
        default=["static"],
        choices=["static", "dynamic"],
        help="AOTI packages to time: exported for the batch (static) and/or with a symbolic batch (dynamic)",
    )
    return p.parse_args(argv)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def contestants(
    model: torch.nn.Module, x: torch.Tensor, args: argparse.Namespace, workdir: Path
) -> dict[str, tuple[Callable[[], Any], float]]:
    """name -> (one forward, setup seconds); every contestant has run once."""
    out: dict[str, tuple[Callable[[], Any], float]] = {}

    start = time.perf_counter()
    eager = prepare_model(model)
    out["eager"] = (lambda: _inference(eager, x), time.perf_counter() - start)
    start = time.perf_counter()
    eager_cl = prepare_model(model).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out["eager-cl"] = (lambda: _inference(eager_cl, x_cl), time.perf_counter() - start)

    for mode in args.compile_modes:
        _fresh_cache(args, workdir / f"cache_{x.shape[0]}_compile_{mode}")
        start = time.perf_counter()
        compiled = compile_for_cpu(model, mode=None if mode == "default" else mode)
        compiled(x)  # compiles
        out[f"torch-compile[{mode}]"] = (lambda c=compiled: c(x), time.perf_counter() - start)

    runtime = AOTInductor()
    arr = x.numpy()
    for kind in args.aoti:
        _fresh_cache(args, workdir / f"cache_{x.shape[0]}_aoti_{kind}")
        start = time.perf_counter()
        path = workdir / f"{args.model}_{x.shape[0]}_{kind}.pt2"
        runtime.export(model, path, tuple(x.shape[-2:]), batch_size=x.shape[0], dynamic_batch=kind == "dynamic")
        runner = runtime.load(path, args.threads)
        runner.run(arr)
        out[f"aoti[{kind}]"] = (lambda r=runner: r.run(arr), time.perf_counter() - start)
    return out


def _fresh_cache(args: argparse.Namespace, folder: Path) -> None:
    """An empty Inductor cache for each contestant (unless --warm-cache): setup_s is then a first compile."""
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)


def _inference(model: torch.nn.Module, x: torch.Tensor) -> Any:
    with torch.inference_mode():
        return model(x)


def _as_tensor(out: Any) -> torch.Tensor:
    out = out[0] if isinstance(out, (list, tuple)) else out
    return torch.as_tensor(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = rapidnet.create_model(args.model).eval()
    plain = prepare_model(model)
    emit(
        {
            "machine": cpu_model(),
            "avx512": sorted(f for f in cpu_flags() if f.startswith("avx512")),
            "torch": torch.__version__,
            "threads": args.threads,
            "model": args.model,
            "resolution": args.resolution,
            "rounds": args.rounds,
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batch:
            x = torch.randn(batch, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0))
            ref = _inference(plain, x)
            runs = contestants(model, x, args, Path(tmp))
            diffs = {name: float((_as_tensor(run()) - ref).abs().max()) for name, (run, _) in runs.items()}
            for run, _ in runs.values():
                for _ in range(args.warmup):
                    run()
            times: dict[str, list[float]] = {name: [] for name in runs}
            for r in range(args.rounds):
                for name in runs if r % 2 == 0 else reversed(runs):
                    start = time.perf_counter()
                    runs[name][0]()
                    times[name].append((time.perf_counter() - start) * 1e3)
            base = statistics.median(times["eager"])
            for name, samples in times.items():
                median = statistics.median(samples)
                q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
                emit(
                    {
                        "backend": name,
                        "batch": batch,
                        "median_ms": round(median, 3),
                        "min_ms": round(min(samples), 3),
                        "p25_ms": round(q1, 3),
                        "p75_ms": round(q3, 3),
                        "images_per_s": round(batch / (median / 1e3), 1),
                        "speedup_vs_eager": round(base / median, 3),
                        "setup_s": round(runs[name][1], 2),
                        "max_abs_diff": diffs[name],
                    }
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
