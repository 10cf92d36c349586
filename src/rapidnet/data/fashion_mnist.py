"""Fashion-MNIST from the IDX files Debian's ``dataset-fashion-mnist`` installs, with no download step.

Images are served as 3-channel PIL images so the same ImageNet-style transforms used for folder data sets apply
unchanged; ``FashionMNIST.images`` gives the raw ``(N, 28, 28)`` uint8 array for code that wants tensors directly.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from rapidnet.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "FASHION_MNIST_FILES",
    "FashionMNIST",
    "find_fashion_mnist",
    "is_fashion_mnist_folder",
    "locate_fashion_mnist_files",
    "read_idx",
    "write_idx",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "RAPIDNET_FASHION_MNIST"

# Logical name -> canonical file name (without .gz); keys are what ``locate_fashion_mnist_files`` returns.
FASHION_MNIST_FILES: dict[str, str] = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}

_INSTALL_HINT = (
    "install it with `apt-get install -y dataset-fashion-mnist` (as root) "
    "or pass a folder containing the four IDX files"
)

# IDX type code -> big-endian numpy dtype, as defined by the format (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _candidate_names(name: str) -> list[str]:
    """File names a copy of ``name`` may have: plain or gzipped, and the dotted spelling some mirrors use."""
    dotted = name.replace("-idx", ".idx", 1)
    return [name, f"{name}.gz", dotted, f"{dotted}.gz"]


def locate_fashion_mnist_files(folder: str | os.PathLike[str]) -> tuple[dict[str, Path], list[str]]:
    """Look for the four IDX files directly in ``folder``; return ``(found, missing_file_names)``.

    Never raises, so callers can use it to *detect* a Fashion-MNIST folder as well as to load one.
    """
    folder = Path(folder)
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in FASHION_MNIST_FILES.items():
        for candidate in _candidate_names(name):
            path = folder / candidate
            if path.is_file():
                found[key] = path
                break
        else:
            missing.append(name)
    return found, missing


def _search_folders(root: Path) -> list[Path]:
    """Folders that may hold the files: the root itself and torchvision's ``raw/`` layouts below it."""
    return [root, root / "raw", root / "FashionMNIST" / "raw"]


