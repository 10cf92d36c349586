"""Where onnxruntime spends its time: per-operator kernel time of fp32 and int8 models, one run, same settings.

    python benchmarks/ort_profile.py --models rapidnet_ti mobilenetv2_140 --threads 2 --rounds 30

Each model is exported fused (opset 20) and quantized (static QDQ, per-channel int8 weights, calibrated on random
inputs: latency does not depend on the weights), then timed with onnxruntime's own profiler on. The report gives
the median latency and, per operator type, the share of kernel time, milliseconds per forward and node count.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def profile_session(path: Path, threads: int, rounds: int, shape: tuple[int, ...]) -> dict:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    warmup = 10
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: collections.Counter[str] = collections.Counter()
    nodes: collections.Counter[str] = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] += event["dur"]
            nodes[op] += 1
    runs = warmup + rounds
    total = sum(per_op.values())
    return {
        "median_ms": round(statistics.median(times), 3),
        "ops": [
            {"op": op, "share": round(t / total, 4), "ms_per_run": round(t / runs / 1e3, 3), "nodes": nodes[op] // runs}
            for op, t in per_op.most_common()
        ],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["rapidnet_ti", "mobilenetv2_140"])
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()

    import torch

    from rapidnet.deploy.bench import build_inference_model
    from rapidnet.deploy.onnx import export_onnx, quantize_onnx

    torch.set_num_threads(args.threads)
    shape = (1, 3, args.resolution, args.resolution)
    report: dict = {"threads": args.threads, "resolution": args.resolution, "models": {}}
    with tempfile.TemporaryDirectory(prefix="rapidnet-ort-profile-") as tmp:
        for name in args.models:
            fp32 = export_onnx(build_inference_model(name), Path(tmp) / f"{name}.onnx", resolution=shape[2:])
            calibration = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(4)]
            int8 = quantize_onnx(fp32, Path(tmp) / f"{name}_int8.onnx", calibration)
            fp32_profile = profile_session(fp32, args.threads, args.rounds, shape)
            int8_profile = profile_session(int8, args.threads, args.rounds, shape)
            report["models"][name] = {
                "fp32": fp32_profile,
                "int8": int8_profile,
                "int8_over_fp32": round(int8_profile["median_ms"] / fp32_profile["median_ms"], 3),
            }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
