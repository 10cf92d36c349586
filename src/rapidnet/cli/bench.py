"""``rapidnet bench``: RapidNet beside its peers, latency and throughput, on this machine in one interleaved run.

``--models`` takes RapidNet variants, timm model names and ``semantic_fpn:<backbone>`` (the Semantic FPN graph a
segmentation run exports); ``--backends`` the runtimes, ``<runtime>-int8`` for their int8 files. ``--checkpoint``
times exported files as they are instead, each in its own runtime.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rapidnet import runtimes
from rapidnet.cli._args import int_in
from rapidnet.constants import MAX_BATCH, MAX_SIDE, MIN_SIDE
from rapidnet.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="latency/throughput of RapidNet and peers", description=__doc__)
    p.add_argument(
        "--models",
        nargs="+",
        help="RapidNet variants, timm model names, semantic_fpn:<backbone> (default: rapidnet_ti and the mobile "
        "peers of rapidnet.deploy.bench.DEFAULT_PEERS)",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="FILE",
        help="exported files (.onnx, .xml, .pte, .tflite, .pt2) to time as they are, instead of --models/--backends",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        help=f"of {', '.join(runtimes.backend_names())} (default: every one installed here; cuda is skipped where "
        "absent)",
    )
    side = int_in(MIN_SIDE, MAX_SIDE)
    p.add_argument("--resolution", type=side, nargs="+", default=[224], metavar="PX", help="H [W]")
    p.add_argument("--batch", type=int_in(1, MAX_BATCH), help="latency batch size (default 1; files: their own)")
    p.add_argument(
        "--throughput-batch", type=int_in(0, MAX_BATCH), default=0, help="also time this batch size (0: skip)"
    )
    p.add_argument(
        "--threads", type=int_in(1, 1024), default=2, help="threads for every backend (PyTorch, each runtime)"
    )
    p.add_argument("--rounds", type=int_in(1, 100_000), default=20, help="interleaved timing rounds")
    p.add_argument("--accuracies", help="JSON {model: top1} of measured accuracies for the plot")
    p.add_argument("--output", default="runs/bench", help="folder for bench.json and latency_vs_top1.png")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p


def run(args: argparse.Namespace) -> int:
    from rapidnet.deploy.bench import (
        DEFAULT_MODELS,
        format_table,
        installed_backends,
        load_accuracies,
        plot_latency_vs_accuracy,
        run_benchmark,
        run_file_benchmark,
    )
    from rapidnet.deploy.common import check_writable
    from rapidnet.utils import atomic_write, refuse_overwriting_input

    if len(args.resolution) not in (1, 2):
        raise ConfigError("--resolution takes H or H W")
    if args.threads < 1 or args.rounds < 1 or (args.batch is not None and args.batch < 1):
        raise ConfigError("--threads, --rounds and --batch must be at least 1")
    if args.checkpoint and args.backends:
        raise ConfigError("--backends times models: a file given with --checkpoint runs in its own runtime")
    batches = [args.batch or 1] + ([args.throughput_batch] if args.throughput_batch else [])
    accuracies = load_accuracies(args.accuracies)
    out = Path(args.output)
    written = [out / "bench.json", out / "latency_vs_top1.png"]
    refuse_overwriting_input(written, *(args.checkpoint or []), args.accuracies)
    check_writable(written[0])  # now, not after minutes of timing
    if args.checkpoint:
        report = run_file_benchmark(args.checkpoint, args.batch, args.threads, args.rounds)
    else:
        backends = args.backends or installed_backends()
        models = args.models or list(DEFAULT_MODELS)
        report = run_benchmark(
            models, backends, (args.resolution[0], args.resolution[-1]), batches, args.threads, args.rounds
        )
    atomic_write(written[0], lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    plot_backend = next(
        (b for b in ("onnx", "torch", "torch-cl") if any(r["backend"] == b for r in report["results"])), None
    )
    plot = (
        plot_latency_vs_accuracy(report, accuracies, plot_backend, out / "latency_vs_top1.png", args.batch or 1)
        if plot_backend
        else None
    )
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    print(f"wrote {out / 'bench.json'}" + (f" and {plot}" if plot else ""))
    return 0
