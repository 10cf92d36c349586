"""timm's RandAugment and AutoAugment on today's Pillow.

timm maps the strongest posterize level to 0 bits kept (the TPU EfficientNet range 0-4). Pillow up to 12 turned
that into a black image; Pillow 13 raises ``ValueError: bits must be between or equal to 1 and 8``, so the paper's
``rand-m9-mstd0.5-inc1`` recipe stopped at a random step of a long run, whenever the magnitude noise reached 10.
:func:`keep_posterize_total` restores the black image for 0 bits in timm's operation table; every other level is
Pillow's own result.
"""

from __future__ import annotations

from typing import Any

from PIL import Image
from timm.data import auto_augment

__all__ = ["keep_posterize_total"]

_TIMM_POSTERIZE = auto_augment.posterize


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    if bits_to_keep <= 0:  # every bit dropped: black, as Pillow < 13 gave
        return Image.new(img.mode, img.size)
    return _TIMM_POSTERIZE(img, bits_to_keep, **kwargs)


def keep_posterize_total() -> None:
    """Route timm's posterize operations through :func:`_posterize` (idempotent; before building a transform)."""
    for name, op in auto_augment.NAME_TO_OP.items():
        if op is _TIMM_POSTERIZE:
            auto_augment.NAME_TO_OP[name] = _posterize
