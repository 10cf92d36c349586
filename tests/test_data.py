"""Tests for rapidnet.data: IDX I/O, Fashion-MNIST, ImageFolder error handling and build_dataset dispatch.

Everything runs on tiny fake data sets written to tmp_path; only one test touches the Debian Fashion-MNIST copy.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from rapidnet.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    CorruptSample,
    FashionMNIST,
    ImageFolderDataset,
    build_dataset,
    check_same_classes,
    collate_skip_corrupt,
    find_fashion_mnist,
    read_idx,
    write_idx,
)
from rapidnet.errors import DataError

N_TRAIN, N_TEST = 6, 4


def assert_one_line(exc: pytest.ExceptionInfo[DataError]) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def make_fake_fashion_mnist(folder: Path, gz: bool = True, n_train: int = N_TRAIN, n_test: int = N_TEST) -> Path:
    """Write the four IDX files; image i of a split is filled with the value 10 * i + label so items are traceable."""
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            images[i] = 10 * i + labels[i]
            images[i, 0, 0] = 255  # not a constant image, so per-pixel checks mean something
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


def save_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            ext = "jpg" if i % 2 == 0 else "png"
            save_image(root / name / f"{i}.{ext}", (40 * c, 100, 20 * i))
    return root


def write_corrupt_jpeg(path: Path) -> Path:
    """A real JPEG cut in half: the header parses, decoding fails, as with an interrupted download."""
    save_image(path, (200, 10, 10), size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


TO_TENSOR = transforms.Compose([transforms.Resize((8, 8)), transforms.ToTensor()])


# ----------------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["arr-idx3-ubyte", "arr-idx3-ubyte.gz"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4),
        np.array([-5, 0, 7, 2**30], dtype=np.int32),
        np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
        np.array([[-3, 3]], dtype=np.int16),
        np.array([1.5, -2.25], dtype=np.float64),
    ],
    ids=["uint8-3d", "int32-1d", "float32-2d", "int16-2d", "float64-1d"],
)
def test_idx_round_trip(tmp_path: Path, name: str, array: np.ndarray) -> None:
    path = write_idx(tmp_path / name, array)
    is_gz = path.read_bytes()[:2] == b"\x1f\x8b"
    assert is_gz == name.endswith(".gz")
    back = read_idx(path)
    assert back.dtype == array.dtype
    assert back.dtype.isnative
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    back[...] = 0  # the result must be writable, not a view of a read-only buffer


def test_idx_header_is_big_endian(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x-idx1-ubyte", np.array([1, 2, 3], dtype=np.int32))
    raw = path.read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 1])
    assert raw[4:8] == (3).to_bytes(4, "big")
    assert raw[8:12] == (1).to_bytes(4, "big")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_raises_data_error_naming_file(tmp_path: Path, gz: bool) -> None:
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = write_idx(tmp_path / name, np.ones((3, 28, 28), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(DataError) as exc:
        read_idx(path)
    message = assert_one_line(exc)
    assert str(path) in message
    assert "truncated" in message


def test_idx_bad_headers_raise_data_error(tmp_path: Path) -> None:
    cases = {
        "short": b"\x00\x00",
        "magic": b"\x01\x02\x08\x01\x00\x00\x00\x01\x05",
        "dtype": b"\x00\x00\x07\x01\x00\x00\x00\x01\x05",
        "header": b"\x00\x00\x08\x03\x00\x00\x00\x01",
        "trailing": b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06",
        "gzip": gzip.compress(b"\x00" * 200)[:15],
    }
    for name, payload in cases.items():
        path = tmp_path / f"{name}-idx1-ubyte"
        path.write_bytes(payload)
        with pytest.raises(DataError) as exc:
            read_idx(path)
        assert str(path) in assert_one_line(exc), name
    with pytest.raises(DataError, match="does not exist"):
        read_idx(tmp_path / "absent-idx1-ubyte")


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


# ------------------------------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_classes() -> None:
    assert len(FASHION_MNIST_CLASSES) == 10
    assert FASHION_MNIST_CLASSES[0] == "T-shirt/top"
    assert FASHION_MNIST_CLASSES[9] == "Ankle boot"
    assert Path("/usr/share/datasets/fashion-mnist") == DEFAULT_FASHION_MNIST_DIR


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_item_is_rgb_pil_with_label(tmp_path: Path, gz: bool) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm", gz=gz)
    ds = FashionMNIST(root, split="train")
    assert len(ds) == N_TRAIN
    assert ds.root == root
    assert ds.classes == list(FASHION_MNIST_CLASSES)
    assert ds.targets == [i % 10 for i in range(N_TRAIN)]
    assert isinstance(ds.images, np.ndarray)
    assert ds.images.shape == (N_TRAIN, 28, 28)
    assert ds.images.dtype == np.uint8
    for i in (0, 3, N_TRAIN - 1):
        img, label = ds[i]
        assert isinstance(img, Image.Image)
        assert img.mode == "RGB"
        assert img.size == (28, 28)
        assert isinstance(label, int)
        assert label == i % 10
        pixels = np.asarray(img)
        assert pixels.shape == (28, 28, 3)
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
        np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
        np.testing.assert_array_equal(pixels[..., 0], ds.images[i])
        assert pixels[5, 5, 0] == 10 * i + label

    test = FashionMNIST(root, split="test")
    assert len(test) == N_TEST


def test_fashion_mnist_transforms_apply(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    ds = FashionMNIST(root, split="test", transform=TO_TENSOR, target_transform=lambda t: t + 100)
    img, target = ds[2]
    assert isinstance(img, torch.Tensor)
    assert img.shape == (3, 8, 8)
    assert target == 102


def test_fashion_mnist_count_mismatch(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(N_TRAIN + 1, dtype=np.uint8))
    with pytest.raises(DataError) as exc:
        FashionMNIST(root, split="train")
    message = assert_one_line(exc)
    assert f"{N_TRAIN} images but {N_TRAIN + 1} labels" in message


def test_fashion_mnist_label_out_of_range(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.full(N_TEST, 10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"outside 0\.\.9"):
        FashionMNIST(root, split="test")


def test_fashion_mnist_bad_split(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    with pytest.raises(DataError, match="'train' or 'test'"):
        FashionMNIST(root, split="valid")


def test_find_fashion_mnist_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as exc:
        find_fashion_mnist(missing)
    message = assert_one_line(exc)
    assert str(missing) in message
    assert "apt-get install -y dataset-fashion-mnist" in message


def test_find_fashion_mnist_incomplete_folder(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as exc:
        find_fashion_mnist(root)
    message = assert_one_line(exc)
    assert str(root) in message
    assert "t10k-labels-idx1-ubyte" in message
    assert "train-images" not in message


def test_find_fashion_mnist_mixed_names_and_raw_layout(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm" / "FashionMNIST" / "raw", gz=True)
    # One plain file among gzipped ones is fine.
    (root / "train-labels-idx1-ubyte").write_bytes(gzip.decompress((root / "train-labels-idx1-ubyte.gz").read_bytes()))
    (root / "train-labels-idx1-ubyte.gz").unlink()
    assert find_fashion_mnist(tmp_path / "fm") == root
    assert len(FashionMNIST(tmp_path / "fm")) == N_TRAIN


def test_find_fashion_mnist_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(root))
    assert find_fashion_mnist() == root
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path / "gone"))
    with pytest.raises(DataError) as exc:
        find_fashion_mnist()
    message = assert_one_line(exc)
    assert str(tmp_path / "gone") in message
    assert FASHION_MNIST_ENV in message


@pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    ds = build_dataset("fashion-mnist", "val")
    assert isinstance(ds, FashionMNIST)
    assert len(ds) == 10_000
    assert ds.images.shape == (10_000, 28, 28)
    assert sorted(set(ds.targets)) == list(range(10))
    assert np.bincount(ds.targets).tolist() == [1000] * 10
    img, label = ds[0]
    assert img.mode == "RGB" and img.size == (28, 28)
    assert label == 9  # the first t10k item is an ankle boot


# --------------------------------------------------------------------------------------------------- ImageFolder


def test_image_folder_basic(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", classes=("cat", "dog"), per_class=3)
    (root / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (root / "cat" / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(root, transform=TO_TENSOR)
    assert ds.classes == ["cat", "dog"]
    assert len(ds) == 6
    assert ds.targets == [0, 0, 0, 1, 1, 1]
    img, target = ds[4]
    assert img.shape == (3, 8, 8)
    assert target == 1


def test_image_folder_corrupt_jpeg_gives_marker(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    bad = write_corrupt_jpeg(root / "cat" / "broken.jpg")
    ds = ImageFolderDataset(root, transform=TO_TENSOR)
    assert len(ds) == 5
    bad_index = [p for p, _ in ds.samples].index(str(bad))
    item = ds[bad_index]
    assert isinstance(item, CorruptSample)
    assert item.path == str(bad)
    assert item.reason and "\n" not in item.reason

    images, targets, corrupt = collate_skip_corrupt([ds[i] for i in range(len(ds))])
    assert corrupt == [str(bad)]
    assert images is not None
    assert images.shape == (4, 3, 8, 8)
    assert targets.dtype == torch.long
    assert targets.tolist() == [0, 0, 1, 1]


def test_dataloader_with_workers_reports_corrupt(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs", per_class=3)
    bad = write_corrupt_jpeg(root / "dog" / "zz_broken.jpg")
    not_an_image = root / "cat" / "fake.png"
    not_an_image.write_bytes(b"this is not a png")
    ds = ImageFolderDataset(root, transform=TO_TENSOR)
    loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=collate_skip_corrupt)
    seen, reported = 0, []
    for images, targets, corrupt in loader:
        if images is not None:
            assert images.shape[1:] == (3, 8, 8)
            assert len(images) == len(targets)
            seen += len(images)
        reported += corrupt
    assert seen == 6
    assert sorted(reported) == sorted([str(bad), str(not_an_image)])


def test_collate_all_corrupt_batch() -> None:
    images, targets, corrupt = collate_skip_corrupt([CorruptSample("a.jpg", "bad"), CorruptSample("b.jpg", "bad")])
    assert images is None
    assert targets.shape == (0,) and targets.dtype == torch.long
    assert corrupt == ["a.jpg", "b.jpg"]


def test_collate_fashion_mnist_batches(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    raw = FashionMNIST(root)  # PIL images, no transform: collated as uint8 CHW tensors
    images, targets, corrupt = collate_skip_corrupt([raw[i] for i in range(3)])
    assert images is not None
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 28, 28)
    assert targets.tolist() == [0, 1, 2]
    assert corrupt == []
    loader = DataLoader(FashionMNIST(root, transform=TO_TENSOR), batch_size=4, collate_fn=collate_skip_corrupt)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [4, N_TRAIN - 4]
    assert all(b[2] == [] for b in batches)


def test_collate_mixed_sizes_is_one_line_error(tmp_path: Path) -> None:
    a = save_image(tmp_path / "a.png", (1, 2, 3), size=(5, 5))
    b = save_image(tmp_path / "b.png", (1, 2, 3), size=(6, 5))
    with pytest.raises(DataError) as exc:
        collate_skip_corrupt([(Image.open(a), 0), (Image.open(b), 1)])
    assert "Resize" in assert_one_line(exc)


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as exc:
        ImageFolderDataset(tmp_path / "absent")
    message = assert_one_line(exc)
    assert str(tmp_path / "absent") in message and "does not exist" in message


def test_image_folder_without_class_folders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    save_image(root / "loose.jpg", (0, 0, 0))
    with pytest.raises(DataError) as exc:
        ImageFolderDataset(root)
    message = assert_one_line(exc)
    assert str(root) in message and "class sub-folders" in message


def test_image_folder_without_images(tmp_path: Path) -> None:
    root = tmp_path / "noimgs"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError) as exc:
        ImageFolderDataset(root)
    message = assert_one_line(exc)
    assert str(root) in message and "no images" in message


def test_image_folder_with_an_empty_class(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "imgs")
    (root / "emu").mkdir()
    with pytest.raises(DataError) as exc:
        ImageFolderDataset(root)
    assert "emu" in assert_one_line(exc)
    assert ImageFolderDataset(root, allow_empty=True).classes == ["cat", "dog", "emu"]


def test_check_same_classes(tmp_path: Path) -> None:
    train = ImageFolderDataset(make_image_folder(tmp_path / "train", classes=("a", "b", "x")))
    val_ok = ImageFolderDataset(make_image_folder(tmp_path / "val_ok", classes=("a", "b", "x")))
    val_bad = ImageFolderDataset(make_image_folder(tmp_path / "val_bad", classes=("a", "c", "x")))
    assert check_same_classes(train, val_ok) == ["a", "b", "x"]
    with pytest.raises(DataError) as exc:
        check_same_classes(train, val_bad)
    message = assert_one_line(exc)
    assert "only in train: b" in message
    assert "only in val: c" in message
    assert "same class sub-folders" in message


def test_check_same_classes_lists_a_few(tmp_path: Path) -> None:
    class Fake:
        def __init__(self, classes: list[str]) -> None:
            self.classes = classes

    with pytest.raises(DataError) as exc:
        check_same_classes(Fake([f"c{i}" for i in range(20)]), Fake([]))
    message = assert_one_line(exc)
    assert "c0, c1, c2, c3, c4 (+15 more)" in message
    assert "only in val" not in message
    with pytest.raises(DataError, match="different order"):
        check_same_classes(Fake(["a", "b"]), Fake(["b", "a"]))


# ------------------------------------------------------------------------------------------------- build_dataset


def test_build_dataset_fashion_mnist_literal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm")
    monkeypatch.setenv(FASHION_MNIST_ENV, str(root))
    train = build_dataset("fashion-mnist", "train")
    val = build_dataset("fashion-mnist", "val", transform=TO_TENSOR)
    assert isinstance(train, FashionMNIST) and train.split == "train" and len(train) == N_TRAIN
    assert isinstance(val, FashionMNIST) and val.split == "test" and len(val) == N_TEST
    assert val[0][0].shape == (3, 8, 8)
    assert train.classes == list(FASHION_MNIST_CLASSES)


def test_build_dataset_fashion_mnist_folder(tmp_path: Path) -> None:
    root = make_fake_fashion_mnist(tmp_path / "fm", gz=False)
    test = build_dataset(str(root), "test")
    assert isinstance(test, FashionMNIST)
    assert len(test) == N_TEST
    assert len(build_dataset(root, "train")) == N_TRAIN


def test_build_dataset_image_folder(tmp_path: Path) -> None:
    root = tmp_path / "imnet"
    make_image_folder(root / "train", classes=("ant", "bee"), per_class=3)
    make_image_folder(root / "val", classes=("ant", "bee"), per_class=1)
    train = build_dataset(str(root), "train", transform=TO_TENSOR)
    val = build_dataset(str(root), "val")
    test = build_dataset(str(root), "test")
    assert isinstance(train, ImageFolderDataset)
    assert len(train) == 6 and len(val) == 2 and len(test) == 2
    assert train.classes == val.classes == ["ant", "bee"]
    assert train[0][0].shape == (3, 8, 8)
    assert check_same_classes(train, val) == ["ant", "bee"]


def test_build_dataset_errors(tmp_path: Path) -> None:
    def message_for(data: str | Path, split: str = "train") -> str:
        with pytest.raises(DataError) as exc:
            build_dataset(data, split)
        return assert_one_line(exc)

    absent = tmp_path / "absent"
    assert str(absent) in message_for(absent)
    assert "train/" in message_for(absent)

    empty = tmp_path / "empty"
    empty.mkdir()
    msg = message_for(empty)
    assert str(empty) in msg and "empty" in msg

    just_train = tmp_path / "just_train"
    make_image_folder(just_train / "train")
    msg = message_for(just_train, "val")
    assert str(just_train) in msg and "val/" in msg

    flat = make_image_folder(tmp_path / "flat")
    msg = message_for(flat)
    assert str(flat) in msg and "train/" in msg

    partial = make_fake_fashion_mnist(tmp_path / "partial")
    (partial / "train-images-idx3-ubyte.gz").unlink()
    msg = message_for(partial)
    assert str(partial) in msg and "train-images-idx3-ubyte" in msg

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "not a folder" in message_for(a_file)

    assert "'train', 'val' or 'test'" in message_for(make_fake_fashion_mnist(tmp_path / "fm"), "dev")
