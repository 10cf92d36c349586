"""``rapidnet erf``: the effective receptive field of each stage (Luo et al. 2016, measured as RepLKNet does) beside
the theoretical one, for one or more models: a table or JSON lines, and a PNG of the maps side by side.

t20..t99 are the sides of the smallest centred squares holding 20..99% of the input-gradient map, as fractions of
the input side; the theoretical RF is in pixels. A RapidNet at initialisation (no --checkpoint) has layer scales of
1e-5: its blocks are all but muted and its ERF is that of the stem and downsampling path, so measure trained models.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rapidnet.cli._args import int_in
from rapidnet.constants import FASHION_MNIST_NAME, MAX_SIDE, RF_CAP
from rapidnet.errors import ConfigError

#: the most images one run measures (each costs a forward and a backward pass per stage)
MAX_IMAGES = 100_000


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "erf", help="effective receptive field of each stage, and the theoretical RF", description=__doc__
    )
    p.add_argument(
        "--model",
        nargs="+",
        metavar="NAME",
        help="RapidNet variants or timm model names (default rapidnet_ti when no --checkpoint is given); with "
        "--checkpoint, paired with the files by position: the name checks a file or names the timm model it holds",
    )
    p.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="FILE",
        help="weights to measure (classifier of RapidNet or timm, or a Mask R-CNN / Semantic FPN file: its backbone); "
        "alone, each file says what it holds",
    )
    p.add_argument(
        "--mldc-dilations",
        type=int_in(1, 64),
        nargs="+",
        metavar="D",
        help="dilations of the MLDC branches of the RapidNet variants built by name (the paper's: 2 3)",
    )
    p.add_argument(
        "--stage",
        type=int_in(0, 3),
        nargs="+",
        default=[0, 1, 2, 3],
        metavar="S",
        help="stages to measure: 0..3 are the stride 4, 8, 16, 32 outputs of every model (default all)",
    )
    p.add_argument("--images", type=int_in(0, MAX_IMAGES), default=50, help="images to average over (default 50)")
    p.add_argument(
        "--data",
        default=FASHION_MNIST_NAME,
        help=f"'{FASHION_MNIST_NAME}' (its test split, the default) or a folder of images (all under it, sorted)",
    )
    p.add_argument(
        "--resolution", type=int_in(1, MAX_SIDE), default=224, metavar="PX", help="images resized to PX x PX (224)"
    )
    p.add_argument("--batch-size", type=int_in(1, 1024), default=8, help="images per backward pass (default 8)")
    p.add_argument("--seed", type=int_in(0, 2**31 - 1), default=0, help="Fashion-MNIST subset and RF probes")
    p.add_argument(
        "--rf-cap",
        type=int_in(32, 4096),
        default=RF_CAP,
        metavar="PX",
        help=f"largest probe for the theoretical RF; a larger RF is reported as this, flagged (default {RF_CAP})",
    )
    p.add_argument(
        "--threads",
        type=int_in(1, 1024),
        metavar="N",
        help="CPU threads for the gradients (default: the cores other processes leave free, measured at the start)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per model and stage, a line each")
    p.add_argument("--plot", metavar="PNG", help="write the ERF maps as one PNG: a row per model, a column per stage")
    return p


def _pairs(args: argparse.Namespace) -> list[tuple[str | None, str | None]]:
    """``(model name, checkpoint)`` per model to measure, paired by position."""
    names, files = list(args.model or []), list(args.checkpoint or [])
    if names and len(files) > len(names):
        raise ConfigError(
            f"{len(files)} checkpoints for {len(names)} --model names: give one name per checkpoint (paired by "
            "position), or no --model"
        )
    if not names:
        return [(None, f) for f in files] or [("rapidnet_ti", None)]
    return [(n, files[i] if i < len(files) else None) for i, n in enumerate(names)]


def _label(name: str | None, checkpoint: str | None, meta: dict[str, Any]) -> str:
    backbone = (meta.get("build_args") or {}).get("backbone")
    return str(name or meta.get("arch") or backbone or Path(str(checkpoint)).stem)


def format_table(rows: list[dict[str, Any]], thresholds: list[str]) -> str:
    width = max(12, *(len(r["model"]) for r in rows))
    files = [Path(r["checkpoint"]).name if r["checkpoint"] else "-" for r in rows]
    fwidth = max(10, *(len(f) for f in files))
    head = f"{'model':<{width}} {'checkpoint':<{fwidth}} stage stride " + " ".join(f"{t:>5}" for t in thresholds)
    head += "  theoretical RF (px)"
    lines = [head, "-" * len(head)]
    for r, f in zip(rows, files, strict=True):
        rf = f">={r['theoretical_rf']}" if r["theoretical_rf_clipped"] else str(r["theoretical_rf"])
        fractions = " ".join(f"{r[t]:>5.3f}" for t in thresholds)
        lines.append(f"{r['model']:<{width}} {f:<{fwidth}} {r['stage']:>5} {r['reduction']:>6} {fractions}  {rf:>8}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch

    threads_before = torch.get_num_threads()
    pick_threads = _free_threads(args.threads)  # measured while the rest of the libraries load
    try:
        return _run(args, pick_threads)
    finally:
        torch.set_num_threads(threads_before)  # an in-process caller keeps its own count


def _free_threads(asked: int | None) -> Callable[[], int]:
    """Start measuring what CPU other processes use; the returned call sets and returns the thread count to measure
    on: ``asked`` (``--threads``), else the cores they leave free, as training picks them (``engine/cpu_share``: on
    a shared machine a thread that keeps losing its core stalls every operator at the barrier). The measurement runs
    while the libraries and the images load, so it rarely adds a wait (its window is half a second)."""
    import time

    import torch

    from rapidnet.engine.cpu_share import ThreadGovernor

    most, window, started = torch.get_num_threads(), 0.5, time.perf_counter()
    governor = ThreadGovernor(most, started, interval_s=window) if asked is None and most > 1 else None

    def pick() -> int:
        threads = asked or most
        if governor is not None:
            time.sleep(max(0.0, started + window - time.perf_counter()))
            governor.poll(time.perf_counter())
            threads = governor.threads
            if threads < most:
                print(
                    f"note: other processes are using {governor.others:.1f} cores: measuring on {threads} of {most} "
                    "threads (--threads to choose)",
                    file=sys.stderr,
                )
        torch.set_num_threads(threads)
        return threads

    return pick


def _run(args: argparse.Namespace, pick_threads: Callable[[], int]) -> int:
    import torch

    from rapidnet.analysis.erf import (
        build_model,
        check_model_name,
        check_plot_path,
        load_images,
        measure_erf,
        model_normalization,
        plot_erf,
        stage_features,
    )
    from rapidnet.models import is_rapidnet
    from rapidnet.utils import refuse_overwriting_input

    if args.images < 1:
        raise ConfigError(f"--images {args.images}: measure at least 1 image (default 50)")
    pairs = _pairs(args)
    stages = list(dict.fromkeys(args.stage))
    stride = 4 * 2 ** max(stages)
    if args.resolution < stride:
        raise ConfigError(
            f"--resolution {args.resolution} is too small for stage {max(stages)} (stride {stride}): use at least "
            f"{stride} pixels, so that the stage map is at least 1x1"
        )
    dilations = tuple(args.mldc_dilations) if args.mldc_dilations else None
    if dilations and not any(f is None and is_rapidnet(n or "") for n, f in pairs):
        raise ConfigError(
            "--mldc-dilations applies to the RapidNet variants built by name (--model rapidnet_ti ... without a "
            "checkpoint): none is given"
        )
    plot = check_plot_path(args.plot) if args.plot else None
    if plot is not None:
        refuse_overwriting_input(plot, *(f for _, f in pairs))
    for name, _ in pairs:  # every name before any model is built or file read
        if name is not None:
            check_model_name(name)
    torch.manual_seed(args.seed)
    images = load_images(args.data, args.images, args.resolution, args.seed)  # bad data fails before any model
    if len(images) < args.images:
        print(f"note: {args.data} holds {len(images)} images, fewer than --images {args.images}", file=sys.stderr)
    pick_threads()
    results: list[dict[str, Any]] = []
    thresholds: list[str] = []
    for name, checkpoint in pairs:
        mldc = dilations if checkpoint is None and is_rapidnet(name or "") else None
        model, meta = build_model(name, checkpoint, mldc)
        label = _label(name, checkpoint, meta)
        stage_features(model, stages, label)  # a stage the model lacks: an error before the model is measured
        if checkpoint is None:
            mute = " (RapidNet at initialisation: layer scales of 1e-5 mute its blocks)" if is_rapidnet(label) else ""
            print(f"note: {label} has random weights, no --checkpoint{mute}", file=sys.stderr)
        mean, std = model_normalization(model, meta)
        rows = measure_erf(
            model,
            images,
            stages,
            name=label,
            mean=mean,
            std=std,
            batch_size=args.batch_size,
            rf_cap=args.rf_cap,
            seed=args.seed,
            progress=None,
        )
        for row in rows:
            fractions = {k: v for k, v in row.items() if k.startswith("t") and k[1:2].isdigit()}
            thresholds = list(fractions)
            record = {
                "model": label,
                "checkpoint": None if checkpoint is None else str(checkpoint),
                "stage": row["stage"],
                "reduction": row["reduction"],
                "resolution": row["resolution"],
                "images": row["images"],
                **fractions,
                "theoretical_rf": row["theoretical_rf"],
                "theoretical_rf_clipped": row["theoretical_rf_clipped"],
                "feature_size": row["feature_size"],
                "mldc_dilations": None if mldc is None else list(mldc),
            }
            if args.json:
                print(json.dumps(record), flush=True)
            results.append({**record, "map": row["map"]})
        del model
    if not args.json:
        print(format_table(results, thresholds))
    if plot is not None:
        plot_erf(results, plot)
        print(f"wrote {plot}", file=sys.stderr if args.json else sys.stdout)
    return 0
