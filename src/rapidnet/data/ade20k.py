"""Semantic segmentation in the ADE20K layout, with mmsegmentation's ADE20K augmentation in torchvision v2.

Layout::

    ROOT/images/{training,validation}/NAME.jpg|png
    ROOT/annotations/{training,validation}/NAME.png    single-channel label maps
    ROOT/images/dev/, ROOT/annotations/dev/            optional: the dev split that chooses the best epoch (mosaic)

Label conventions (say which explicitly with ``reduce_zero_label``):

- ``reduce_zero_label=True`` (ADE20K): 0 = unlabeled -> 255 (ignored), classes 1..N -> 0..N-1; 255 stays ignored.
- ``reduce_zero_label=False`` (e.g. the mosaic data set, where 0 = background is a real class): values are class
  indices 0..N-1 as they are; 255 is ignored.

Without an explicit choice the reader takes it from ``ROOT/meta.json`` (written by ``rapidnet.data.mosaic``), and
otherwise assumes ADE20K (True). Class names come from ``classes=``, ``meta.json`` or ADE20K's ``objectInfo150.txt``.

Items are ``(image, target)``: ``image`` float ``(3, H, W)`` in ``[0, 1]``; ``target`` holds ``sem_seg`` (int64
``(H, W)``), ``image_id`` (index), ``file_name``, ``image_size`` (image size after transforms) and ``orig_size``.
Training: random rescale (ratio 0.5-2.0 of ``scale``), random crop (``cat_max_ratio``), flip, photometric distortion.
Evaluation: the image is resized to ``scale`` (keeping its aspect ratio) while ``sem_seg`` stays at full resolution,
as mmsegmentation evaluates; the evaluator crops the batch padding off and resizes the logits back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from rapidnet.data.folder import _one_line, collate_dense, load_rgb, open_image
from rapidnet.data.listing import check_member, list_files
from rapidnet.errors import ConfigError, DataError

__all__ = [
    "ADE20K_NUM_CLASSES",
    "IMAGE_EXTENSIONS",
    "ADE20KSegmentation",
    "SegEvalTransform",
    "SegTrainTransform",
    "collate_segmentation",
    "read_label_map",
]

ADE20K_NUM_CLASSES = 150
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLITS = {"training": "training", "train": "training", "validation": "validation", "val": "validation", "dev": "dev"}
META_FILE = "meta.json"

collate_segmentation = collate_dense


def read_label_map(path: str | os.PathLike[str]) -> np.ndarray:
    """A label PNG as a ``(H, W)`` uint8 array of class values (palette PNGs give their indices)."""
    try:
        with open(path, "rb") as f, open_image(f, path) as img:
            if img.mode not in ("L", "P", "I", "I;16"):
                raise DataError(
                    f"label map {path} is a {img.mode} image: label PNGs must be single-channel (mode L or P)"
                )
            arr = np.asarray(img)
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read label map {path} ({_one_line(e)}): replace the file") from None
    return arr


def read_meta(path: Path) -> dict[str, Any]:
    """The ``semantic`` section of a data set's ``meta.json``, checked: ``classes`` a list of at most 256 names,
    ``reduce_zero_label`` true or false; anything else is a one-line error naming the field."""
    fix = "rebuild the data set (rapidnet data mosaic) or delete the file"
    if path.stat().st_size > 1 << 24:
        raise DataError(f"{path} is over 16 MB, far more than a class list takes: {fix}")
    try:
        raw = json.loads(path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise DataError(f"{path} is nested too deeply: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path} is not valid JSON ({_one_line(e)[:100]}): {fix}") from None
    meta = raw.get("semantic") if isinstance(raw, dict) else None
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise DataError(f"{path}: 'semantic' is a {type(meta).__name__}, not an object: {fix}")
    classes = meta.get("classes")
    if classes is not None and (
        not isinstance(classes, list) or not 1 <= len(classes) <= 256 or not all(isinstance(c, str) for c in classes)
    ):
        raise DataError(f"{path}: 'semantic.classes' must be a list of 1..256 class names (strings): {fix}")
    if not isinstance(meta.get("reduce_zero_label", True), bool):
        raise DataError(f"{path}: 'semantic.reduce_zero_label' must be true or false: {fix}")
    return meta


def _scale_factor(h: int, w: int, scale: Sequence[int] | None, ratio: float) -> float:
    """mmsegmentation's keep-ratio rescale: fit ``scale * ratio`` (long, short) sides, or plain ``ratio``."""
    if scale is None:
        return ratio
    long_side, short_side = max(scale) * ratio, min(scale) * ratio
    return min(long_side / max(h, w), short_side / min(h, w))


