"""``rapidnet convert SRC DST``: any classifier checkpoint (the authors' or ours) to this project's format.

The result rebuilds itself (``rapidnet.load``): the architecture is in its metadata, and the class names and eval
transform of a checkpoint this project wrote are carried over.
"""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="convert a checkpoint to rapidnet safetensors", description=__doc__)
    p.add_argument("src", help="checkpoint: authors' .pth (any wrapper), or this project's file")
    p.add_argument("dst", help="output file (.safetensors recommended; other suffixes use torch.save)")
    p.add_argument("--model", help="the timm model a checkpoint without metadata holds")
    p.add_argument("--reparameterize", action="store_true", help="write the fused inference model")
    p.add_argument("--raw-weights", action="store_true", help="take the raw weights, not the EMA ones, when both exist")
    return p


def run(args: argparse.Namespace) -> int:
    from rapidnet.models import RapidNet, load, reparameterize, save_weights
    from rapidnet.models.checkpoint import model_arch
    from rapidnet.utils import refuse_overwriting_input

    refuse_overwriting_input(args.dst, args.src)
    model, meta = load(args.src, model=args.model, use_ema=not args.raw_weights, task="classification")
    if args.reparameterize:
        model = reparameterize(model)
    kept = {k: json.dumps(meta[k]) for k in ("class_names", "pretrained_cfg") if k in meta}
    path = save_weights(model, args.dst, kept)
    if isinstance(model, RapidNet):
        arch = model_arch(model)
        form = "reparameterized" if arch.reparameterized else "training form"
        print(f"wrote {path}: {arch.describe()}, {arch.num_classes} classes, {form}")
    else:
        print(f"wrote {path}: timm model {meta['arch']}, {getattr(model, 'num_classes', 0)} classes")
    return 0
