"""``rapidnet export``: the fused model as a file for any runtime (ONNX Runtime, OpenVINO, ExecuTorch, LiteRT,
Core ML, TorchScript, AOTInductor), checked against PyTorch in that runtime.

The file is run through its runtime on a random and a real input; the largest difference from the PyTorch model is
printed, and a mismatch beyond the tolerance exits with status 1. Core ML packages cannot run on Linux: their spec
(input and output names, shapes) is checked and numerical checks are left to macOS. The checkpoint's class names and
preprocessing travel in the file's metadata (or a ``<file>.json`` beside it), so ``rapidnet predict`` and ``eval``
run the file as they run the checkpoint. A Semantic FPN run's checkpoint exports too (``--resolution`` is the image size
the file takes), for ``rapidnet seg eval`` and ``seg predict``, and a Mask R-CNN run's to ONNX Runtime and OpenVINO
(post-processing inside the graph; ``--resolution`` defaults to a square that holds the run's test size), for
``rapidnet det eval`` and ``det predict``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rapidnet import runtimes
from rapidnet.constants import DEFAULT_OPSET
from rapidnet.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export the fused model to ONNX / OpenVINO / ExecuTorch / LiteRT / Core ML / TorchScript / AOTInductor",
        description=__doc__,
    )
    p.add_argument(
        "--model",
        help="variant (rapidnet_ti/s/m/b); with --checkpoint, which names its own, the file is checked against it "
        "(or, for a timm checkpoint without metadata, it names the timm model)",
    )
    p.add_argument("--checkpoint", help="weights (any supported format); without one the weights are random")
    p.add_argument(
        "--format",
        default="onnx",
        type=runtimes.unalias,
        choices=runtimes.file_runtimes(),
        help="the runtime to export for (default: onnx)",
    )
    p.add_argument("--resolution", type=int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)")
    p.add_argument(
        "--dynamic-batch", action="store_true", help="symbolic batch dimension (Core ML: 1..64; not ExecuTorch)"
    )
    p.add_argument("--fp16", action="store_true", help="Core ML: compute in float16 (as the Neural Engine does)")
    p.add_argument("--features-only", action="store_true", help="export the backbone: 4 feature maps, no head")
    p.add_argument(
        "--output", help="output path (default: <model>[_features] with the format's suffix: .onnx, .xml, .pte, ...)"
    )
    p.add_argument("--opset", type=int, help=f"ONNX opset (17 or newer; default {DEFAULT_OPSET})")
    p.add_argument("--tolerance", type=float, default=1e-4, help="allclose rtol=atol vs pytorch (default 1e-4)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch/onnxruntime/OpenVINO threads for the check (default 1)"
    )
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)  # the check runs two small inputs: a thread pool only adds waiting
    try:
        return _export(args)
    finally:
        torch.set_num_threads(threads_before)


def _export(args: argparse.Namespace) -> int:
    from rapidnet.deploy import registry
    from rapidnet.deploy.common import check_resolution, check_writable
    from rapidnet.deploy.dense import export_graph
    from rapidnet.deploy.exporter import export
    from rapidnet.models import create_model, load
    from rapidnet.utils import refuse_overwriting_input

    if args.resolution is not None:
        check_resolution(args.resolution)
    runtime = registry.get(args.format)
    stem = args.model or (Path(args.checkpoint).stem if args.checkpoint else "rapidnet_ti")
    output = args.output or f"{stem}{'_features' if args.features_only else ''}{runtime.suffix}"
    # every file the export writes (OpenVINO's .bin, a sidecar .json) must not be the source either
    refuse_overwriting_input(runtime.files(output), args.checkpoint)
    check_writable(output)
    metadata = {}
    resolution = args.resolution
    if args.checkpoint is not None and not args.features_only:
        model, meta = load(args.checkpoint, model=args.model)  # a classifier, or a task model of a dense run
        if meta.get("task") in (None, "classification"):
            if "class_names" in meta:
                metadata["class_names"] = [str(n) for n in meta["class_names"]]
        else:
            model, metadata = export_graph(model, meta, args.resolution)
            resolution = None  # the graph carries its size
    elif args.checkpoint is not None:
        model, _ = load(args.checkpoint, model=args.model, features_only=True, task="classification")
    else:
        model = create_model(args.model or "rapidnet_ti", features_only=args.features_only)
        print(f"note: no --checkpoint: {args.model or 'rapidnet_ti'} has RANDOM weights (fine for speed, not accuracy)")
    result = export(
        model,
        output,
        args.format,
        resolution=resolution,
        dynamic_batch=args.dynamic_batch,
        fp16=args.fp16,
        opset=args.opset,
        verify=not args.no_verify,
        tolerance=args.tolerance,
        threads=args.threads,
        metadata=metadata,
    )
    print("\n".join(result.lines()))
    if not result.ok:
        print(f"rapidnet export: {result.path} does NOT match PyTorch to {args.tolerance:g} (see above)")
        return 1
    return 0
