"""``rapidnet info``: parameters and GMACs of each variant, training and reparameterized forms."""

from __future__ import annotations

import argparse
import json

from rapidnet.cli._args import int_in
from rapidnet.constants import MAX_CLASSES, MAX_SIDE
from rapidnet.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("info", help="table of variants: parameters and GMACs", description=__doc__)
    p.add_argument("variants", nargs="*", help="variants to show (default: all of rapidnet_ti|s|m|b)")
    p.add_argument("--resolution", type=int, nargs="+", default=[224], metavar="PX", help="H [W] (default 224)")
    p.add_argument(
        "--num-classes", type=int_in(0, MAX_CLASSES), default=1000, help="classifier outputs (0: none; default 1000)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def variant_info(name: str, resolution: tuple[int, int], num_classes: int = 1000) -> dict:
    from rapidnet.models import create_model, reparameterize
    from rapidnet.models.complexity import count_gmacs, count_params

    model = create_model(name, num_classes=num_classes).eval()
    single = create_model(name, num_classes=num_classes, distillation=False)
    fused = reparameterize(model)
    return {
        "model": name,
        "resolution": list(resolution),
        "params": count_params(model),
        "params_no_dist": count_params(single),
        "params_reparam": count_params(fused),
        "gmacs": round(count_gmacs(model, resolution), 6),
        "gmacs_reparam": round(count_gmacs(fused, resolution), 6),
        "backbone_gmacs": round(count_gmacs(create_model(name, features_only=True), resolution), 6),
    }


def format_table(rows: list[dict]) -> str:
    h, w = rows[0]["resolution"]
    head = (
        f"{'model':<12} {'params':>12} {'no dist':>12} {'reparam':>12} "
        f"{'GMACs':>8} {'reparam':>8} {'backbone':>9}   (GMACs at {h}x{w} = FLOPs/2)"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['model']:<12} {r['params']:>12,} {r['params_no_dist']:>12,} {r['params_reparam']:>12,} "
            f"{r['gmacs']:>8.3f} {r['gmacs_reparam']:>8.3f} {r['backbone_gmacs']:>9.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from rapidnet.models import VARIANTS

    names = args.variants or list(VARIANTS)
    for n in names:
        if n not in VARIANTS:
            raise ConfigError(f"unknown variant {n!r}: choose from {', '.join(VARIANTS)}")
    if len(args.resolution) not in (1, 2) or min(args.resolution) < 32 or max(args.resolution) > MAX_SIDE:
        raise ConfigError(f"--resolution takes H or H W, each at least 32 and at most {MAX_SIDE} pixels")
    hw = (args.resolution[0], args.resolution[-1])
    rows = [variant_info(n, hw, args.num_classes) for n in names]
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0
