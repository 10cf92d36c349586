"""A Semantic FPN run in every runtime, fp32 and int8, scored by ``rapidnet seg eval`` beside its checkpoint.

For each runtime: ``rapidnet quantize`` exports the fp32 file (``--save-fp32``) and makes the int8 one with the
runtime's own quantizer (calibrated on training scenes), then ``rapidnet seg eval`` scores the checkpoint and both
files on the same split. Each command runs in a process of its own, as a user would run it. Prints one JSON line per
file and a Markdown table (mIoU and its difference from PyTorch)::

    python benchmarks/dense_runtimes_check.py --checkpoint runs/seg/model_best.safetensors --data data/mosaic \\
        --resolution 160 160 --out runs/dense_runtimes
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "executorch": ".pte", "litert": ".tflite"}


def rapidnet(*argv: object) -> str:
    cmd = [sys.executable, "-m", "rapidnet", *map(str, argv)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def seg_eval(checkpoint: Path, data: str, limit: int | None) -> dict:
    extra = ["--limit", str(limit)] if limit else []
    return json.loads(rapidnet("seg", "eval", "--checkpoint", checkpoint, "--data", data, "--bootstrap", "0",
                               "--json", *extra))  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a Semantic FPN run's model_best.safetensors")
    p.add_argument("--data", required=True, help="its data set (the mosaic's folder)")
    p.add_argument("--resolution", type=int, nargs=2, default=[160, 160], metavar=("H", "W"))
    p.add_argument("--runtimes", nargs="+", default=list(SUFFIX), choices=list(SUFFIX))
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="score a fixed subset of the split (default: all of it)")
    p.add_argument("--out", default="runs/dense_runtimes")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calib = Path(args.data) / "images" / "training"
    reference = seg_eval(Path(args.checkpoint), args.data, args.limit)
    rows = [("pytorch", "fp32", reference, 0.0)]
    print(json.dumps({"runtime": "pytorch", "precision": "fp32", **reference}), flush=True)
    for runtime in args.runtimes:
        fp32, int8 = out / f"seg_fp32{SUFFIX[runtime]}", out / f"seg_int8{SUFFIX[runtime]}"
        start = time.perf_counter()
        rapidnet("quantize", "--checkpoint", args.checkpoint, "--calib", calib, "--calib-size", args.calib_size,
                 "--resolution", *args.resolution, "--output", int8, "--save-fp32", fp32)  # fmt: skip
        seconds = time.perf_counter() - start
        for precision, path in (("fp32", fp32), ("int8", int8)):
            result = seg_eval(path, args.data, args.limit)
            rows.append((runtime, precision, result, seconds))
            print(json.dumps({"runtime": runtime, "precision": precision, "file": str(path), **result}), flush=True)
    print("\n| runtime | precision | mIoU | - PyTorch | mAcc | aAcc |\n|---|---|---|---|---|---|")
    for runtime, precision, r, _ in rows:
        diff = r["mIoU"] - reference["mIoU"]
        print(f"| {runtime} | {precision} | {r['mIoU']:.2f} | {diff:+.2f} | {r['mAcc']:.2f} | {r['aAcc']:.2f} |")


if __name__ == "__main__":
    main()
