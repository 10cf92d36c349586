"""``rapidnet quantize``: int8 post-training quantization for onnxruntime, OpenVINO or ExecuTorch (XNNPACK), each
through its own quantizer, with an fp32-vs-int8 accuracy check in that runtime.

The runtime follows the output's suffix (``.onnx``: onnxruntime's static QDQ; ``.xml``: NNCF for OpenVINO; ``.pte``:
pt2e with ExecuTorch's XNNPACKQuantizer), or ``--runtime``. Calibration images come from a folder, an ImageFolder
root, a folder of Fashion-MNIST IDX files or ``fashion-mnist``. With ``--eval-data`` (a labelled data set) fp32 and
int8 are compared on its held-out split: top-1 of each and how often they agree. A JSON report is written beside the
output (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapidnet.deploy.export import check_resolution
from rapidnet.deploy.quantize import QUANTIZE_RUNTIMES, QUANTIZED_OPS, quantize_model
from rapidnet.errors import ConfigError
from rapidnet.models import load
from rapidnet.utils import refuse_overwriting_input


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="int8 for onnxruntime, OpenVINO or ExecuTorch + accuracy check", description=__doc__
    )
    p.add_argument(
        "--model",
        help="variant (rapidnet_ti/s/m/b) to check the checkpoint against, or the timm model a file without "
        "metadata holds; optional, a checkpoint names its own",
    )
    p.add_argument(
        "--checkpoint", required=True, help="weights (any supported format), or for onnxruntime an fp32 .onnx file"
    )
    p.add_argument(
        "--runtime",
        choices=QUANTIZE_RUNTIMES,
        help="whose quantizer and kernels (default: from --output: .onnx onnxruntime, .xml OpenVINO, .pte ExecuTorch)",
    )
    p.add_argument("--calib", required=True, help="calibration images: folder, data set root, or 'fashion-mnist'")
    p.add_argument("--calib-size", type=int, default=256, help="calibration images (0: all; default 256)")
    p.add_argument("--eval-data", help="labelled data set for the fp32-vs-int8 check (its val/test split)")
    p.add_argument("--eval-size", type=int, default=2000, help="held-out images to compare on (0: all; default 2000)")
    p.add_argument(
        "--output",
        required=True,
        help="int8 model: M_int8.onnx, M_int8.xml (+ .bin) or M_int8.pte; the report goes to M_int8.json",
    )
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument(
        "--method", default="minmax", choices=["minmax", "entropy", "percentile"], help="onnxruntime calibration"
    )
    p.add_argument(
        "--preset",
        default="performance",
        choices=["performance", "mixed"],
        help="NNCF preset for OpenVINO: symmetric (performance) or asymmetric (mixed) activations",
    )
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales instead of per-channel")
    p.add_argument(
        "--all-ops", action="store_true", help="onnxruntime: quantize every op it can (default: Conv/Gemm/MatMul)"
    )
    p.add_argument(
        "--reduce-range",
        choices=("auto", "on", "off"),
        default="auto",
        help="onnxruntime: 7-bit weights, for x86 CPUs without VNNI, whose int8 kernels saturate on 8-bit ones "
        "(auto: on where this CPU is such a one)",
    )
    p.add_argument("--save-fp32", metavar="PATH", help="also keep the fp32 model compared against")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="runtime threads for the accuracy check")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    if args.resolution is not None:
        check_resolution(args.resolution)
    output = Path(args.output)
    written = [output, output.with_suffix(".json")] + ([output.with_suffix(".bin")] if output.suffix == ".xml" else [])
    if args.save_fp32:
        fp32 = Path(args.save_fp32)
        written += [fp32] + ([fp32.with_suffix(".bin")] if fp32.suffix == ".xml" else [])
    refuse_overwriting_input(written, args.checkpoint, args.calib, args.eval_data)
    is_onnx = Path(args.checkpoint).suffix.lower() == ".onnx"
    if is_onnx and args.model:
        raise ConfigError("--model does not apply to an .onnx input: the file is the model")
    if is_onnx and args.save_fp32:
        raise ConfigError("--save-fp32 applies to checkpoints: the .onnx given is already the fp32 model")
    if is_onnx:
        source, names = args.checkpoint, None
    else:
        source, metadata = load(args.checkpoint, model=args.model, task="classification")
        names = [str(n) for n in metadata["class_names"]] if "class_names" in metadata else None
    report = quantize_model(
        source,
        args.output,
        args.calib,
        calib_size=args.calib_size,
        eval_data=args.eval_data,
        eval_size=args.eval_size,
        resolution=args.resolution,
        threads=args.threads,
        batch_size=args.batch_size,
        per_channel=not args.per_tensor,
        calibrate_method=args.method,
        op_types=None if args.all_ops else QUANTIZED_OPS,
        fp32_output=args.save_fp32,
        runtime=args.runtime,
        preset=args.preset,
        reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range],
        class_names=names,
        source_label=args.checkpoint,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0
