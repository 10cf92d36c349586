"""ImageNet-style class-per-sub-folder data sets that fail with one-line errors and survive corrupt images.

A corrupt JPEG in a million-image data set should cost one sample, not the run: ``ImageFolderDataset`` returns a
``CorruptSample`` marker instead of raising (an exception inside a DataLoader worker surfaces as a multi-line
re-raised traceback), and ``collate_skip_corrupt`` drops the markers and reports their paths to the caller.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms.functional import pil_to_tensor

from rapidnet.data.listing import data_folder, walk_folder
from rapidnet.errors import DataError

__all__ = [
    "IMG_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "CorruptSample",
    "ImageFolderDataset",
    "check_classes_readable",
    "check_same_classes",
    "collate_dense",
    "collate_skip_corrupt",
    "load_rgb",
    "targets_to_device",
    "unreadable_image_error",
]

IMG_EXTENSIONS: tuple[str, ...] = torchvision.datasets.folder.IMG_EXTENSIONS

_MAX_NAMES = 5  # how many class names an error message lists before "(+N more)"


@dataclass(frozen=True)
class CorruptSample:
    """Returned by ``ImageFolderDataset[i]`` in place of ``(image, target)`` when the file cannot be decoded.

    A dataclass rather than a tuple so that ``img, target = ds[i]`` fails loudly instead of silently unpacking it.
    """

    path: str
    reason: str


#: the most pixels an image may have to be decoded: Pillow's own threshold (``Image.MAX_IMAGE_PIXELS``, about 89 M),
#: above which it only warns (and raises ``DecompressionBombError`` from twice that). A PNG header of 40 bytes can
#: claim 60000 x 60000 pixels, 10 GB once decoded; here anything above the threshold is refused before decoding.
MAX_IMAGE_PIXELS = 89_478_485


#: pixels any image may decode to, whatever its file size (4096 x 4096: 48 MB as RGB)
FREE_PIXELS = 4096 * 4096
#: above :data:`FREE_PIXELS`, the most pixels per byte of file: 0.25 bits per pixel, which honest JPEG and PNG photos
#: stay well above; a 1 KB PNG of one colour that claims 10,000 x 10,000 pixels is far below
MAX_PIXELS_PER_BYTE = 32


def open_image(f: Any, path: str | os.PathLike[str]) -> Image.Image:
    """``Image.open`` of the open file ``f`` with the size checked from the header, before anything is decoded.

    Refused (``DataError``): more than :data:`MAX_IMAGE_PIXELS` pixels, or more than :data:`FREE_PIXELS` pixels and
    more than :data:`MAX_PIXELS_PER_BYTE` per byte of the file: what decoding costs stays in proportion to what was
    read, so a tiny file cannot ask for gigabytes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below with a one-line error
        try:
            img = Image.open(f)
        except Image.DecompressionBombError as e:  # over twice the threshold: Pillow says how many pixels
            found = re.search(r"\((\d+) pixels\)", str(e))
            raise DataError(_too_large(path, f"{int(found.group(1)):,} pixels" if found else "too large")) from None
    pixels = img.width * img.height
    if pixels > MAX_IMAGE_PIXELS:
        raise DataError(_too_large(path, f"{img.width}x{img.height} pixels"))
    size = os.fstat(f.fileno()).st_size if hasattr(f, "fileno") else 0
    if pixels > FREE_PIXELS and pixels > MAX_PIXELS_PER_BYTE * size:
        raise DataError(
            f"image {path} claims {img.width}x{img.height} pixels from {size:,} bytes ({pixels / max(size, 1):,.0f} "
            f"pixels per byte; above {FREE_PIXELS:,} pixels this project decodes at most {MAX_PIXELS_PER_BYTE} per "
            "byte, a guard against decompression bombs): if it is a genuine image, downscale it (e.g. to 4096 px on "
            "the long side)"
        )
    return img


