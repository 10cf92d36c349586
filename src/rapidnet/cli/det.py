"""``rapidnet det train|eval|predict``: Mask R-CNN + FPN on a RapidNet (or timm) backbone, COCO-format data.

Examples: ``rapidnet det train --config configs/mosaic_mask_rcnn_rapidnet_ti.yaml --data data/mosaic``;
``rapidnet det eval --checkpoint runs/mosaic_mask_rcnn_rapidnet_ti/model_best.safetensors --data data/mosaic``;
``rapidnet det predict scene.png --checkpoint runs/.../model_best.safetensors --output overlays``.
"""

from __future__ import annotations

import argparse

from rapidnet.cli._dense import add_dense_parser, run_dense


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:

    return add_dense_parser(sub, "detection", __doc__ or "")


def run(args: argparse.Namespace) -> int:

    return run_dense(args, "detection")
