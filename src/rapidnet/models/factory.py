"""``rapidnet.create_model``: the variants through timm, with a local checkpoint as a first-class argument."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

from rapidnet.errors import ConfigError
from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE, VARIANTS


def list_variants() -> list[str]:
    return list(VARIANTS)


def is_rapidnet(name: str) -> bool:
    """Whether a model name (optionally with a timm pretrained tag, ``rapidnet_ti.in1k``) is a RapidNet variant."""
    return name.split(".")[0] in VARIANTS


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int = 1000,
    distillation: bool = True,
    in_chans: int = 3,
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    **kwargs: Any,
) -> nn.Module:
    """Build a RapidNet variant, optionally with weights.

    ``checkpoint=PATH`` loads any supported file (the authors' formats, this project's safetensors/torch files,
    reparameterized or not); ``pretrained=True`` fetches the authors' ImageNet weights (online only). Extra keyword
    arguments (``depths``, ``widths``, ``head_dim``, ``drop_rate``, ``use_ema``, ...) reach :class:`RapidNet`.
    """
    if not is_rapidnet(name):
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(VARIANTS)}")
    if checkpoint is not None:
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=os.fspath(checkpoint))
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    if features_only:
        kwargs.update(features_only=True, out_indices=tuple(out_indices))
    return timm.create_model(
        name,
        pretrained=pretrained,
        num_classes=num_classes,
        distillation=distillation,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )
