"""What Mask R-CNN and Semantic FPN share: a backbone (RapidNet or any timm CNN) with an FPN, BN freezing, stage
freezing, inference-time reparameterization, batching of lists of images, and moving batches to a device.

Both dense models take a *list* of images (each ``(3, H, W)`` float in ``[0, 1]``, sizes may differ) and a list of
target dicts, as torchvision's detection models do, so one engine loop and one ``collate_dense`` serve both tasks.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.layers import FrozenBatchNormAct2d, freeze_batch_norm_2d, unfreeze_batch_norm_2d
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

from rapidnet.errors import ConfigError
from rapidnet.models.checkpoint import load_timm_checkpoint
from rapidnet.models.factory import create_model, is_rapidnet
from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE
from rapidnet.models.reparam import reparameterize_
from rapidnet.utils import jsonable

__all__ = [
    "BN_MODES",
    "BackboneWithFPN",
    "build_backbone",
    "freeze_stages",
    "pad_images",
    "resolve_bn_mode",
    "stage_of_parameters",
]

#: ``frozen``: BN replaced by FrozenBatchNorm2d (statistics and affine fixed; torchvision/Detectron convention);
#: ``eval``: BN kept in eval mode, affine trained (mmdetection's ``norm_eval=True``); ``train``: ordinary BN.
BN_MODES = ("frozen", "eval", "train")
NUM_UNITS = 5  # stem + four stages: what ``trainable_stages`` counts


def resolve_bn_mode(frozen_bn: bool | str) -> str:
    """Map the user-facing ``frozen_bn`` (True / False / a mode name) onto one of :data:`BN_MODES`."""
    if frozen_bn is True:
        return "frozen"
    if frozen_bn is False:
        return "train"
    if isinstance(frozen_bn, str) and frozen_bn in BN_MODES:
        return frozen_bn
    raise ConfigError(f"frozen_bn={frozen_bn!r} is not understood: use True, False or one of {', '.join(BN_MODES)}")


# ---- backbone construction -----------------------------------------------------------------------------------------


def build_backbone(
    name: str,
    checkpoint: str | os.PathLike[str] | None = None,
    out_indices: Sequence[int] | None = None,
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
    **kwargs: Any,
) -> tuple[nn.Module, list[int], dict[str, Any]]:
    """A feature extractor giving the stride 4/8/16/32 maps of ``name``: ``(body, channels, pretrained_cfg)``.

    RapidNet variants go through :func:`rapidnet.create_model` (any RapidNet checkpoint, classification ones
    included: the head is simply not part of the body); any other name is a timm model (e.g. ``mobilenetv2_140``),
    whose four stride 4..32 outputs are ``out_indices=(1, 2, 3, 4)`` unless given, and whose classification
    checkpoint loads through :func:`~rapidnet.models.checkpoint.load_timm_weights`. Both take ``drop_path_rate``
    (stochastic depth; one default for every backbone, so comparisons regularise alike).
    """
    if drop_path_rate < 0 or drop_path_rate >= 1:
        raise ConfigError(f"drop_path_rate={drop_path_rate}: use a rate in [0, 1), e.g. 0.1")
    if is_rapidnet(name):
        body = create_model(
            name,
            checkpoint=checkpoint,
            features_only=True,
            out_indices=out_indices or (0, 1, 2, 3),
            drop_path_rate=drop_path_rate,
            **kwargs,
        )
    else:
        if drop_path_rate > 0:  # not every timm model has stochastic depth: ask only for a rate that is used
            kwargs["drop_path_rate"] = drop_path_rate
        try:
            body = timm.create_model(
                name, pretrained=False, features_only=True, out_indices=tuple(out_indices or (1, 2, 3, 4)), **kwargs
            )
        except RuntimeError as e:
            if "Unknown model" not in str(e):
                raise
            raise ConfigError(
                f"unknown backbone {name!r}: use a RapidNet variant (rapidnet_ti/s/m/b) or a timm model name "
                "(see timm.list_models())"
            ) from None
        except (IndexError, AssertionError):
            raise ConfigError(
                f"backbone {name!r} has no feature levels {tuple(out_indices or (1, 2, 3, 4))}: "
                "pass backbone_out_indices for its stride 4, 8, 16 and 32 outputs"
            ) from None
        if checkpoint is not None:
            load_timm_checkpoint(body, checkpoint, name)
    reductions = list(body.feature_info.reduction())
    if reductions != [4, 8, 16, 32]:
        raise ConfigError(
            f"backbone {name!r} gives feature strides {reductions}, the FPN needs 4, 8, 16 and 32: "
            "choose backbone_out_indices accordingly"
        )
    cfg = dict(getattr(body, "pretrained_cfg", None) or {})
    return body, list(body.feature_info.channels()), cfg


def stage_of_parameters(body: nn.Module) -> dict[str, int]:
    """Which unit (0 = stem, 1..4 = the four feature stages) each parameter of a feature body belongs to.

    Parameters up to and including the module that gives feature ``k`` belong to unit ``k + 1``; those before the
    first feature module form the stem. Works for RapidNet and timm feature wrappers alike (registration order is
    forward order).
    """
    names = list(body.feature_info.module_name())
    prefixes = [(n + ".", n.replace(".", "_") + ".") for n in names]
    units: dict[str, int] = {}
    passed = -1  # index of the last feature module whose parameters have been seen
    for pname, _ in body.named_parameters():
        owner = next((k for k, pre in enumerate(prefixes) if pname.startswith(pre)), None)
        if owner is not None:
            passed = max(passed, owner)
            units[pname] = owner + 1
        elif passed < 0:
            units[pname] = 0  # before the first feature module: the stem
        else:
            units[pname] = min(passed + 2, NUM_UNITS - 1)  # between features k and k+1: leads to stage k+1
    return units


def freeze_stages(body: nn.Module, trainable_stages: int) -> None:
    """Keep only the last ``trainable_stages`` of the five units (stem, stage 0..3) trainable (torchvision's rule)."""
    if not 0 <= trainable_stages <= NUM_UNITS:
        raise ConfigError(f"trainable_stages={trainable_stages} is out of range: use 0 (all frozen) to 5 (all trained)")
    first_trained = NUM_UNITS - trainable_stages
    units = stage_of_parameters(body)
    for pname, param in body.named_parameters():
        if units[pname] < first_trained:
            param.requires_grad_(False)


# ---- backbone + FPN ------------------------------------------------------------------------------------------------


class BackboneWithFPN(nn.Module):
    """Backbone feature body + FPN: ``forward(x)`` returns an ``OrderedDict`` of ``out_channels``-wide maps.

    Keys ``"0".."3"`` are strides 4..32 and, with ``extra_pool``, ``"pool"`` a stride-64 max-pool of the last level
    (torchvision's LastLevelMaxPool, the "P6" of Mask R-CNN's fifth level). Has ``out_channels`` as torchvision's
    detection models require. ``bn_mode`` is one of :data:`BN_MODES`; ``reparameterize()`` folds the backbone for
    inference, whatever the mode.
    """

    def __init__(
        self,
        body: nn.Module,
        in_channels: Sequence[int],
        out_channels: int = 256,
        extra_pool: bool = True,
        bn_mode: str = "frozen",
    ) -> None:
        super().__init__()
        if bn_mode not in BN_MODES:
            raise ConfigError(f"bn_mode={bn_mode!r} is not one of {', '.join(BN_MODES)}")
        self.bn_mode = bn_mode
        self.body = freeze_batch_norm_2d(body) if bn_mode == "frozen" else body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, LastLevelMaxPool() if extra_pool else None)
        self.out_channels = out_channels
        self.in_channels = list(in_channels)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))

    def train(self, mode: bool = True) -> BackboneWithFPN:
        """Ordinary ``train``, except that in ``eval`` BN mode the backbone's BN layers stay in eval mode."""
        super().train(mode)
        if mode and self.bn_mode == "eval":
            for m in self.body.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the backbone for inference: frozen BN back to BN (so it can fold), then RapidNet's own folding."""
        if any(isinstance(m, (FrozenBatchNorm2d, FrozenBatchNormAct2d)) for m in self.body.modules()):
            device = next(self.body.parameters()).device
            self.body = unfreeze_batch_norm_2d(self.body).to(device)
        self.bn_mode = "train"
        reparameterize_(self.body)
        self.eval()


