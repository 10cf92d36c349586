"""``rapidnet quantize``: int8 post-training quantization for ONNX Runtime, OpenVINO, ExecuTorch (XNNPACK) or LiteRT,
each through its own quantizer, with an fp32-vs-int8 accuracy check in that runtime.

The runtime follows the output's suffix (``.onnx``: onnxruntime's static QDQ; ``.xml``: NNCF for OpenVINO; ``.pte``:
pt2e with ExecuTorch's XNNPACKQuantizer; ``.tflite``: ai-edge-quantizer for LiteRT), or ``--runtime``. Calibration
images come from a folder, an ImageFolder root, a folder of Fashion-MNIST IDX files or ``fashion-mnist``. With
``--eval-data`` (a labelled data set) fp32 and int8 are compared on its held-out split: top-1 of each and how often
they agree. A JSON report is written beside the output (same name, ``.json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapidnet import runtimes
from rapidnet.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "quantize", help="int8 for ONNX Runtime, OpenVINO, ExecuTorch or LiteRT + accuracy check", description=__doc__
    )
    p.add_argument(
        "--model",
        help="variant (rapidnet_ti/s/m/b) to check the checkpoint against, or the timm model a file without "
        "metadata holds; optional, a checkpoint names its own",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="weights (any supported format), or an fp32 file of the runtime made by rapidnet export (.onnx, .xml, "
        ".tflite)",
    )
    p.add_argument(
        "--runtime",
        type=runtimes.unalias,
        choices=runtimes.quantizing(),
        help="whose quantizer and kernels (default: from --output: .onnx onnx, .xml openvino, .pte executorch, "
        ".tflite litert)",
    )
    p.add_argument("--calib", required=True, help="calibration images: folder, data set root, or 'fashion-mnist'")
    p.add_argument("--calib-size", type=int, default=256, help="calibration images (0: all; default 256)")
    p.add_argument("--eval-data", help="labelled data set for the fp32-vs-int8 check (its val/test split)")
    p.add_argument("--eval-size", type=int, default=2000, help="held-out images to compare on (0: all; default 2000)")
    p.add_argument(
        "--output",
        required=True,
        help="int8 model: M_int8.onnx, M_int8.xml (+ .bin), M_int8.pte or M_int8.tflite; the report goes to "
        "M_int8.json",
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
    from rapidnet.deploy import registry
    from rapidnet.deploy.common import check_resolution
    from rapidnet.deploy.dense import export_graph
    from rapidnet.deploy.onnx import QUANTIZED_OPS
    from rapidnet.deploy.quantize import quantize_model, runtime_for_output
    from rapidnet.models import load
    from rapidnet.utils import refuse_overwriting_input

    if args.resolution is not None:
        check_resolution(args.resolution)
    output = Path(args.output)
    inputs = (args.checkpoint, args.calib, args.eval_data)
    refuse_overwriting_input([output, output.with_suffix(".json")], *inputs)  # before any other complaint
    runtime = runtime_for_output(args.output, args.runtime)
    written = [*runtime.files(output), output.with_suffix(".json")]
    if args.save_fp32:
        written += runtime.files(args.save_fp32)
    refuse_overwriting_input(written, *inputs)
    is_file = registry.is_exported_file(args.checkpoint)
    if is_file and args.model:
        raise ConfigError(f"--model does not apply to {args.checkpoint}: the file is the model")
    if is_file and args.save_fp32:
        raise ConfigError(f"--save-fp32 applies to checkpoints: {args.checkpoint} is already the fp32 model")
    extra = None
    if is_file:
        source, names = args.checkpoint, None
    else:
        source, metadata = load(args.checkpoint, model=args.model)
        names = [str(n) for n in metadata["class_names"]] if "class_names" in metadata else None
        if metadata.get("task") == "detection":
            raise ConfigError("int8 of a Mask R-CNN run is not built yet: export it in fp32 with 'rapidnet export'")
        if metadata.get("task") not in (None, "classification"):  # a dense run: its exported graph, its settings
            if args.eval_data:
                raise ConfigError(
                    "--eval-data checks classifiers: score both files of a task model with 'rapidnet seg eval'"
                )
            source, extra = export_graph(source, metadata, args.resolution)
            names = None
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
        metadata=extra,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0
