"""Mask R-CNN (detection + instance segmentation) on a RapidNet backbone, built on torchvision's ``MaskRCNN``.

The paper's COCO recipe (mmdetection 2.x there): Mask R-CNN with a 256-channel, 5-level FPN over the four stage
outputs (strides 4..32) plus a max-pooled P6, BN statistics frozen in the backbone. torchvision supplies the RPN,
RoI heads, losses and post-processing; this module supplies the backbone and its FPN (:mod:`rapidnet.models.backbone`).

Engine contract (torchvision detection style): ``model(images, targets)`` with ``images`` a list of ``(3, H, W)``
float tensors in ``[0, 1]`` and ``targets`` a list of dicts (``boxes`` XYXY float, ``labels`` int64 in 1..K,
``masks`` uint8 ``(N, H, W)``) returns a dict of losses in train mode; in eval mode it returns one dict per image
(``boxes``, ``labels``, ``scores``, ``masks`` ``(N, 1, H, W)`` probabilities) in the input image's coordinates.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, _resize_image_and_masks, resize_boxes

from rapidnet.errors import ConfigError
from rapidnet.models.backbone import (
    attach_build_info,
    fpn_backbone,
)
from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE
from rapidnet.models.roi_align import MatmulRoIAlign

__all__ = ["RapidMaskRCNN", "TestSizeTransform", "mask_rcnn"]


class RapidMaskRCNN(MaskRCNN):
    """torchvision's MaskRCNN, except that eval mode ignores targets, so an engine can always pass them.

    (torchvision would otherwise resize the ground-truth masks of every evaluation batch for nothing.)
    """

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor, targets: Sequence[dict] | None = None) -> Any:
        if not self.training:
            targets = None
        elif targets is None:
            raise ValueError("Mask R-CNN in train mode needs targets (boxes, labels, masks): call model.eval() first")
        return super().forward(list(images), None if targets is None else list(targets))

    @contextlib.contextmanager
    def boxes_only(self) -> Iterator[None]:
        """Inside the block, eval mode returns boxes without masks. The mask head runs on every kept detection (up
        to ``box_detections_per_img`` an image, against a few sampled RoIs in training), so an evaluation that needs
        only box AP spends most of its time there."""
        pool = self.roi_heads.mask_roi_pool
        self.roi_heads.mask_roi_pool = None  # torchvision's RoIHeads.has_mask() is then False
        try:
            yield
        finally:
            self.roi_heads.mask_roi_pool = pool


class TestSizeTransform(GeneralizedRCNNTransform):
    """torchvision's resize and normalisation, with an evaluation size of its own.

    ``test_size`` (None: torchvision's, the last ``min_size``) is the shorter side of evaluation images; the longer
    side's cap grows in proportion. A detector trained at one size can read its images enlarged, as FixRes (Touvron
    et al. 2019) does for classifiers: the size is chosen on a dev split, and ``rapidnet det eval --size`` compares.
    """

    def __init__(self, *args: Any, test_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test_size = test_size

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None) -> Any:
        if self.training or self.test_size is None:
            return super().resize(image, target)
        short = int(self.test_size)
        long = round(self.max_size * short / self.min_size[-1])
        h, w = image.shape[-2:]
        image, target = _resize_image_and_masks(image, short, long, target, self.fixed_size)
        if target is not None:
            target["boxes"] = resize_boxes(target["boxes"], [h, w], list(image.shape[-2:]))
        return image, target


def _need_pixels(name: str, value: Any, fix: str) -> None:
    """A one-line ``ConfigError`` unless ``value`` is a positive int (a bool is not one, though Python says so)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: {fix}")


def _anchor_generator(sizes: Sequence[int] | Sequence[Sequence[int]], ratios: Sequence[float]) -> AnchorGenerator:
    levels = tuple(tuple(int(x) for x in s) if isinstance(s, Sequence) else (int(s),) for s in sizes)
    if len(levels) != 5:
        raise ConfigError(f"anchor_sizes has {len(levels)} entries, the FPN has 5 levels: give one size per level")
    return AnchorGenerator(levels, (tuple(float(r) for r in ratios),) * len(levels))


def _roi_pools(canonical_scale: int) -> dict[str, MatmulRoIAlign]:
    """torchvision's box (7x7) and mask (14x14) RoI poolers over P2..P5, with the faster CPU RoIAlign of
    :mod:`rapidnet.models.roi_align` on small maps and the FPN level mapper's canonical scale (the box side pooled from
    P4) set to ``canonical_scale``. On the mosaic, 32 (the garments' pretraining size) did worse than 224
    (``docs/results.md``), so 224 stays the default."""
    if not isinstance(canonical_scale, int) or canonical_scale < 1:
        raise ConfigError(
            f"roi_canonical_scale={canonical_scale!r}: give the box side in pixels that maps to P4 "
            "(torchvision's default is 224)"
        )
    names = ["0", "1", "2", "3"]
    return {
        "box_roi_pool": MatmulRoIAlign(names, 7, 2, canonical_scale=canonical_scale),
        "mask_roi_pool": MatmulRoIAlign(names, 14, 2, canonical_scale=canonical_scale),
    }


