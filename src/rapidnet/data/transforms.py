"""Evaluation transforms whose memory is bounded by their output, whatever the input's aspect ratio.

timm's eval transform resizes the shorter side to ``size / crop_pct`` and then cuts the centre crop. A valid 1 KB PNG
of 1 x 60000 pixels becomes a 256 x 15,360,000 image on the way (12 GB) before 224 x 224 of it are kept.
:class:`ResizeCenterCrop` keeps timm's exact path for ordinary images and, when the resized image would be more than
:data:`MAX_RESIZE_FACTOR` times the crop, computes only the kept pixels. It does Pillow's two passes itself
(horizontal, then vertical, each over the rows or columns the other needs, through ``resize(box=...)``), because one
``resize`` with a box that cuts both axes does not reproduce the full resize in Pillow 13; passed one axis at a time,
the box keeps the full resize's scale and filter support, so the pixels equal resize-then-crop up to the rounding of
a sampling position: at most two grey levels in a few pixels (with ``nearest``, a row of samples may move by one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import _compute_resized_output_size

__all__ = ["MAX_RESIZE_FACTOR", "ResizeCenterCrop", "bounded_eval_transform", "eval_data_config", "eval_transform"]

#: resized images up to this many times the crop's pixels take timm's own path (an extreme aspect ratio the other)
MAX_RESIZE_FACTOR = 64

#: keys of ``pretrained_cfg`` that define the eval transform; exported with the weights as JSON
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")

_SUPPORT = {  # Pillow's filter radii, in source pixels at scale 1
    Image.Resampling.NEAREST: 0.5,
    Image.Resampling.BOX: 0.5,
    Image.Resampling.BILINEAR: 1.0,
    Image.Resampling.HAMMING: 1.0,
    Image.Resampling.BICUBIC: 2.0,
    Image.Resampling.LANCZOS: 3.0,
}
_PIL_FILTERS = {
    InterpolationMode.NEAREST: Image.Resampling.NEAREST,
    InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
    InterpolationMode.BICUBIC: Image.Resampling.BICUBIC,
    InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
    InterpolationMode.BOX: Image.Resampling.BOX,
    InterpolationMode.HAMMING: Image.Resampling.HAMMING,
}


class ResizeCenterCrop(torch.nn.Module):
    """``Resize(size)`` (shorter side to ``size``) then ``CenterCrop(crop)``, computing only the cropped pixels.

    PIL images take the bounded path; tensors (already small: they come from decoded arrays) go through the two
    torchvision transforms it replaces.
    """

    def __init__(self, resize: T.Resize, crop: T.CenterCrop) -> None:
        super().__init__()
        self.resize, self.crop = resize, crop

    def forward(self, img: Any) -> Any:
        if not isinstance(img, Image.Image) or self.resize.interpolation not in _PIL_FILTERS:
            return self.crop(self.resize(img))
        width, height = img.size
        size = [self.resize.size] if isinstance(self.resize.size, int) else list(self.resize.size)
        rh, rw = _compute_resized_output_size((height, width), size, self.resize.max_size)
        ch, cw = self.crop.size if len(self.crop.size) == 2 else (self.crop.size[0],) * 2
        if ch > rh or cw > rw:  # the crop pads: rare and small, let torchvision do it
            return self.crop(self.resize(img))
        if rh * rw <= MAX_RESIZE_FACTOR * ch * cw:
            return self.crop(self.resize(img))
        top, left = round((rh - ch) / 2.0), round((rw - cw) / 2.0)  # CenterCrop's rounding
        sx, sy = width / rw, height / rh
        x0, x1, y0, y1 = left * sx, (left + cw) * sx, top * sy, (top + ch) * sy
        resample = _PIL_FILTERS[self.resize.interpolation]
        if resample == Image.Resampling.NEAREST:  # no filter: one resize samples the same pixels
            return img.resize((cw, ch), resample, box=(x0, y0, x1, y1))
        reach = (_SUPPORT[resample] + 1) * max(sy, 1.0)  # rows the vertical pass reads around its box
        r0, r1 = max(0, int(y0 - reach)), min(height, int(y1 + reach) + 1)
        rows = img.crop((0, r0, width, r1))
        wide = rows.resize((cw, r1 - r0), resample, box=(x0, 0, x1, r1 - r0))  # horizontal pass only
        return wide.resize((cw, ch), resample, box=(0, y0 - r0, cw, y1 - r0))  # vertical pass only

    def __repr__(self) -> str:
        return f"{type(self).__name__}(resize={self.resize.size}, crop={self.crop.size}, {self.resize.interpolation})"


def bounded_eval_transform(transform: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``transform`` (a ``Compose``) with each shorter-side ``Resize`` followed by a ``CenterCrop`` fused into one
    :class:`ResizeCenterCrop`; other transforms as they are."""
    steps: Sequence[Any] | None = getattr(transform, "transforms", None)
    if steps is None:
        return transform
    out: list[Any] = []
    for step in steps:
        prev = out[-1] if out else None
        if (
            isinstance(step, T.CenterCrop)
            and type(prev) is T.Resize
            and (isinstance(prev.size, int) or len(prev.size) == 1)
            and getattr(prev, "antialias", True) is not False
        ):
            out[-1] = ResizeCenterCrop(prev, step)
        else:
            out.append(step)
    return T.Compose(out)


def eval_transform(data_config: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform for ``data_config`` (resize, centre crop, normalise), bounded by its output size."""
    return bounded_eval_transform(create_transform(**data_config, is_training=False))


def eval_data_config(
    model: torch.nn.Module,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The eval transform settings: the model's ``pretrained_cfg`` with each override that is not None.

    Values come back as tuples, the form timm's transforms take and the one a checkpoint's metadata stores.
    """
    cfg = dict(resolve_data_config({}, model=model))
    cfg.setdefault("crop_mode", "center")
    if input_size is not None:
        cfg["input_size"] = (3, input_size, input_size)
    for key, value in (("crop_pct", crop_pct), ("interpolation", interpolation), ("mean", mean), ("std", std)):
        if value is not None:
            cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return {k: cfg[k] for k in _TRANSFORM_KEYS if k in cfg}