def image_normalization(
    cfg: Mapping[str, Any], image_mean: Sequence[float] | None, image_std: Sequence[float] | None
) -> tuple[list[float], list[float]]:
    """Mean/std the detector or segmenter normalises with: given ones, else the backbone's, else ImageNet's."""
    mean = list(image_mean or cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(image_std or cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def fpn_backbone(
    backbone: str,
    backbone_checkpoint: str | os.PathLike[str] | None,
    backbone_out_indices: Sequence[int] | None,
    backbone_kwargs: Mapping[str, Any] | None,
    drop_path_rate: float,
    frozen_bn: bool | str,
    trainable_stages: int,
    fpn_channels: int,
    extra_pool: bool,
    image_mean: Sequence[float] | None,
    image_std: Sequence[float] | None,
) -> tuple[BackboneWithFPN, dict[str, Any]]:
    """What Mask R-CNN and Semantic FPN build alike: the backbone (frozen up to ``trainable_stages``) with its FPN, and
    the arguments that rebuild it (stored with the weights), normalisation included.

    Returns ``(neck, build_args)``; ``build_args["image_mean"]``/``["image_std"]`` are the resolved normalisation.
    """
    bn_mode = resolve_bn_mode(frozen_bn)
    body, channels, cfg = build_backbone(
        backbone,
        backbone_checkpoint,
        backbone_out_indices,
        **{"drop_path_rate": drop_path_rate, **(backbone_kwargs or {})},
    )
    freeze_stages(body, trainable_stages)
    neck = BackboneWithFPN(body, channels, fpn_channels, extra_pool=extra_pool, bn_mode=bn_mode)
    mean, std = image_normalization(cfg, image_mean, image_std)
    build_args = dict(
        backbone=backbone,
        frozen_bn=bn_mode,
        trainable_stages=trainable_stages,
        fpn_channels=fpn_channels,
        image_mean=mean,
        image_std=std,
        backbone_out_indices=backbone_out_indices,
        backbone_kwargs=dict(backbone_kwargs or {}),
        drop_path_rate=drop_path_rate,
    )
    return neck, build_args


def attach_build_info(model: nn.Module, class_names: Sequence[str] | None, **build_args: Any) -> nn.Module:
    """Record class names and the (JSON-able) arguments that rebuild this exact network, for checkpoints."""
    model.class_names = list(class_names) if class_names is not None else None
    model.build_args = jsonable(dict(build_args, class_names=model.class_names))
    return model


# ---- batches -------------------------------------------------------------------------------------------------------


def pad_images(
    images: Sequence[torch.Tensor] | torch.Tensor, size_divisor: int = 32, fill: float = 0.0
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Stack images of different sizes into one batch, padded at the bottom/right to a multiple of ``size_divisor``.

    Returns the batch and each image's own ``(H, W)``, which evaluators use to crop the padding off again.
    """
    if torch.is_tensor(images) and images.ndim == 4:
        sizes = [tuple(images.shape[-2:])] * images.shape[0]
        images = list(images)
    else:
        sizes = [tuple(im.shape[-2:]) for im in images]
    if not sizes:
        raise ValueError("pad_images needs at least one image")
    h = max(s[0] for s in sizes)
    w = max(s[1] for s in sizes)
    if size_divisor > 1:
        h = (h + size_divisor - 1) // size_divisor * size_divisor
        w = (w + size_divisor - 1) // size_divisor * size_divisor
    out = images[0].new_full((len(sizes), images[0].shape[0], h, w), fill)
    for i, im in enumerate(images):
        out[i, :, : im.shape[-2], : im.shape[-1]] = im
    return out, [(int(a), int(b)) for a, b in sizes]


def pad_labels(labels: Sequence[torch.Tensor], size: tuple[int, int], ignore_index: int = 255) -> torch.Tensor:
    """Stack label maps into ``(N, H, W)`` int64, padding with ``ignore_index`` so padding never counts."""
    out = torch.full((len(labels), *size), ignore_index, dtype=torch.long, device=labels[0].device)
    for i, lab in enumerate(labels):
        out[i, : lab.shape[-2], : lab.shape[-1]] = lab
    return out