def _resize_label(label: tv_tensors.Mask, size: list[int]) -> tv_tensors.Mask:
    """Nearest-neighbour resize of a label map with pixel centres aligned to the image's bilinear resize.

    (v2's ``resize`` uses PyTorch's legacy "nearest" for masks, which is off by half a pixel: up to 10% of labels
    land on the wrong pixels at some scales.)
    """
    small = label.as_subclass(torch.Tensor).to(torch.uint8)[None]
    out = TF.resize_image(small, size, interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return tv_tensors.Mask(out.to(label.dtype))


class SegTrainTransform:
    """Random rescale -> random crop (``cat_max_ratio``) -> horizontal flip -> photometric distortion.

    Uses torch's random generator, so the engine's per-worker seeding makes it reproducible. No padding: the model
    pads batches with the ignore label.
    """

    def __init__(
        self,
        scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        crop_size: Sequence[int] | None = (512, 512),
        cat_max_ratio: float | None = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
    ) -> None:
        self.scale = tuple(scale) if scale is not None else None
        self.ratio_range = tuple(ratio_range) if ratio_range is not None else None
        self.crop_size = tuple(crop_size) if crop_size is not None else None
        self.cat_max_ratio = cat_max_ratio
        self.hflip = hflip
        self.ignore_index = ignore_index
        self.photometric = v2.RandomPhotometricDistort(p=0.5) if photometric else None

    def _crop_box(self, label: torch.Tensor) -> tuple[int, int, int, int]:
        assert self.crop_size is not None
        h, w = label.shape[-2:]
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        box = (0, 0, ch, cw)
        if (ch, cw) == (h, w):  # one placement only: nothing to draw or retry (mosaic scenes scaled down)
            return box
        for _ in range(10):
            top = int(torch.randint(0, h - ch + 1, ()).item())
            left = int(torch.randint(0, w - cw + 1, ()).item())
            box = (top, left, ch, cw)
            if self.cat_max_ratio is None or self.cat_max_ratio >= 1:
                break
            patch = label[..., top : top + ch, left : left + cw]
            counts = torch.bincount(patch[patch != self.ignore_index].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: tv_tensors.Image, label: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        if self.ratio_range is not None or self.scale is not None:
            lo, hi = self.ratio_range if self.ratio_range is not None else (1.0, 1.0)
            ratio = lo + (hi - lo) * float(torch.rand(()).item())
            h, w = image.shape[-2:]
            f = _scale_factor(h, w, self.scale, ratio)
            size = [max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))]
            image = TF.resize(image, size, antialias=True)
            label = _resize_label(label, size)
        if self.crop_size is not None:
            top, left, ch, cw = self._crop_box(label)
            image, label = TF.crop(image, top, left, ch, cw), TF.crop(label, top, left, ch, cw)
        if self.hflip > 0 and float(torch.rand(()).item()) < self.hflip:
            image, label = TF.horizontal_flip(image), TF.horizontal_flip(label)
        if self.photometric is not None:
            image = self.photometric(image)
        return image, label


class SegEvalTransform:
    """Resize the image to ``scale`` keeping its aspect ratio; the label stays at full resolution for scoring."""

    def __init__(self, scale: Sequence[int] | None = (2048, 512)) -> None:
        self.scale = tuple(scale) if scale is not None else None

    def __call__(self, image: tv_tensors.Image, label: tv_tensors.Mask) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
        if self.scale is not None:
            h, w = image.shape[-2:]
            f = _scale_factor(h, w, self.scale, 1.0)
            image = TF.resize(image, [max(1, int(h * f + 0.5)), max(1, int(w * f + 0.5))], antialias=True)
        return image, label


def _read_object_info(path: Path) -> list[str] | None:
    """Class names from ADE20K's ``objectInfo150.txt`` (``Idx Ratio Train Val Name`` rows), if readable."""
    names: dict[int, str] = {}
    try:
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
            parts = line.split("\t") if "\t" in line else line.split(None, 4)
            if len(parts) >= 5 and parts[0].strip().isdigit():
                names[int(parts[0])] = parts[4].split(";")[0].strip()
    except OSError:
        return None
    if not names or sorted(names) != list(range(1, len(names) + 1)):
        return None
    return [names[i] for i in range(1, len(names) + 1)]


