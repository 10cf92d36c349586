"""``rapidnet data mosaic --out DIR``: build the offline dense data set from Fashion-MNIST garments.

Writes COCO instances (``train/``, ``val/``, ``dev/``, ``annotations/instances_{train,val,dev}.json``) and the
ADE20K layout (``images/``, ``annotations/{training,validation,dev}``) into one folder, the same bytes for the same
seed. The dev split (``--num-dev``) chooses a run's best epoch, so that the val split only reports.
"""

from __future__ import annotations

import argparse
import sys

from rapidnet.cli._args import int_in
from rapidnet.constants import DEFAULT_MOSAIC_STYLE, MAX_OBJECTS, MAX_SCENES, MAX_SEED, MAX_SIDE, MOSAIC_STYLES


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("data", help="build data sets (the Fashion-MNIST mosaic for detection/segmentation)",
                       description=__doc__)  # fmt: skip
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = actions.add_parser("mosaic", help="scenes of Fashion-MNIST garments in COCO and ADE20K formats")
    m.add_argument("--out", required=True, help="output folder (created; must be empty or an older mosaic)")
    scenes = int_in(0, MAX_SCENES)
    m.add_argument("--seed", type=int_in(0, MAX_SEED), default=0)
    m.add_argument("--num-train", type=int_in(1, MAX_SCENES), default=2000, metavar="N")
    m.add_argument("--num-val", type=int_in(1, MAX_SCENES), default=1000, metavar="N")
    m.add_argument("--num-dev", type=scenes, default=500, metavar="N",
                   help="scenes of the dev split that chooses the best epoch (garments from Fashion-MNIST "
                        "training images no train scene uses; 0: none, the best epoch is chosen on val)")  # fmt: skip
    m.add_argument("--image-size", type=int_in(32, MAX_SIDE), default=128, metavar="PX")
    m.add_argument("--min-objects", type=int_in(1, MAX_OBJECTS), default=2)
    m.add_argument("--max-objects", type=int_in(1, MAX_OBJECTS), default=6)
    m.add_argument("--style", choices=MOSAIC_STYLES, default=DEFAULT_MOSAIC_STYLE,
                   help="black: light garments on black, as in Fashion-MNIST (default); dark: on dark grey (a mild "
                        "domain gap); tinted: coloured garments on coloured backgrounds (a larger gap)")  # fmt: skip
    m.add_argument("--fashion-mnist", metavar="DIR", help="folder with the Fashion-MNIST IDX files (default: system)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing mosaic in --out")
    m.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p


def run(args: argparse.Namespace) -> int:
    from rapidnet.data.mosaic import build_mosaic
    from rapidnet.utils import refuse_overwriting_input

    progress = sys.stderr.isatty() if args.progress is None else args.progress
    refuse_overwriting_input(args.out, args.fashion_mnist)  # --overwrite replaces the whole --out folder
    out = build_mosaic(
        args.out,
        seed=args.seed,
        num_train=args.num_train,
        num_val=args.num_val,
        num_dev=args.num_dev,
        image_size=args.image_size,
        min_objects=args.min_objects,
        max_objects=args.max_objects,
        style=args.style,
        fashion_mnist_root=args.fashion_mnist,
        overwrite=args.overwrite,
        progress=progress,
    )
    print(
        f"mosaic data set: {out} ({args.num_train} train / {args.num_val} val / {args.num_dev} dev scenes, "
        f"{args.style} style, seed {args.seed})"
    )
    return 0
