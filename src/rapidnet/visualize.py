"""PNG overlays a person can look at: detections (boxes, instance masks, class names and scores) and semantic maps
blended over the image with a class legend. The ``predict`` commands call these.

Colours are fixed per class (:func:`class_colors`), so the same class looks the same in every image.
"""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from rapidnet.utils import atomic_write

__all__ = ["class_colors", "draw_instances", "draw_semantic", "save_png", "to_uint8_image"]


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """Distinct, stable RGB colours: hues stepped by the golden ratio, alternating brightness."""
    colors = []
    for i in range(num_classes):
        hue = (i * 0.618033988749895) % 1.0
        sat, val = (0.65, 0.95) if i % 2 == 0 else (0.9, 0.75)
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        colors.append((int(r * 255), int(g * 255), int(b * 255)))
    return colors


def to_uint8_image(image: torch.Tensor | np.ndarray | Image.Image) -> torch.Tensor:
    """A ``(3, H, W)`` uint8 tensor from a float ``[0, 1]`` / uint8 tensor, an ``(H, W, 3)`` array, or a PIL image."""
    if isinstance(image, Image.Image):
        image = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        image = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    image = image.detach().cpu()
    if image.ndim != 3:
        raise ValueError(f"expected one image (C, H, W), got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _name(class_names: Sequence[str] | None, index: int) -> str:
    return class_names[index] if class_names is not None and 0 <= index < len(class_names) else str(index)


def _upscale_factor(h: int, w: int, min_side: int) -> int:
    """Integer zoom that brings the shorter side to at least ``min_side`` (tiny images get readable captions)."""
    return max(1, -(-min_side // max(1, min(h, w))))


def _zoom(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest-neighbour integer zoom of the last two dimensions (pixels stay crisp)."""
    return x if factor == 1 else x.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


def _text_color(color: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_instances(
    image: torch.Tensor | np.ndarray | Image.Image,
    prediction: Mapping[str, torch.Tensor],
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    alpha: float = 0.45,
    label_offset: int = 1,
    min_side: int = 0,
) -> Image.Image:
    """Masks, boxes and ``name score`` captions of the detections scoring at least ``score_threshold``.

    ``prediction`` is one image's Mask R-CNN output (or a target: without ``scores`` every object is drawn).
    Labels are 1..K with background 0, so ``class_names[label - label_offset]`` names them; the colour of label
    ``L`` is ``class_colors(...)[L]``, the colour :func:`draw_semantic` gives class index ``L`` (the mosaic data's
    semantic value of the same garment). ``min_side`` zooms small images (nearest) so captions stay readable.
    """
    canvas = to_uint8_image(image)
    zoom = _upscale_factor(*canvas.shape[-2:], min_side) if min_side else 1
    canvas = _zoom(canvas, zoom)
    labels = prediction["labels"].detach().cpu().long()
    scores = prediction.get("scores")
    scores = scores.detach().cpu().float() if scores is not None else torch.ones(len(labels))
    keep = scores >= score_threshold
    labels, scores = labels[keep], scores[keep]
    num_colors = max(
        len(class_names) + label_offset if class_names is not None else 0,
        int(labels.max()) + 1 if len(labels) else 0,
        1,
    )
    palette = class_colors(num_colors)
    colors = [palette[int(lab)] for lab in labels]
    masks = prediction.get("masks")
    if masks is not None and len(labels):
        m = masks.detach().cpu()[keep]
        if m.ndim == 4:
            m = m[:, 0]
        binary = m >= mask_threshold if m.is_floating_point() else m.bool()
        canvas = draw_segmentation_masks(canvas, _zoom(binary, zoom), alpha=alpha, colors=colors)
    boxes = prediction.get("boxes")
    if boxes is not None and len(labels):
        captions = [
            f"{_name(class_names, int(lab) - label_offset)} {s:.2f}"
            if "scores" in prediction
            else _name(class_names, int(lab) - label_offset)
            for lab, s in zip(labels.tolist(), scores.tolist(), strict=True)
        ]
        canvas = draw_bounding_boxes(
            canvas,
            boxes.detach().cpu()[keep].float() * zoom,
            captions,
            colors=colors,
            width=2,
            fill_labels=True,
            label_colors=[_text_color(c) for c in colors],
        )
    return _to_pil(canvas)


def draw_semantic(
    image: torch.Tensor | np.ndarray | Image.Image,
    prediction: torch.Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.5,
    ignore_index: int = 255,
    transparent_classes: Sequence[int] = (),
    legend: bool = True,
    min_side: int = 0,
) -> Image.Image:
    """A label map (or ``(C, H, W)`` logits) blended over the image, with a legend of the classes present.

    Pixels of ``ignore_index`` and of ``transparent_classes`` (e.g. a background class) are left uncoloured. The map
    is resized (nearest) to the image when sizes differ, e.g. logits of a padded batch should be cropped first.
    ``min_side`` zooms small images (nearest).
    """
    canvas = to_uint8_image(image)
    pred = torch.as_tensor(prediction).detach().cpu()
    if pred.ndim == 3:
        pred = pred.argmax(0)
    pred = pred.long()
    h, w = canvas.shape[-2:]
    if tuple(pred.shape) != (h, w):
        pred = torch.nn.functional.interpolate(pred[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0]
        pred = pred.long()
    zoom = _upscale_factor(h, w, min_side) if min_side else 1
    canvas, pred = _zoom(canvas, zoom), _zoom(pred, zoom)
    present = [int(c) for c in torch.unique(pred).tolist() if c != ignore_index and c not in transparent_classes]
    num = max([len(class_names) if class_names is not None else 0, *(c + 1 for c in present), 1])
    palette = torch.tensor(class_colors(num), dtype=torch.float32)
    out = canvas.float()
    for c in present:
        sel = pred == c
        out[:, sel] = out[:, sel] * (1 - alpha) + palette[c][:, None] * alpha
    result = _to_pil(out.round().clamp(0, 255).to(torch.uint8))
    if not legend or not present:
        return result
    return _with_legend(result, [(_name(class_names, c), tuple(int(v) for v in palette[c])) for c in present])


def _with_legend(image: Image.Image, entries: list[tuple[str, tuple[int, ...]]]) -> Image.Image:
    """Append a white strip to the right listing each colour swatch and its class name."""
    font = ImageFont.load_default()
    line = 14
    text_w = max(int(ImageDraw.Draw(image).textlength(name, font=font)) for name, _ in entries)
    strip_w = text_w + 28
    height = max(image.height, line * len(entries) + 8)
    out = Image.new("RGB", (image.width + strip_w, height), (255, 255, 255))
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    for i, (name, color) in enumerate(entries):
        y = 4 + i * line
        draw.rectangle([image.width + 4, y + 1, image.width + 14, y + 11], fill=tuple(color), outline=(0, 0, 0))
        draw.text((image.width + 20, y), name, fill=(0, 0, 0), font=font)
    return out


def save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    """Write ``image`` as PNG atomically (a crash never leaves a broken file), creating folders as needed."""

    return atomic_write(Path(path), lambda tmp: image.save(tmp, format="PNG"))
