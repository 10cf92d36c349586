"""Data sets for training and evaluating RapidNet: Fashion-MNIST (local IDX files) and ImageNet-style folders.

``build_dataset`` is the one entry point the CLI needs: it recognises the layout of ``data`` so users pass a single
path, and every problem it finds is a one-line ``DataError`` naming the path and the expected layout.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from rapidnet.constants import FASHION_MNIST_NAME
from rapidnet.data.fashion_mnist import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    FASHION_MNIST_FILES,
    FashionMNIST,
    find_fashion_mnist,
    is_fashion_mnist_folder,
    locate_fashion_mnist_files,
    read_idx,
    write_idx,
)
from rapidnet.data.folder import (
    IMG_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    CorruptSample,
    ImageFolderDataset,
    check_classes_readable,
    check_same_classes,
    collate_dense,
    collate_skip_corrupt,
    load_rgb,
    targets_to_device,
)
from rapidnet.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_NAME",
    "IMG_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "CorruptSample",
    "FashionMNIST",
    "ImageFolderDataset",
    "build_dataset",
    "check_classes_readable",
    "check_same_classes",
    "collate_dense",
    "collate_skip_corrupt",
    "find_fashion_mnist",
    "is_fashion_mnist_folder",
    "load_rgb",
    "locate_fashion_mnist_files",
    "read_idx",
    "targets_to_device",
    "write_idx",
]


_SPLITS = {"train": "train", "val": "val", "test": "val"}
_EXPECTED = (
    f"expected '{FASHION_MNIST_NAME}', a folder with the four Fashion-MNIST IDX files "
    f"({', '.join(f'{n}[.gz]' for n in FASHION_MNIST_FILES.values())}), "
    "or an ImageFolder root with train/<class>/ and val/<class>/ sub-folders of images"
)


def build_dataset(
    data: str | os.PathLike[str],
    split: str,
    transform: Callable[[Any], Any] | None = None,
) -> Dataset:
    """Build the ``split`` ("train", or "val"/"test" for held-out data) of the data set ``data`` names.

    ``data`` is ``"fashion-mnist"`` (the installed copy, see ``find_fashion_mnist``), a folder holding the four
    Fashion-MNIST IDX files, or an ImageFolder root with ``train/`` and ``val/``. Fashion-MNIST's "val" is its test
    split. The result always has ``.classes`` (list[str]); an ImageFolder split needs at least 2 classes.
    """
    kind = _SPLITS.get(split)
    if kind is None:
        raise DataError(f"unknown split {split!r} for data set {data}: use 'train', 'val' or 'test'")
    fm_split = "train" if kind == "train" else "test"
    if isinstance(data, str) and data == FASHION_MNIST_NAME:
        return FashionMNIST(None, split=fm_split, transform=transform)

    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"data set {path} does not exist: {_EXPECTED}")
    if not path.is_dir():
        raise DataError(f"data set {path} is not a folder: {_EXPECTED}")
    if is_fashion_mnist_folder(path):
        return FashionMNIST(path, split=fm_split, transform=transform)
    if (path / "train").is_dir() or (path / "val").is_dir():
        sub = path / kind
        if not sub.is_dir():
            raise DataError(f"ImageFolder root {path} has no {kind}/ sub-folder: {_EXPECTED}")
        return ImageFolderDataset(sub, transform=transform, min_classes=2)

    found, missing = locate_fashion_mnist_files(path)
    if found:
        raise DataError(
            f"data set {path} has only some Fashion-MNIST IDX files (missing {', '.join(missing)}): "
            "add the missing files (plain or .gz)"
        )
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    if not entries:
        raise DataError(f"data set {path} is empty: {_EXPECTED}")
    if any(p.is_dir() for p in entries):
        raise DataError(
            f"data set {path} has sub-folders but no train/ or val/ (move class folders into both): {_EXPECTED}"
        )
    raise DataError(f"data set {path} is not a recognised layout: {_EXPECTED}")
