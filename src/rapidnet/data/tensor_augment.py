"""Whole-batch augmentation of small in-memory images: the ``data.pipeline: tensor`` path of classification.

For a data set held in memory (Fashion-MNIST) the images are resized once with the eval geometry
(:func:`resize_in_memory`) and each training batch is augmented as one tensor (:class:`TensorAugment`), which keeps
a 2-core CPU busy with the model rather than with per-sample PIL work. The random draws come from the global torch
(and, for timm's random erasing, Python) generators, so the caller decides how a batch is seeded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform

__all__ = ["TensorAugment", "crop_each", "resize_in_memory"]


class TensorAugment:
    """Augment a uint8 batch ``(N, C, H, W)`` into a normalised float batch.

    In order: random crop of the zero-padded image (``padding`` pixels each side), optionally a zoom (resize to a
    side drawn from ``zoom`` with an aspect from ``ratio``, each image placed at random on a black canvas up to a
    quarter larger), horizontal flip, optional Gaussian noise, conversion to float and normalisation, then
    ``erasing`` (timm's random erasing). Grayscale images become 3 identical channels, as the PIL path's
    ``convert("RGB")`` makes them.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: float = 0.5,
        padding: int = 0,
        erasing: Any = None,
        zoom: Sequence[int] | None = None,
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        noise: float = 0.0,
    ) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.hflip = hflip
        self.padding = padding
        self.erasing = erasing
        self.zoom = tuple(zoom) if zoom else None
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.noise = noise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.padding > 0:
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,))
            ox = torch.randint(0, 2 * p + 1, (n,))
            x = crop_each(padded, oy, ox, h, w)
        x = x.float()
        if self.zoom is not None:
            x = self._zoom(x, self.zoom)
        if self.hflip > 0:
            flip = torch.rand(n) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.noise > 0:
            x = (x + torch.randn_like(x) * float(torch.empty(()).uniform_(0, self.noise))).clamp_(0, 255)
        x = x.div_(255)
        channels = self.mean.shape[1]
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        x = (x - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)
        return x.contiguous()

    def _zoom(self, x: torch.Tensor, zoom: tuple[int, ...]) -> torch.Tensor:
        """Resize the batch to one drawn size and aspect; place each image at random on a black square canvas."""
        n = len(x)
        side = int(torch.randint(zoom[0], zoom[1] + 1, ()))
        aspect = math.exp(float(torch.empty(()).uniform_(*self.log_ratio)))
        gh, gw = max(1, round(side * math.sqrt(aspect))), max(1, round(side / math.sqrt(aspect)))
        x = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)
        canvas = round(max(gh, gw) * float(torch.empty(()).uniform_(1.0, 1.25)))
        tops = torch.randint(0, canvas - gh + 1, (n,))
        lefts = torch.randint(0, canvas - gw + 1, (n,))
        # the image at (top, left) of the canvas is the canvas-sized crop at (free - top, free - left) of the image
        # zero-padded by the free space on every side
        free_y, free_x = canvas - gh, canvas - gw
        padded = F.pad(x, (free_x, free_x, free_y, free_y))
        return crop_each(padded, free_y - tops, free_x - lefts, canvas, canvas)


def crop_each(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One ``h x w`` crop per image of the batch ``x``, image ``i``'s at ``(top[i], left[i])``, in one gather."""
    rows = (top[:, None] + torch.arange(h))[:, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, :]
    return x[torch.arange(len(x))[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def resize_in_memory(dataset: Any, indices: Sequence[int], data_config: dict[str, Any]) -> torch.Tensor:
    """Apply the eval geometry (resize + centre crop, no normalisation) once to the images of ``dataset.images`` (an
    in-memory array) at ``indices``: uint8 ``(N, C, S, S)``."""
    geometry = create_transform(**data_config, is_training=False, normalize=False)
    images = dataset.images
    first = geometry(Image.fromarray(images[indices[0]]))
    out = torch.empty((len(indices), *first.shape), dtype=torch.uint8)
    for i, index in enumerate(indices):
        out[i] = geometry(Image.fromarray(images[index]))
    return out
