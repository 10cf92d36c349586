"""Task models as exported files: what graph a Semantic FPN exports, and the host-side wrapper that feeds a file the
way the PyTorch model is fed, so that ``rapidnet seg eval`` and ``seg predict`` run an exported file as they run the
checkpoint.

The exported graph (:class:`SegmenterGraph`) takes a normalised batch of a fixed size ``(N, 3, H, W)`` and returns
class logits at that size ``(N, C, H, W)``: backbone, FPN, head and the final upsampling are inside. What stays on
the host (:class:`ExportedSegmenter`) is what the PyTorch model does before its first convolution: resize each image
to the evaluation scale (the data set's transform, as for the checkpoint), normalise with the stored mean and std,
and zero-pad at the bottom and right to the file's size. Zero is the mean colour after normalisation, which is also
what the PyTorch model pads with, so an image that the PyTorch model pads to the file's size gives the same logits
in the file (the mosaic's scenes: exactly). A larger file than an image needs is padded further, which the head's
GroupNorm sees: export at the evaluation size. Argmax and the crop back to each image are the evaluator's, as for
the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rapidnet.deploy.common import ExportedModel, Runner, check_resolution
from rapidnet.errors import ConfigError, DataError

SEGMENTATION = "segmentation"


class SegmenterGraph(nn.Module):
    """The part of a Semantic FPN that is exported: normalised images in, logits at the input's size out."""

    export_output_names = ("logits",)

    def __init__(self, model: nn.Module, resolution: Sequence[int]) -> None:
        super().__init__()
        h, w = check_resolution(resolution)
        step = model.size_divisor
        if h % step or w % step:
            raise ConfigError(
                f"a Semantic FPN file takes sizes divisible by {step}: {h}x{w} is not (e.g. "
                f"{-(-h // step) * step}x{-(-w // step) * step})"
            )
        self.backbone, self.head = model.backbone, model.head
        mean, std = model.image_mean.flatten().tolist(), model.image_std.flatten().tolist()
        # what the verbs read as the file's preprocessing (timm's resolve_data_config reads pretrained_cfg)
        self.pretrained_cfg = {
            "input_size": (3, h, w),
            "mean": tuple(mean),
            "std": tuple(std),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = list(self.backbone(x).values())
        return F.interpolate(self.head(feats), size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmenter_metadata(model: nn.Module, checkpoint_meta: Mapping[str, Any]) -> dict[str, Any]:
    """The fields a segmentation file carries beyond the preprocessing: task, classes, evaluation settings."""
    return {
        "task": SEGMENTATION,
        "class_names": [str(n) for n in checkpoint_meta.get("class_names", [])],
        "eval_args": dict(checkpoint_meta.get("eval_args") or {}),
        "num_classes": int(model.num_classes),
        "ignore_index": int(model.ignore_index),
    }


def export_graph(model: nn.Module, checkpoint_meta: Mapping[str, Any], resolution: Sequence[int] | None) -> Any:
    """``(graph to export, extra metadata)`` for a dense model a checkpoint holds: a Semantic FPN at
    ``resolution``, a Mask R-CNN with its post-processing (:mod:`rapidnet.deploy.detection`; ``resolution``
    defaults to a square that holds the run's test size)."""
    kind = checkpoint_meta.get("task")
    if kind == "detection":
        from rapidnet.deploy.detection import detector_export

        return detector_export(model, checkpoint_meta, resolution)
    if kind == SEGMENTATION:
        if resolution is None:
            raise ConfigError(
                "a Semantic FPN file is made for one image size: pass --resolution H W (the evaluation size, e.g. "
                "160 160 for the mosaic, 512 512 for ADE20K crops)"
            )
        return SegmenterGraph(model, resolution), segmenter_metadata(model, checkpoint_meta)
    raise ConfigError(
        f"exporting a {kind} model is not supported yet: export a classifier, Semantic FPN or Mask R-CNN run"
    )


class ExportedSegmenter(nn.Module):
    """An exported Semantic FPN behind the PyTorch model's call: a list of images (``(3, H, W)`` floats in [0, 1])
    in, padded logits ``(N, C, H_file, W_file)`` out (see the module docstring)."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        self.file = ExportedModel(runner)
        meta = runner.metadata
        if meta.get("task") != SEGMENTATION:
            raise ConfigError(f"{runner.path} is not a segmentation model: use rapidnet predict or eval for it")
        cfg = self.file.pretrained_cfg
        self.register_buffer("mean", torch.tensor(cfg["mean"], dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"], dtype=torch.float32).view(-1, 1, 1))
        self.num_classes = int(meta.get("num_classes") or 0)

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        h, w = self.file.fixed_size
        batch = torch.zeros(len(images), 3, h, w)
        for i, image in enumerate(images):
            ih, iw = image.shape[-2:]
            if ih > h or iw > w:
                raise DataError(
                    f"an image of {ih}x{iw} after resizing does not fit the file's {h}x{w}: export at a size "
                    "that holds the evaluation scale (rapidnet export --resolution H W)"
                )
            batch[i, :, :ih, :iw] = (image.float().cpu() - self.mean) / self.std
        return self.file(batch)