def is_fashion_mnist_folder(path: str | os.PathLike[str]) -> bool:
    """True when ``find_fashion_mnist(path)`` would succeed; lets callers detect the layout without try/except."""
    return any(f.is_dir() and not locate_fashion_mnist_files(f)[1] for f in _search_folders(Path(path).expanduser()))


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder holding the four Fashion-MNIST IDX files, else raise a one-line ``DataError`` with the fix.

    ``root=None`` means ``$RAPIDNET_FASHION_MNIST`` if set, else ``DEFAULT_FASHION_MNIST_DIR`` (the Debian package).
    """
    from_default = root is None
    if root is None:
        root = os.environ.get(FASHION_MNIST_ENV) or DEFAULT_FASHION_MNIST_DIR
    root = Path(root).expanduser()
    hint = _INSTALL_HINT + (f" (or set {FASHION_MNIST_ENV} to one)" if from_default else "")
    if not root.exists():
        raise DataError(f"Fashion-MNIST folder {root} does not exist: {hint}")
    if not root.is_dir():
        raise DataError(f"Fashion-MNIST path {root} is not a folder: {hint}")
    fewest_missing: list[str] | None = None
    for folder in _search_folders(root):
        if not folder.is_dir():
            continue
        _, missing = locate_fashion_mnist_files(folder)
        if not missing:
            return folder
        if fewest_missing is None or len(missing) < len(fewest_missing):
            fewest_missing = missing
    missing_text = ", ".join(fewest_missing or FASHION_MNIST_FILES.values())
    raise DataError(f"no complete Fashion-MNIST data in {root} (missing {missing_text}): {hint}")


def _idx_error(path: Path, problem: str) -> DataError:
    return DataError(f"IDX file {path} {problem}: re-download it or reinstall the package that provides it")


#: a gzipped file may expand to this many times its size (Fashion-MNIST's expand 2-5x), and at least to 64 MB: a
#: "gzip bomb" of 1 MB would otherwise expand to 1 GB in memory before any header check
_MAX_GZIP_RATIO, _MIN_GUNZIP_BYTES = 50, 64 << 20
_GUNZIP_CHUNK = 16 << 20


class _TooLarge(Exception):
    """A gzip stream that expands past its limit (the limit is the argument)."""


def _gunzip_bounded(data: bytes, limit: int) -> bytearray:
    """``gzip.decompress`` that stops with :class:`_TooLarge` once the output passes ``limit`` bytes.

    Output comes in chunks of at most 16 MB, kept apart until the end: while expanding, the peak memory is the
    output so far plus one chunk (growing one buffer would copy it on reallocation, up to twice the output, which
    is what a bomb's limit is set against); joined once the stream has proved small enough.
    """
    chunks: list[bytes] = []
    size = 0
    while data:
        inflate = zlib.decompressobj(wbits=31)  # one gzip member (``gzip.compress`` output may hold several)
        while True:
            chunks.append(inflate.decompress(data, _GUNZIP_CHUNK))
            size += len(chunks[-1])
            if size > limit:
                raise _TooLarge(limit)
            data = inflate.unconsumed_tail
            if inflate.eof or not data:
                break
        if not inflate.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        data = inflate.unused_data.lstrip(b"\0")
    return bytearray().join(chunks)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or plain, detected from its content) into a native-endian numpy array.

    Every header field is checked against the payload so that a truncated download fails here, naming the file,
    rather than later as a reshape error deep inside training.
    """
    path = Path(path)
    try:
        raw: bytes | bytearray = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} does not exist: pass a folder containing the four IDX files") from None
    except OSError as exc:
        raise DataError(
            f"cannot read IDX file {path} ({exc.strerror or exc}): check that it is a readable file"
        ) from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = _gunzip_bounded(raw, max(_MIN_GUNZIP_BYTES, _MAX_GZIP_RATIO * len(raw)))
        except (OSError, EOFError, zlib.error) as exc:
            raise _idx_error(path, f"is a corrupt or truncated gzip file ({_one_line(exc)})") from None
        except _TooLarge as exc:
            raise _idx_error(path, f"expands to more than {exc.args[0]:,} bytes (a gzip bomb?)") from None
    if len(raw) < 4:
        raise _idx_error(path, f"is too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise _idx_error(path, f"is not an IDX file (magic starts 0x{raw[0]:02x}{raw[1]:02x}, expected 0x0000)")
    code, ndim = raw[2], raw[3]
    dtype = _IDX_DTYPES.get(code)
    if dtype is None:
        raise _idx_error(path, f"has unknown IDX data type code 0x{code:02x}")
    if ndim == 0:
        raise _idx_error(path, "declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise _idx_error(path, f"is truncated inside its header ({len(raw)} of {header_len} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise _idx_error(path, f"is truncated (header {dims} needs {expected} data bytes, file has {actual})")
    if actual > expected:
        raise _idx_error(path, f"is malformed (header {dims} needs {expected} data bytes, file has {actual})")
    array = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike[str], array: Any) -> Path:
    """Write ``array`` as an IDX file (gzipped when the name ends in ``.gz``); used to build small test data sets."""
    path = Path(path)
    arr = np.asarray(array)
    code = next((c for c, dt in _IDX_DTYPES.items() if dt.newbyteorder("=") == arr.dtype.newbyteorder("=")), None)
    if code is None:
        supported = ", ".join(str(dt.newbyteorder("=")) for dt in _IDX_DTYPES.values())
        raise DataError(f"cannot write dtype {arr.dtype} to IDX file {path}: convert the array to one of {supported}")
    if not 1 <= arr.ndim <= 255:
        raise DataError(f"cannot write a {arr.ndim}-d array to IDX file {path}: IDX holds 1 to 255 dimensions")
    if any(d >= 2**32 for d in arr.shape):
        raise DataError(f"cannot write shape {arr.shape} to IDX file {path}: each dimension must be below 2**32")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + np.ascontiguousarray(arr, dtype=_IDX_DTYPES[code]).tobytes()
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=6, mtime=0)
    path.write_bytes(payload)
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST held in memory as uint8 numpy; items are ``(RGB PIL image, int label)`` before transforms.

    Grayscale is replicated to three channels because every RapidNet model and ImageNet-style transform expects RGB.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        split: str = "train",
        transform: Callable[[Any], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
    ) -> None:
        if split not in ("train", "test"):
            raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
        self.root: Path = find_fashion_mnist(root)
        self.split = split
        self.transform = transform
        self.target_transform = target_transform
        self.classes: list[str] = list(FASHION_MNIST_CLASSES)
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}

        files, _ = locate_fashion_mnist_files(self.root)
        images_path, labels_path = files[f"{split}-images"], files[f"{split}-labels"]
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or images.dtype != np.uint8:
            raise DataError(
                f"IDX file {images_path} holds a {images.ndim}-d {images.dtype} array, expected (N, H, W) uint8 "
                "images: pass the Fashion-MNIST image file"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise DataError(
                f"IDX file {labels_path} holds a {labels.ndim}-d {labels.dtype} array, expected (N,) integer "
                "labels: pass the Fashion-MNIST label file"
            )
        if len(images) != len(labels):
            raise DataError(
                f"Fashion-MNIST {split} split in {self.root} has {len(images)} images but {len(labels)} labels: "
                "the image and label files come from different sets; reinstall them"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.classes)):
            raise DataError(
                f"IDX file {labels_path} has labels outside 0..{len(self.classes) - 1} "
                f"(min {labels.min()}, max {labels.max()}): pass the Fashion-MNIST label file"
            )
        self.images: np.ndarray = images
        self.labels: np.ndarray = labels.astype(np.int64)
        self.targets: list[int] = self.labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        img: Any = Image.fromarray(self.images[index]).convert("RGB")
        target: Any = int(self.labels[index])
        if self.transform is not None:
            img = self.transform(img)
        if self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"
