"""COCO instances (boxes + instance masks) read with pycocotools, served as torchvision detection targets.

Layout: ``ROOT/annotations/instances_<split>.json`` and images in ``ROOT/<split>/`` (COCO 2017: ``split="train2017"``;
the mosaic data set: ``split="train"``, ``"val"`` or ``"dev"``, its split that chooses the best epoch), or explicit
``ann_file`` / ``image_dir``.

Each item is ``(image, target)``: ``image`` a float ``(3, H, W)`` tensor in ``[0, 1]`` (normalisation belongs to the
model), ``target`` a dict with ``boxes`` (XYXY float), ``labels`` (int64, contiguous 1..K in the order of the
category ids, 0 = background), ``masks`` (uint8 ``(N, H, W)``, from polygons or RLE), ``image_id`` (the COCO id),
``orig_size`` and ``image_size`` (``(H, W)`` before and after the transforms). Crowd regions are left out of the
targets (torchvision's Mask R-CNN cannot use them); the evaluator still sees them in the ground-truth file.
Augmentation is torchvision transforms v2 with ``tv_tensors`` so boxes and masks follow every flip and resize.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from rapidnet.data.coco_schema import read_coco_json, validate_coco
from rapidnet.data.folder import _one_line, collate_dense, load_rgb
from rapidnet.data.listing import check_member, list_files
from rapidnet.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "CocoInstances", "coco_ground_truth", "collate_detection", "detection_transforms"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

collate_detection = collate_dense

#: the most bytes the instance masks of one image may take (objects x height x width, one byte per pixel)
MAX_MASK_BYTES = 1 << 30


def detection_transforms(train: bool, hflip: float = 0.5, photometric: bool = False) -> Callable[..., Any] | None:
    """The detection augmentation: random horizontal flip (+ optional photometric distortion) for training.

    Resizing is left to the model (torchvision's Mask R-CNN resizes to ``min_size``/``max_size``; a tuple of
    ``min_size`` gives multi-scale training), so evaluation images keep the ground-truth file's coordinates.
    """
    if not train:
        return None
    ops: list[Any] = []
    if photometric:
        ops.append(v2.RandomPhotometricDistort(p=0.5))
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops.append(v2.SanitizeBoundingBoxes(min_size=1.0))
    return v2.Compose(ops)


def _load_coco(ann_file: Path) -> Any:
    """The annotation file, checked against the COCO format (:mod:`.coco_schema`), as a pycocotools ``COCO``."""
    data = read_coco_json(ann_file)
    validate_coco(data, ann_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


class CocoInstances(Dataset):
    """A COCO instances split.

    Args:
        root: data set folder (see the module docstring for the layout).
        split: ``train``/``val``/``dev`` (mosaic) or ``train2017``/``val2017`` (COCO).
        train: apply training augmentation (default: the split name starts with "train").
        ann_file, image_dir: override the layout.
        transforms: a v2 transform of ``(image, target)``; default :func:`detection_transforms`.
        check_files: check at construction that every listed image exists (one ``stat`` each).
        check_unlisted: refuse image files in ``image_dir`` that the annotation file does not list.
        remove_empty: drop images without (non-crowd) objects (torchvision's training reference does).
    """

    collate_fn = staticmethod(collate_dense)

    def __init__(
        self,
        root: str | os.PathLike[str],
        split: str = "train",
        *,
        train: bool | None = None,
        ann_file: str | os.PathLike[str] | None = None,
        image_dir: str | os.PathLike[str] | None = None,
        transforms: Callable[..., Any] | None = None,
        hflip: float = 0.5,
        check_files: bool = True,
        check_unlisted: bool = True,
        remove_empty: bool = False,
    ) -> None:
        self.root = Path(root).expanduser()
        self.split = split
        self.ann_file = Path(ann_file) if ann_file else self.root / "annotations" / f"instances_{split}.json"
        self.image_dir = Path(image_dir) if image_dir else self.root / split
        self.train = split.startswith("train") if train is None else train
        if not self.ann_file.is_file():
            raise DataError(
                f"annotation file {self.ann_file} not found: expected ROOT/annotations/instances_{split}.json "
                "(or pass ann_file=)"
            )
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} not found: expected ROOT/{split}/ (or pass image_dir=)")
        self.coco = _load_coco(self.ann_file)
        self._check_categories()
        self._check_images(check_files, check_unlisted)
        ids = sorted(self.coco.imgs)
        if remove_empty:
            ids = [i for i in ids if any(not a.get("iscrowd", 0) for a in self.coco.imgToAnns.get(i, []))]
            if not ids:
                raise DataError(f"{self.ann_file} has no image with objects: check the annotations")
        self.ids: list[int] = ids
        self.transforms = transforms if transforms is not None else detection_transforms(self.train, hflip)

    # ---- checks ----------------------------------------------------------------------------------------------------

    def _check_categories(self) -> None:
        cats = self.coco.dataset.get("categories") or []
        if not cats:
            raise DataError(f"{self.ann_file} has no categories: add a 'categories' list with ids and names")
        cat_ids = sorted(int(c["id"]) for c in cats)
        self.category_ids: list[int] = cat_ids
        self.cat_to_label: dict[int, int] = {c: i + 1 for i, c in enumerate(cat_ids)}
        self.label_to_cat: dict[int, int] = {i + 1: c for i, c in enumerate(cat_ids)}
        self.classes: list[str] = [str(self.coco.cats[c].get("name", c)) for c in cat_ids]

    def _check_images(self, check_files: bool, check_unlisted: bool) -> None:
        if not self.coco.imgs:
            raise DataError(f"{self.ann_file} lists no images: add entries to its 'images' list")
        listed = {str(img["file_name"]) for img in self.coco.imgs.values()}
        if check_files:
            for name in sorted(listed):
                if not (self.image_dir / name).is_file():
                    raise DataError(
                        f"image {self.image_dir / name} listed in {self.ann_file.name} is missing: restore the file "
                        "or remove its entry"
                    )
                check_member(self.image_dir / name, self.image_dir)
        if check_unlisted:
            for path in list_files(self.image_dir, IMAGE_EXTENSIONS, recursive=False, what="image folder"):
                if path.name not in listed:
                    raise DataError(
                        f"image {path} has no entry in {self.ann_file.name}: add it to 'images' (with its "
                        "annotations) or remove the file (or pass check_unlisted=False)"
                    )

    # ---- items -----------------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Object classes, background excluded (what ``mask_rcnn(num_classes=...)`` takes)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> Image.Image:
        info = self.coco.imgs[self.ids[index]]
        path = self.image_dir / info["file_name"]
        try:
            return load_rgb(path)
        except DataError:
            raise
        except Exception as e:  # Pillow raises several types for a file it cannot decode
            raise DataError(f"cannot read image {path} ({_one_line(e)}): replace the file") from None

    def load_target(self, index: int, height: int, width: int) -> dict[str, Any]:
        """Boxes, labels and masks of the non-crowd objects of item ``index``; degenerate boxes are skipped."""
        image_id = self.ids[index]
        anns = [a for a in self.coco.imgToAnns.get(image_id, []) if not a.get("iscrowd", 0)]
        if len(anns) * height * width > MAX_MASK_BYTES:
            raise DataError(
                f"image {self.coco.imgs[image_id]['file_name']} in {self.ann_file.name} has {len(anns)} objects of "
                f"{height}x{width} pixels: their masks would take {len(anns) * height * width / 2**30:.1f} GB, more "
                f"than the {MAX_MASK_BYTES >> 30} GB limit: split the image or drop objects"
            )
        boxes, labels, masks = [], [], []
        for ann in anns:
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
            if x2 <= x1 or y2 <= y1:
                continue
            boxes.append([x1, y1, x2, y2])
            labels.append(self.cat_to_label[ann["category_id"]])
            masks.append(self._mask(ann, height, width))
        mask_arr = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
        return {
            "boxes": tv_tensors.BoundingBoxes(
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": tv_tensors.Mask(torch.from_numpy(mask_arr)),
            "image_id": int(image_id),
        }

    def _mask(self, ann: dict[str, Any], height: int, width: int) -> np.ndarray:
        seg = ann.get("segmentation")
        if not seg:  # boxes only: the box itself stands in for the mask
            mask = np.zeros((height, width), np.uint8)
            x, y, w, h = (round(float(v)) for v in ann["bbox"])
            mask[max(0, y) : y + h, max(0, x) : x + w] = 1
            return mask
        try:
            mask = self.coco.annToMask(ann)
        except Exception as e:  # pycocotools raises bare Exceptions / TypeErrors for malformed polygons or RLE
            raise DataError(
                f"{self.ann_file}: annotation {ann.get('id')} has an unreadable segmentation ({e}): fix it"
            ) from None
        if mask.shape != (height, width):
            raise DataError(
                f"{self.ann_file}: annotation {ann.get('id')} has a {mask.shape} mask for a {height}x{width} image: "
                "fix the image's height/width or the RLE size"
            )
        return mask.astype(np.uint8)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        img = self.load_image(index)
        info = self.coco.imgs[self.ids[index]]
        height, width = img.height, img.width
        if (int(info.get("height", height)), int(info.get("width", width))) != (height, width):
            raise DataError(
                f"image {self.image_dir / info['file_name']} is {height}x{width} but {self.ann_file.name} says "
                f"{info.get('height')}x{info.get('width')}: fix the entry or the file"
            )
        image = tv_tensors.Image(TF.pil_to_tensor(img))
        target = self.load_target(index, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        image = TF.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor)
        out = {k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
        out["orig_size"] = torch.tensor([height, width])
        out["image_size"] = torch.tensor(list(image.shape[-2:]))
        return image, out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.ann_file)!r}, n={len(self)}, classes={self.num_classes})"


def coco_ground_truth(dataset: CocoInstances | Sequence[Any]) -> Any:
    """The pycocotools ``COCO`` object of a dataset (also through ``torch.utils.data.Subset``)."""
    while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset.coco
