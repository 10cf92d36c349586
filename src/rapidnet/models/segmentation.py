"""Semantic FPN (Kirillov et al. 2019, the semantic branch of Panoptic FPN) on a RapidNet backbone.

FPN neck (256 channels, 4 levels P2..P5) -> each level brought to stride 4 by repeated conv3x3-norm-ReLU-2x
upsample stages (P2: one conv stage, P3: one stage + up, P4: two, P5: three), summed -> dropout -> 1x1 classifier
-> bilinear x4 upsampling to the input size. This is the paper's ADE20K model (mmsegmentation's ``FPNHead``, 128
head channels, dropout 0.1).

Engine contract: ``model(images, targets)`` with ``images`` a list of ``(3, H, W)`` float tensors in ``[0, 1]``
(or an ``(N, 3, H, W)`` batch) and ``targets`` a list of dicts holding ``sem_seg`` (``(H, W)`` int64, 255 = ignore)
returns ``{"loss_seg": ...}`` in train mode; in eval mode (or without targets) it returns logits ``(N, C, H', W')``
for the zero-padded batch (``H'``, ``W'`` multiples of 32): crop each to its own image size (evaluators do this
with the targets' ``image_size``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from rapidnet.errors import ConfigError
from rapidnet.models.backbone import (
    BackboneWithFPN,
    attach_build_info,
    fpn_backbone,
    pad_images,
    pad_labels,
)
from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE

__all__ = ["SemanticFPN", "SemanticFPNHead", "semantic_fpn"]


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "gn":
        return nn.GroupNorm(32 if channels % 32 == 0 else 1, channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    raise ConfigError(f"head_norm={kind!r} is not understood: use 'gn' (GroupNorm, Kirillov et al.) or 'bn'")


class _ConvNormReLU(nn.Sequential):
    def __init__(self, in_chs: int, out_chs: int, norm: str) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False), _norm(norm, out_chs), nn.ReLU(inplace=True)
        )


class SemanticFPNHead(nn.Module):
    """Brings FPN levels P2..P5 to stride 4 (level k: max(1, k) conv stages, each but P2's followed by a 2x
    upsample), sums them, and classifies: logits at stride 4."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 256,
        channels: int = 128,
        num_levels: int = 4,
        norm: str = "gn",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.scale_heads = nn.ModuleList()
        for level in range(num_levels):
            convs = [_ConvNormReLU(in_channels if i == 0 else channels, channels, norm) for i in range(max(1, level))]
            self.scale_heads.append(nn.ModuleList(convs))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        # Upsampling to the next finer level's exact size (2x when the input is a multiple of 32) keeps odd sizes
        # aligned.
        sizes = [f.shape[-2:] for f in feats]
        out: torch.Tensor | None = None
        for level, (feat, convs) in enumerate(zip(feats, self.scale_heads, strict=True)):
            x = feat
            for i, conv in enumerate(convs):
                x = conv(x)
                if level > 0:
                    x = F.interpolate(x, size=sizes[level - 1 - i], mode="bilinear", align_corners=False)
            out = x if out is None else out + x
        assert out is not None
        return self.classifier(self.dropout(out))


class SemanticFPN(nn.Module):
    """Backbone + FPN neck + :class:`SemanticFPNHead`, with input normalisation and batching built in."""

    def __init__(
        self,
        backbone: BackboneWithFPN,
        num_classes: int,
        head_channels: int = 128,
        head_norm: str = "gn",
        dropout: float = 0.1,
        ignore_index: int = 255,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisor: int = 32,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = SemanticFPNHead(num_classes, backbone.out_channels, head_channels, 4, head_norm, dropout)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.size_divisor = size_divisor
        self.register_buffer("image_mean", torch.tensor(list(image_mean), dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("image_std", torch.tensor(list(image_std), dtype=torch.float32).view(-1, 1, 1))

    def normalize_batch(
        self, images: Sequence[torch.Tensor] | torch.Tensor
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Normalise each image, then zero-pad (zero = the mean colour, as mmsegmentation pads) into a batch."""
        normed = [(im.float() - self.image_mean) / self.image_std for im in images]
        return pad_images(normed, self.size_divisor, 0.0)

    def forward(
        self, images: Sequence[torch.Tensor] | torch.Tensor, targets: Sequence[Mapping[str, Any]] | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        batch, sizes = self.normalize_batch(images)
        feats = list(self.backbone(batch).values())
        logits = F.interpolate(self.head(feats), size=batch.shape[-2:], mode="bilinear", align_corners=False)
        if not self.training or targets is None:
            return logits
        labels = []
        for t, size in zip(targets, sizes, strict=True):
            lab = t["sem_seg"]
            if tuple(lab.shape[-2:]) != size:
                raise ValueError(f"sem_seg of size {tuple(lab.shape[-2:])} does not match its image {size}")
            labels.append(lab.long())
        target = pad_labels(labels, tuple(batch.shape[-2:]), self.ignore_index)
        if not (target != self.ignore_index).any():
            return {"loss_seg": logits.sum() * 0.0}  # nothing labelled: a zero loss that keeps the graph
        return {"loss_seg": F.cross_entropy(logits, target, ignore_index=self.ignore_index)}


def semantic_fpn(
    backbone: str = "rapidnet_m",
    num_classes: int = 150,
    backbone_checkpoint: str | os.PathLike[str] | None = None,
    frozen_bn: bool | str = False,
    trainable_stages: int = 5,
    *,
    fpn_channels: int = 256,
    head_channels: int = 128,
    head_norm: str = "gn",
    dropout: float = 0.1,
    ignore_index: int = 255,
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    backbone_out_indices: Sequence[int] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
    class_names: Sequence[str] | None = None,
) -> SemanticFPN:
    """Semantic FPN over ``backbone`` (a RapidNet variant or a timm model name) for ``num_classes`` classes.

    ``frozen_bn`` and ``trainable_stages`` mean what they mean for :func:`rapidnet.models.detection.mask_rcnn`;
    the default trains BN, as the ADE20K recipe does. ``head_norm`` is ``"gn"`` (GroupNorm, as Kirillov et al.;
    robust to the small batches of CPU runs) or ``"bn"`` (mmsegmentation's SyncBN config).
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes={num_classes!r}: a segmentation needs at least 2 classes")
    neck, build_args = fpn_backbone(
        backbone,
        backbone_checkpoint,
        backbone_out_indices,
        backbone_kwargs,
        drop_path_rate,
        frozen_bn,
        trainable_stages,
        fpn_channels,
        False,
        image_mean,
        image_std,
    )
    head = dict(head_channels=head_channels, head_norm=head_norm, dropout=dropout, ignore_index=ignore_index)
    model = SemanticFPN(
        neck, num_classes, **head, image_mean=build_args["image_mean"], image_std=build_args["image_std"]
    )
    return attach_build_info(model, class_names, **build_args, num_classes=num_classes, **head)
