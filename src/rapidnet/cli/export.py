"""``rapidnet export``: the fused RapidNet as ONNX, TorchScript, Core ML, OpenVINO IR or ExecuTorch, checked against
PyTorch.

ONNX is run through onnxruntime, TorchScript through torch, OpenVINO IR (``.xml`` + ``.bin``) through OpenVINO's CPU
plugin and ExecuTorch programs (``.pte``, XNNPACK delegate) through ExecuTorch's runtime, on a random and a real
input; the largest difference from the PyTorch model is printed, and a mismatch beyond the tolerance exits with
status 1. Core ML packages
cannot run on Linux: their spec (input and output names, shapes) is checked and numerical checks are left to macOS.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from rapidnet.deploy.export import DEFAULT_OPSET, FORMATS, check_resolution, check_writable, export
from rapidnet.errors import ConfigError
from rapidnet.models import create_model, load
from rapidnet.utils import refuse_overwriting_input


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export the fused model to ONNX / TorchScript / Core ML / OpenVINO / ExecuTorch",
        description=__doc__,
    )
    p.add_argument(
        "--model",
        help="variant (rapidnet_ti/s/m/b); with --checkpoint, which names its own, the file is checked against it "
        "(or, for a timm checkpoint without metadata, it names the timm model)",
    )
    p.add_argument("--checkpoint", help="weights (any supported format); without one the weights are random")
    p.add_argument("--format", default="onnx", choices=list(FORMATS), help="default: onnx")
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="symbolic batch dimension (Core ML: 1..64; not ExecuTorch)"
    )
    p.add_argument("--fp16", action="store_true", help="Core ML: compute in float16 (as the Neural Engine does)")
    p.add_argument("--features-only", action="store_true", help="export the backbone: 4 feature maps, no head")
    p.add_argument("--output", help="output path (default: <model>[_features].onnx|.pt|.mlpackage|.xml|.pte)")
    p.add_argument(
        "--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (17 or newer; default {DEFAULT_OPSET})"
    )
    p.add_argument("--tolerance", type=float, default=1e-4, help="allclose rtol=atol vs pytorch (default 1e-4)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch/onnxruntime/OpenVINO threads for the check (default 1)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    return p


def run(args: argparse.Namespace) -> int:
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the check runs two small inputs: a thread pool only adds waiting
    try:
        return _export(args)
    finally:
        torch.set_num_threads(threads_before)


def _export(args: argparse.Namespace) -> int:
    if args.resolution is not None:
        check_resolution(args.resolution)
    if args.fp16 and args.format != "coreml":
        raise ConfigError("--fp16 applies to --format coreml only: the other formats export fp32")
    stem = args.model or (Path(args.checkpoint).stem if args.checkpoint else "rapidnet_ti")
    output = args.output or f"{stem}{'_features' if args.features_only else ''}{FORMATS[args.format]}"
    # OpenVINO writes its weights to NAME.bin beside NAME.xml: that file must not be the source either
    written = [Path(output), Path(output).with_suffix(".bin")] if args.format == "openvino" else [Path(output)]
    refuse_overwriting_input(written, args.checkpoint)
    check_writable(output)
    if args.checkpoint is not None:
        model, _ = load(args.checkpoint, model=args.model, features_only=args.features_only, task="classification")
    else:
        model = create_model(args.model or "rapidnet_ti", features_only=args.features_only)
        print(f"note: no --checkpoint: {args.model or 'rapidnet_ti'} has RANDOM weights (fine for speed, not accuracy)")
    result = export(
        model,
        output,
        args.format,
        resolution=args.resolution,
        dynamic_batch=args.dynamic_batch,
        fp16=args.fp16,
        opset=args.opset,
        verify=not args.no_verify,
        tolerance=args.tolerance,
        threads=args.threads,
    )
    print("\n".join(result.lines()))
    if not result.ok:
        print(f"rapidnet export: {result.path} does NOT match PyTorch to {args.tolerance:g} (see above)")
        return 1
    return 0
