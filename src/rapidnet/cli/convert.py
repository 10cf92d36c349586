"""``rapidnet convert SRC DST``: any RapidNet checkpoint (the authors' or ours) to this project's format."""

from __future__ import annotations

import argparse

from rapidnet.models import load_model, reparameterize, save_weights
from rapidnet.models.checkpoint import model_arch


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert a checkpoint to rapidnet safetensors", description=__doc__)
    p.add_argument("src", help="checkpoint: authors' .pth (any wrapper), or this project's file")
    p.add_argument("dst", help="output file (.safetensors recommended; other suffixes use torch.save)")
    p.add_argument("--reparameterize", action="store_true", help="write the fused inference model")
    p.add_argument("--raw-weights", action="store_true", help="take the raw weights, not the EMA ones, when both exist")
    return p


def run(args: argparse.Namespace) -> int:
    model = load_model(args.src, use_ema=not args.raw_weights).eval()
    if args.reparameterize:
        model = reparameterize(model)
    path = save_weights(model, args.dst)
    arch = model_arch(model)
    form = "reparameterized" if arch.reparameterized else "training form"
    print(f"wrote {path}: {arch.describe()}, {arch.num_classes} classes, {form}")
    return 0