def load_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image fully (``convert`` forces the lazy decode) so truncation is detected here, not in a transform.

    The size is checked from the header before any decoding (:func:`open_image`). 16-bit and 32-bit greyscale
    (PNG/TIFF modes ``I;16``, ``I``, ``F``) are scaled to 8 bits rather than clipped: Pillow's ``convert("RGB")``
    saturates every value above 255, so a 16-bit scan would come out white.
    """
    with open(path, "rb") as f:
        img = open_image(f, path)
        if img.mode.startswith("I") or img.mode == "F":
            return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
        return img.convert("RGB")


def unreadable_image_error(path: str) -> DataError:
    """One line naming the unreadable file, why, and the option that skips such files (for a ``CorruptSample``)."""
    try:
        load_rgb(path)
        reason = "unreadable"
    except Exception as e:  # the decoder's own message says what is wrong with the file
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
    return DataError(f"cannot read image {path} ({reason}): replace or delete it, or pass --skip-corrupt to skip it")


def _too_large(path: str | os.PathLike[str], size: str) -> str:
    return (
        f"image {path} is {size}, more than the {MAX_IMAGE_PIXELS:,} this project decodes "
        "(a decompression bomb?): resize it or remove it"
    )


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Greyscale of more than 8 bits to ``uint8``, full range to full range.

    Non-negative values up to 255 (an 8-bit image stored wide) stay as they are, up to 65535 are 16-bit (``I;16``,
    and the ``I`` of a 16-bit PNG) and are scaled by 255/65535, floats up to 1 by 255; anything else is stretched from
    its own minimum to its maximum.
    """
    values = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 2:
        low, high = 0.0, 65535.0  # a dark 16-bit scan stays dark: scale by the format's range, not the image's
    elif low >= 0:
        tops = (1.0, 255.0, 65535.0) if arr.dtype.kind == "f" else (255.0, 65535.0)
        top = next((t for t in tops if high <= t), None)
        low, high = (0.0, top) if top is not None else (low, high)
    if high <= low:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((values - low) * (255 / (high - low))).clip(0, 255).astype(np.uint8)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" (+{len(names) - _MAX_NAMES} more)" if len(names) > _MAX_NAMES else "")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ImageFolderDataset(torchvision.datasets.ImageFolder):
    """``torchvision.datasets.ImageFolder`` with one-line ``DataError``s for bad layouts and no crash on bad images.

    Hidden sub-folders (``.ipynb_checkpoints``, ``.cache``) are not classes. A class sub-folder with no images is an
    error unless ``allow_empty=True``, since it would silently shift every later class index between train and val.
    Fewer than ``min_classes`` classes is an error too (``build_dataset`` asks for 2: one class trains to a
    meaningless 100%).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        loader: Callable[[str], Any] = load_rgb,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
        min_classes: int = 1,
    ) -> None:
        layout = f"put images in {Path(root).expanduser()}/<class_name>/, one sub-folder per class"
        path = data_folder(root, "image folder", layout)
        super().__init__(
            str(path),
            transform=transform,
            target_transform=target_transform,
            loader=loader,
            is_valid_file=is_valid_file,
            allow_empty=True,  # checked below, with a better message than torchvision's
        )
        if not self.samples:
            exts = "/".join(IMG_EXTENSIONS) if is_valid_file is None else "valid"
            raise DataError(
                f"no images in {path} ({len(self.classes)} class sub-folders, none holding {exts} files): {layout}"
            )
        if len(self.classes) < min_classes:
            raise DataError(
                f"image folder {path} has {len(self.classes)} class sub-folder ({_names(self.classes)}): a classifier "
                f"needs at least {min_classes} classes to learn anything (one class is always right): "
                "add a sub-folder per class"
            )
        used = set(self.targets)
        empty = [name for name, idx in self.class_to_idx.items() if idx not in used]
        if empty and not allow_empty:
            raise DataError(
                f"class sub-folders with no images in {path}: {_names(sorted(empty))}: add images or delete them"
            )

    def find_classes(self, directory: str | os.PathLike[str]) -> tuple[list[str], dict[str, int]]:
        """Class names are the non-hidden sub-folders, sorted, as in torchvision (listed by :mod:`.listing`'s rules)."""
        classes = sorted(p.name for p, is_folder in walk_folder(Path(directory), recursive=False) if is_folder)
        if not classes:
            raise DataError(f"no class sub-folders in {directory}: put images in {directory}/<class_name>/")
        return classes, {name: i for i, name in enumerate(classes)}

    @staticmethod
    def make_dataset(  # type: ignore[override]
        directory: str | os.PathLike[str],
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """``(path, class index)`` of every image, walked once under the data folder rules (:mod:`.listing`): a link
        from one class folder into another, or back up the tree, is an error, not a silent relabelling."""
        root = Path(directory)
        valid = is_valid_file or (lambda name: name.lower().endswith(tuple(extensions or IMG_EXTENSIONS)))
        samples = []
        for path, is_folder in walk_folder(root):
            rel = path.relative_to(root).parts
            if not is_folder and len(rel) > 1 and rel[0] in class_to_idx and valid(str(path)):
                samples.append((str(path), class_to_idx[rel[0]]))
        samples.sort(key=lambda s: (s[1], os.path.dirname(s[0]), os.path.basename(s[0])))  # torchvision's order
        return samples

    def __getitem__(self, index: int) -> tuple[Any, Any] | CorruptSample:  # type: ignore[override]
        path, target = self.samples[index]
        try:
            sample = self.loader(path)
        except Exception as exc:  # any decode failure (PIL raises several types) costs one sample, not the run
            return CorruptSample(path=str(path), reason=_one_line(exc))
        if self.transform is not None:
            sample = self.transform(sample)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return sample, target


def check_classes_readable(dataset: ImageFolderDataset, indices: Sequence[int] | None = None) -> None:
    """Refuse a class none of whose images (among ``indices``) can be decoded: with unreadable images skipped, it
    would train as a class without examples, silently. Decodes images of each class in order until one works (one
    decode per class when the data are sound)."""
    chosen = range(len(dataset.samples)) if indices is None else indices
    by_class: dict[int, list[str]] = {}
    for i in chosen:
        path, target = dataset.samples[i]
        by_class.setdefault(target, []).append(path)
    for target, paths in sorted(by_class.items()):
        reason = ""
        for path in paths:
            try:
                dataset.loader(path)
                break
            except Exception as exc:  # any decode failure, as in __getitem__
                reason = reason or f"{path}: {_one_line(exc)}"
        else:
            raise DataError(
                f"class {dataset.classes[target]!r} in {dataset.root}: none of its {len(paths)} images can be read "
                f"(e.g. {reason[:200]}): replace them, or remove the class folder"
            )


def _as_tensor_image(img: Any) -> Any:
    """PIL images become uint8 CHW tensors so an untransformed data set can still be batched."""
    return pil_to_tensor(img) if isinstance(img, Image.Image) else img


def collate_skip_corrupt(batch: Sequence[Any]) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    """DataLoader ``collate_fn`` that drops ``CorruptSample`` items: returns ``(images, targets, corrupt_paths)``.

    ``images`` is the stacked batch (PIL images are converted to uint8 CHW tensors), or ``None`` when every item in
    the batch was corrupt; ``targets`` is then an empty int64 tensor, so callers can skip the step with
    ``if images is None``. Data sets that never yield corrupt samples (Fashion-MNIST) work unchanged.
    """
    corrupt = [item.path for item in batch if isinstance(item, CorruptSample)]
    good = [item for item in batch if not isinstance(item, CorruptSample)]
    if not good:
        return None, torch.empty(0, dtype=torch.long), corrupt
    images = [_as_tensor_image(item[0]) for item in good]
    targets = [item[1] for item in good]
    shapes = {tuple(img.shape) for img in images if isinstance(img, (torch.Tensor, np.ndarray))}
    if len(shapes) > 1:
        listed = ", ".join("x".join(map(str, s)) for s in sorted(shapes)[:_MAX_NAMES])
        raise DataError(
            f"images in one batch have different shapes ({listed}): add a transform that gives one size, "
            "e.g. Resize + CenterCrop"
        )
    if all(isinstance(t, int) and not isinstance(t, bool) for t in targets):
        target_tensor = torch.tensor(targets, dtype=torch.long)
    else:
        target_tensor = default_collate(targets)
    return default_collate(images), target_tensor, corrupt


def check_same_classes(train_ds: Any, val_ds: Any) -> list[str]:
    """Raise ``DataError`` unless both data sets have the same ``.classes`` in the same order; return them.

    Label indices come from class order, so a class missing on one side would silently mislabel the other's images.
    """
    train_classes, val_classes = list(train_ds.classes), list(val_ds.classes)
    if train_classes == val_classes:
        return train_classes
    train_set, val_set = set(train_classes), set(val_classes)
    only_train = [c for c in train_classes if c not in val_set]
    only_val = [c for c in val_classes if c not in train_set]
    if not only_train and not only_val:
        raise DataError(
            f"train and val list the same {len(train_classes)} classes in a different order, so label indices differ: "
            "build both with the same class order (ImageFolder sorts sub-folder names)"
        )
    parts = []
    if only_train:
        parts.append(f"only in train: {_names(only_train)}")
    if only_val:
        parts.append(f"only in val: {_names(only_val)}")
    raise DataError(
        f"train and val have different classes ({'; '.join(parts)}): give both folders the same class sub-folders"
    )


def collate_dense(batch: Sequence[tuple[torch.Tensor, dict[str, Any]]]) -> tuple[list[torch.Tensor], list[dict]]:
    """DataLoader ``collate_fn`` for both dense tasks: ``(list of images, list of target dicts)``, sizes may differ."""
    images = [item[0] for item in batch]
    targets = [item[1] for item in batch]
    return images, targets


def targets_to_device(targets: Sequence[Mapping[str, Any]], device: torch.device | str) -> list[dict[str, Any]]:
    """Move every tensor in a list of target dicts to ``device`` (other values, e.g. file names, are kept)."""
    return [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