def mask_rcnn(
    backbone: str = "rapidnet_m",
    num_classes: int = 80,
    backbone_checkpoint: str | os.PathLike[str] | None = None,
    frozen_bn: bool | str = True,
    trainable_stages: int = 5,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    *,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] | Sequence[Sequence[int]] | None = None,
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    image_mean: Sequence[float] | None = None,
    image_std: Sequence[float] | None = None,
    backbone_out_indices: Sequence[int] | None = None,
    backbone_kwargs: Mapping[str, Any] | None = None,
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
    class_names: Sequence[str] | None = None,
    roi_canonical_scale: int = 224,
    test_size: int | None = None,
    mask_head_channels: int = 256,
    **kwargs: Any,
) -> RapidMaskRCNN:
    """Mask R-CNN + FPN (256 channels, 5 levels) over ``backbone``.

    Args:
        backbone: a RapidNet variant (``rapidnet_ti/s/m/b``) or a timm model name (e.g. ``mobilenetv2_140``).
        num_classes: object classes, background *excluded* (torchvision's head gets ``num_classes + 1``).
        backbone_checkpoint: weights for the backbone: any RapidNet checkpoint (authors' or ours, classification
            ones included) or a timm classification checkpoint of the same model.
        frozen_bn: True / ``"frozen"``: FrozenBatchNorm2d (statistics and affine fixed, the paper's "BN statistics
            frozen"); ``"eval"``: BN kept in eval mode with a trained affine (mmdetection's ``norm_eval``);
            False / ``"train"``: ordinary BN.
        trainable_stages: how many of the five backbone units (stem, stage 0..3), counted from the top, are trained.
        min_size, max_size: torchvision's resize (shorter side ``min_size``, a tuple means multi-scale training,
            longer side at most ``max_size``); the 1x recipe is 800 / 1333.
        test_size: the shorter side of evaluation images (default: the last ``min_size``), the longer side's cap
            scaled with it (:class:`TestSizeTransform`).
        mask_head_channels: the width of the mask head's four 3x3 convs and deconv (Mask R-CNN's: 256). On small
            images the head on each positive RoI is most of a training step's FLOPs (``docs/results.md``).
        anchor_sizes: one anchor size per FPN level (default 32, 64, 128, 256, 512); smaller for small images.
        image_mean, image_std: input normalisation; default the backbone's (ImageNet's).
        backbone_kwargs: extra arguments for the backbone (e.g. ``depths``/``widths`` of a custom RapidNet).
        drop_path_rate: the backbone's stochastic depth (RapidNet or timm), the one default of every backbone.
        roi_canonical_scale: the box side (pixels) that the RoI heads pool from P4; smaller boxes go to finer
            levels, one level per halving. 224 (Lin et al., torchvision) suits ImageNet backbones.
        kwargs: passed on to torchvision's ``MaskRCNN`` (``box_detections_per_img``, ``rpn_*``, ``box_*`` ...).
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r}: give the number of object classes (background excluded)")
    if test_size is not None:
        _need_pixels("test_size", test_size, "give the shorter side of evaluation images in pixels, or null")
    _need_pixels("mask_head_channels", mask_head_channels, "give the mask head's width (Mask R-CNN: 256)")
    neck, build_args = fpn_backbone(
        backbone,
        backbone_checkpoint,
        backbone_out_indices,
        backbone_kwargs,
        drop_path_rate,
        frozen_bn,
        trainable_stages,
        fpn_channels,
        True,
        image_mean,
        image_std,
    )
    if anchor_sizes is not None:
        kwargs["rpn_anchor_generator"] = _anchor_generator(anchor_sizes, aspect_ratios)
    elif tuple(aspect_ratios) != (0.5, 1.0, 2.0):
        kwargs["rpn_anchor_generator"] = _anchor_generator((32, 64, 128, 256, 512), aspect_ratios)
    for name, pool in _roi_pools(roi_canonical_scale).items():
        kwargs.setdefault(name, pool)
    model = RapidMaskRCNN(
        neck,
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        image_mean=build_args["image_mean"],
        image_std=build_args["image_std"],
        **kwargs,
    )
    if mask_head_channels != 256:  # after construction: torchvision refuses num_classes beside a predictor of ours,
        # and building the narrow head last keeps the other layers' seeded initialisation that of the 256-wide model
        model.roi_heads.mask_head = MaskRCNNHeads(fpn_channels, (mask_head_channels,) * 4, 1)
        model.roi_heads.mask_predictor = MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1)
    t = model.transform
    model.transform = TestSizeTransform(
        t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size,
        _skip_resize=t._skip_resize, test_size=test_size,
    )  # fmt: skip
    return attach_build_info(
        model,
        class_names,
        **build_args,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_sizes=anchor_sizes,
        aspect_ratios=aspect_ratios,
        roi_canonical_scale=roi_canonical_scale,
        test_size=test_size,
        mask_head_channels=mask_head_channels,
        **{k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))},
    )
