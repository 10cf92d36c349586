"""Where each model's time goes in ExecuTorch (XNNPACK, through ETDump) and OpenVINO (CPU plugin performance
counters): milliseconds per operator kind per forward, batch 1, median over runs, and the interleaved medians.

    python benchmarks/runtime_profile.py --runtime executorch --models rapidnet_ti mobilenetv2_140 --threads 2
    python benchmarks/runtime_profile.py --runtime executorch --no-rewrites     # the plain graph, as before the fix
    python benchmarks/runtime_profile.py --runtime openvino --models rapidnet_ti mobilenetv2_140

Writes ``runtime_profile_<runtime>.json`` in ``--output`` and prints one table per model.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from rapidnet.deploy.bench import build_inference_model
from rapidnet.deploy.executorch import executorch_threads, export_executorch
from rapidnet.deploy.openvino import export_openvino


def profile_executorch(model: torch.nn.Module, path: Path, x: torch.Tensor, rewrites: bool, runs: int) -> dict:
    import executorch.extension.pybindings.portable_lib as portable_lib
    from executorch.devtools import Inspector

    export_executorch(model, path, tuple(x.shape[-2:]), xnnpack_rewrites=rewrites)
    module = portable_lib._load_for_executorch(str(path), enable_etdump=True, debug_buffer_size=0)
    for _ in range(runs):
        module.forward([x])
    etdump = path.with_suffix(".etdp")
    module.write_etdump_result_to_file(str(etdump))
    frames = [block.to_dataframe() for block in Inspector(etdump_path=str(etdump)).event_blocks]
    ops = max(frames, key=len)
    skip = {"Program::load_method", "Method::init", "Method::execute", "DELEGATE_CALL"}
    kinds: dict[str, list[float]] = collections.defaultdict(list)
    for name, p50 in zip(ops.event_name, ops.p50, strict=True):
        if name not in skip:
            kinds[re.sub(r" #\d+$", "", name)].append(float(p50))
    return {kind: (sum(v), len(v)) for kind, v in kinds.items()}


def profile_openvino(model: torch.nn.Module, path: Path, x: torch.Tensor, threads: int, runs: int) -> dict:
    import openvino as ov

    export_openvino(model, path, tuple(x.shape[-2:]))
    config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True}
    request = ov.Core().compile_model(str(path), "CPU", config).create_infer_request()
    per_node: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for _ in range(runs):
        request.infer({0: x.numpy()})
        for info in request.profiling_info:
            if info.status == info.Status.EXECUTED:
                per_node[(info.node_name, f"{info.node_type} ({info.exec_type})")].append(
                    info.real_time.total_seconds() * 1e3
                )
    kinds: dict[str, list[float]] = collections.defaultdict(list)
    for (_, kind), times in per_node.items():
        kinds[kind].append(statistics.median(times))
    return {kind: (sum(v), len(v)) for kind, v in kinds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtime", choices=["executorch", "openvino"], required=True)
    parser.add_argument("--models", nargs="+", default=["rapidnet_ti", "mobilenetv2_140"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=224)
    parser.add_argument("--no-rewrites", action="store_true", help="ExecuTorch: export without the XNNPACK rewrites")
    parser.add_argument("--output", default="runs/profile")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.runtime == "executorch":
        executorch_threads(args.threads)
    x = torch.randn(1, 3, args.resolution, args.resolution)
    report: dict[str, Any] = {"runtime": args.runtime, "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = build_inference_model(name)
            if args.runtime == "executorch":
                kinds = profile_executorch(model, Path(tmp) / f"{name}.pte", x, not args.no_rewrites, args.runs)
            else:
                kinds = profile_openvino(model, Path(tmp) / f"{name}.xml", x, args.threads, args.runs)
            total = sum(t for t, _ in kinds.values())
            report["models"][name] = {
                "total_ms": round(total, 3),
                "kinds": {k: [round(t, 3), n] for k, (t, n) in kinds.items()},
            }
            print(f"{name}: {total:.2f} ms of operator time per forward ({args.runtime}, {args.threads} threads)")
            for kind, (t, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0]):
                print(f"  {kind:44s} {n:3d} ops {t:7.3f} ms {t / total:6.1%}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"runtime_profile_{args.runtime}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