class ADE20KSegmentation(Dataset):
    """An ADE20K-layout split (see the module docstring).

    Args:
        root: data set folder; split: ``training``/``validation`` (or ``train``/``val``), or ``dev``.
        train: training augmentation (default: the training split).
        num_classes: classes after the label reduction; default from the class names, else 150 (ADE20K).
        reduce_zero_label: the label convention; None: ``meta.json``'s, else True (ADE20K).
        classes: class names (after reduction).
        scale, ratio_range, crop_size, cat_max_ratio, hflip, photometric: the augmentation (None switches a step
            off); evaluation resizes to ``scale``.
        transforms: replace the default pipeline: a callable ``(Image, Mask) -> (Image, Mask)``.
    """

    collate_fn = staticmethod(collate_dense)

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "training",
        *,
        train: bool | None = None,
        num_classes: int | None = None,
        reduce_zero_label: bool | None = None,
        classes: Sequence[str] | None = None,
        scale: Sequence[int] | None = (2048, 512),
        ratio_range: Sequence[float] | None = (0.5, 2.0),
        crop_size: Sequence[int] | None = (512, 512),
        cat_max_ratio: float | None = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
        transforms: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}: use 'training', 'validation' or 'dev' (or 'train'/'val')")
        self.root = Path(root).expanduser()
        self.split = SPLITS[split]
        self.train = self.split == "training" if train is None else train
        self.ignore_index = ignore_index
        self.image_dir = self.root / "images" / self.split
        self.label_dir = self.root / "annotations" / self.split
        names = "{training,validation}" if self.split != "dev" else "dev"
        layout = f"expected ROOT/images/{names}/ and ROOT/annotations/{names}/"
        if not self.root.is_dir():
            raise DataError(f"data set {self.root} does not exist: {layout}")
        for folder in (self.image_dir, self.label_dir):
            if not folder.is_dir():
                raise DataError(f"folder {folder} not found: {layout}")
        self._configure_classes(num_classes, reduce_zero_label, classes)
        self.images, self.labels = self._pair_files()
        if transforms is not None:
            self.transforms = transforms
        elif self.train:
            self.transforms = SegTrainTransform(
                scale, ratio_range, crop_size, cat_max_ratio, hflip, photometric, ignore_index
            )
        else:
            self.transforms = SegEvalTransform(scale)

    def _configure_classes(
        self, num_classes: int | None, reduce_zero_label: bool | None, classes: Sequence[str] | None
    ) -> None:
        meta: dict[str, Any] = {}
        meta_path = self.root / META_FILE
        if meta_path.is_file():
            meta = read_meta(meta_path)
        if reduce_zero_label is None:
            reduce_zero_label = bool(meta.get("reduce_zero_label", True))
        self.reduce_zero_label = reduce_zero_label
        names: list[str] | None = list(classes) if classes is not None else None
        if names is None and meta.get("classes"):
            value_names = [str(c) for c in meta["classes"]]  # names of the PNG values 0, 1, ...
            names = value_names[1:] if reduce_zero_label else value_names
        if names is None:
            info = _read_object_info(self.root / "objectInfo150.txt")
            if info is not None:
                names = info if reduce_zero_label else ["unlabeled", *info]
        if num_classes is None:
            num_classes = len(names) if names is not None else ADE20K_NUM_CLASSES
        if names is None:
            names = [f"class_{i}" for i in range(num_classes)]
        if len(names) != num_classes:
            raise ConfigError(
                f"num_classes={num_classes} but {len(names)} class names are known for {self.root}: "
                "make them agree (or leave num_classes out)"
            )
        if not 1 <= num_classes <= 255:
            raise ConfigError(f"num_classes={num_classes} is out of range for 8-bit label maps with ignore 255")
        self.num_classes = num_classes
        self.classes: list[str] = names

    def _pair_files(self) -> tuple[list[Path], list[Path]]:
        images = list_files(self.image_dir, IMAGE_EXTENSIONS, recursive=False, what="image folder")
        if not images:
            raise DataError(f"no images in {self.image_dir}: add .jpg/.png images (and their label PNGs)")
        labels = []
        for img in images:
            lab = self.label_dir / f"{img.stem}.png"
            if not lab.is_file():
                raise DataError(f"image {img} has no annotation {lab}: add the label PNG or remove the image")
            labels.append(check_member(lab, self.label_dir))
        return images, labels

    def __len__(self) -> int:
        return len(self.images)

    def load_label(self, index: int) -> np.ndarray:
        """The label map of item ``index`` in class indices (reduced as configured), range-checked."""
        raw = read_label_map(self.labels[index])
        if self.reduce_zero_label:
            lab = raw.astype(np.int32) - 1
            lab[raw == 0] = self.ignore_index
            lab[raw == self.ignore_index] = self.ignore_index
        else:
            lab = raw.astype(np.int32)
        valid = lab[lab != self.ignore_index]
        if valid.size and (valid.max() >= self.num_classes or valid.min() < 0):
            bad = int(valid.max() if valid.max() >= self.num_classes else valid.min())
            raw_bad = bad + 1 if self.reduce_zero_label else bad
            raise DataError(
                f"label map {self.labels[index]} has class value {raw_bad}, out of range for {self.num_classes} "
                f"classes (reduce_zero_label={self.reduce_zero_label}): fix the map or num_classes/reduce_zero_label"
            )
        return lab

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        path = self.images[index]
        try:
            pil = load_rgb(path)
        except DataError:
            raise
        except Exception as e:  # Pillow raises several types for a file it cannot decode
            raise DataError(f"cannot read image {path} ({_one_line(e)}): replace the file") from None
        lab = self.load_label(index)
        if lab.shape != (pil.height, pil.width):
            raise DataError(
                f"label map {self.labels[index]} is {lab.shape[1]}x{lab.shape[0]} but image {path} is "
                f"{pil.width}x{pil.height}: they must be the same size"
            )
        image = tv_tensors.Image(TF.pil_to_tensor(pil))
        label = tv_tensors.Mask(torch.from_numpy(lab.astype(np.int64)))
        image, label = self.transforms(image, label)
        image = TF.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor)
        target = {
            "sem_seg": label.as_subclass(torch.Tensor).long(),
            "image_id": index,
            "file_name": path.name,
            "image_size": torch.tensor(list(image.shape[-2:])),
            "orig_size": torch.tensor([pil.height, pil.width]),
        }
        return image, target

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, reduce_zero_label={self.reduce_zero_label})"
        )
