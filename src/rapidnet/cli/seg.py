"""``rapidnet seg train|eval|predict``: Semantic FPN on a RapidNet (or timm) backbone, ADE20K-layout data.

Examples: ``rapidnet seg train --config configs/mosaic_semantic_fpn_rapidnet_ti.yaml --data data/mosaic``;
``rapidnet seg eval --checkpoint runs/mosaic_semantic_fpn_rapidnet_ti/model_best.safetensors --data data/mosaic``;
``rapidnet seg predict scene.png --checkpoint runs/.../model_best.safetensors --output overlays``.
"""

from __future__ import annotations

import argparse

from rapidnet.cli._dense import add_dense_parser, run_dense


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:

    return add_dense_parser(sub, "segmentation", __doc__ or "")


def run(args: argparse.Namespace) -> int:

    return run_dense(args, "segmentation")
