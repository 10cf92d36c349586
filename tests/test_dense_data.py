"""Dense data: the mosaic builder, its round trip through the COCO and ADE20K readers, augmentation that keeps
labels aligned with images, and one-line errors for bad data sets."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader

from rapidnet.data import FashionMNIST
from rapidnet.data.ade20k import ADE20KSegmentation, SegTrainTransform
from rapidnet.data.coco import CocoInstances
from rapidnet.data.mosaic import MosaicConfig, build_mosaic, render_scene, scene_rng
from rapidnet.errors import ConfigError, DataError

SEED, SIZE, NUM_TRAIN, NUM_VAL, NUM_DEV = 3, 64, 6, 3, 4

# pycocotools' RLE decoding predates numpy 2's copy keyword
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory, fm_root) -> Path:
    out = tmp_path_factory.mktemp("mosaic") / "data"
    return build_mosaic(
        out,
        seed=SEED,
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        num_dev=NUM_DEV,
        image_size=SIZE,
        fashion_mnist_root=fm_root,
        progress=False,
    )


@functools.cache
def _pool(fm_root: Path, split: str) -> FashionMNIST:
    return FashionMNIST(fm_root, "train" if split == "train" else "test")


def _scene(fm_root: Path, split: str, index: int):
    pool = _pool(fm_root, split)
    return render_scene(pool.images, pool.labels, scene_rng(SEED, split, index), MosaicConfig(image_size=(SIZE, SIZE)))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


# ---- mosaic --------------------------------------------------------------------------------------------------------


def test_mosaic_layout_and_same_bytes_for_same_seed(mosaic, fm_root, tmp_path):
    files = _files(mosaic)
    assert {"meta.json", "annotations/instances_train.json", "annotations/instances_val.json"} <= set(files)
    assert sum(k.startswith("train/") for k in files) == NUM_TRAIN
    assert sum(k.startswith("images/validation/") for k in files) == NUM_VAL
    assert sum(k.startswith("annotations/training/") for k in files) == NUM_TRAIN
    assert sum(k.startswith(("dev/", "images/dev/", "annotations/dev/")) for k in files) == 3 * NUM_DEV
    again = build_mosaic(
        tmp_path / "again",
        seed=SEED,
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        num_dev=NUM_DEV,
        image_size=SIZE,
        fashion_mnist_root=fm_root,
        progress=False,
    )
    assert _files(again) == files
    other = build_mosaic(
        tmp_path / "other",
        seed=SEED + 1,
        num_train=2,
        num_val=1,
        num_dev=1,
        image_size=SIZE,
        fashion_mnist_root=fm_root,
        progress=False,
    )
    assert _files(other)["train/000000.png"] != files["train/000000.png"]
    meta = json.loads(files["meta.json"])
    assert meta["semantic"]["classes"][0] == "background" and len(meta["semantic"]["classes"]) == 11
    assert meta["semantic"]["reduce_zero_label"] is False


def test_mosaic_styles_look_as_documented(fm_root):
    """``black`` (default): grey-ish light garments with their full texture on black, as Fashion-MNIST shows them;
    ``dark``: the same on dark grey; ``tinted``: colourful backgrounds. All keep masks, classes and semantic map
    consistent."""
    pool = _pool(fm_root, "train")
    stats = {}
    for style in ("black", "dark", "tinted"):
        bg_level, bg_spread, fg_level, fg_range = [], [], [], []
        for index in range(8):
            scene = render_scene(pool.images, pool.labels, scene_rng(SEED, "train", index), MosaicConfig(style=style))
            image = scene.image.astype(np.float64)
            background, garments = scene.semantic == 0, scene.semantic > 0
            assert np.array_equal(garments, scene.masks.any(0))
            bg_level.append(image[background].mean())
            bg_spread.append(np.ptp(image[background].mean(0)))  # how far the mean colour is from grey
            fg_level.append(image[garments].mean())
            for mask in scene.masks:
                luminance = image[mask].mean(-1)
                fg_range.append(np.percentile(luminance, 95) / max(np.percentile(luminance, 5), 1.0))
        stats[style] = {k: float(np.mean(v)) for k, v in
                        dict(bg=bg_level, spread=bg_spread, fg=fg_level, texture=fg_range).items()}  # fmt: skip
    black, dark, tinted = stats["black"], stats["dark"], stats["tinted"]
    assert MosaicConfig().style == "black"
    assert black["bg"] < 10 and black["spread"] < 3 and black["fg"] > 10 * max(black["bg"], 1.0)
    assert 10 < dark["bg"] < 45 and dark["spread"] < 3 and dark["fg"] > 3 * dark["bg"]
    assert tinted["spread"] > 10 and tinted["bg"] > dark["bg"]
    assert min(black["texture"], dark["texture"]) > tinted["texture"]  # both keep the garment's full intensity range
    with pytest.raises(ConfigError) as info:
        MosaicConfig(style="neon").check()
    assert "neon" in _one_line_error(info) and "dark" in str(info.value)


def test_mosaic_tinted_style_is_recorded_and_deterministic(fm_root, tmp_path):
    kwargs = dict(num_train=2, num_val=1, num_dev=1, image_size=SIZE, fashion_mnist_root=fm_root, progress=False,
                  style="tinted")  # fmt: skip
    first = _files(build_mosaic(tmp_path / "a", seed=SEED, **kwargs))
    assert first == _files(build_mosaic(tmp_path / "b", seed=SEED, **kwargs))
    assert json.loads(first["meta.json"])["config"]["style"] == "tinted"
    dark = _files(build_mosaic(tmp_path / "c", seed=SEED, **{**kwargs, "style": "dark"}))
    assert dark["train/000000.png"] != first["train/000000.png"]


# The version-1 builder's train and val scenes for the module's mosaic (seed 3, 6 + 3 scenes, 64 px) from the real
# Fashion-MNIST: the annotation files' bytes and the decoded pixels (not PNG bytes: those depend on zlib's version).
V1_TRAIN_VAL_DIGEST = "2354829f9d61d53db1f514769a47e975c0c65fd87e74467ac90311e1eeb4e7d8"
DEV_FILES = ("dev/", "images/dev/", "annotations/dev/", "annotations/instances_dev.json")


def _train_val_digest(root: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in ("instances_train.json", "instances_val.json"):
        digest.update((root / "annotations" / name).read_bytes())
    folders = ("train", "val", "images/training", "images/validation", "annotations/training", "annotations/validation")
    for folder in folders:
        for path in sorted((root / folder).glob("*.png")):
            digest.update(f"{folder}/{path.name}".encode())
            digest.update(np.asarray(Image.open(path)).tobytes())
    return digest.hexdigest()


def test_adding_the_dev_split_leaves_train_and_val_as_the_first_builder_wrote_them(mosaic, fm_root, tmp_path):
    """Builder version 2 (dev split, sources.json): without dev it writes no dev file at all, and with dev every train
    and val file is byte for byte the same; on the real Fashion-MNIST they are still version 1's scenes."""
    from rapidnet.data import DEFAULT_FASHION_MNIST_DIR

    none = build_mosaic(tmp_path / "none", seed=SEED, num_train=NUM_TRAIN, num_val=NUM_VAL, num_dev=0, image_size=SIZE,
                        fashion_mnist_root=fm_root, progress=False)  # fmt: skip
    with_dev, without = _files(mosaic), _files(none)
    assert not [name for name in without if name.startswith(DEV_FILES)]
    shared = [name for name in without if name not in ("meta.json", "sources.json")]
    assert len(shared) == 2 + 3 * (NUM_TRAIN + NUM_VAL)  # two annotation files, three files a scene
    assert all(with_dev[name] == without[name] for name in shared)
    meta, meta_dev = json.loads(without["meta.json"]), json.loads(with_dev["meta.json"])
    assert meta["version"] == meta_dev["version"] == 2
    assert (meta["num_dev"], meta_dev["num_dev"]) == (0, NUM_DEV)
    assert "dev" not in meta["coco"]["splits"] and meta_dev["semantic"]["splits"] == ["training", "validation", "dev"]
    if Path(fm_root) == DEFAULT_FASHION_MNIST_DIR:  # the stand-in of machines without Fashion-MNIST draws other scenes
        assert _train_val_digest(mosaic) == _train_val_digest(none) == V1_TRAIN_VAL_DIGEST


def test_mosaic_dev_split_draws_garments_no_other_split_uses(mosaic, fm_root):
    """The dev split has its count in both layouts; ``sources.json`` names each instance's Fashion-MNIST image (its
    class is the annotation's), and no dev garment image is one a train scene uses (val draws from the test images)."""
    coco_dev = CocoInstances(mosaic, "dev", train=False)
    ade_dev = ADE20KSegmentation(mosaic, "dev", train=False, scale=None)
    assert len(coco_dev) == len(ade_dev) == NUM_DEV and ade_dev.classes[0] == "background"
    for index in range(NUM_DEV):
        _, target = coco_dev[index]
        _, sem = ade_dev[index]
        for mask, label in zip(target["masks"].bool(), target["labels"], strict=True):
            assert (sem["sem_seg"][mask] == label).all()  # COCO label k is semantic class k in the mosaic

    record = json.loads((mosaic / "sources.json").read_text())
    assert record["fashion_mnist_split"] == {"train": "train", "val": "test", "dev": "train"}
    scenes = record["scenes"]
    assert [len(scenes[split]) for split in ("train", "val", "dev")] == [NUM_TRAIN, NUM_VAL, NUM_DEV]
    train_images = {i for scene in scenes["train"] for i in scene}
    dev_images = {i for scene in scenes["dev"] for i in scene}
    assert dev_images and train_images and not dev_images & train_images
    for split, pool in (
        ("train", _pool(fm_root, "train")),
        ("val", _pool(fm_root, "val")),
        ("dev", _pool(fm_root, "train")),
    ):
        coco = json.loads((mosaic / "annotations" / f"instances_{split}.json").read_text())
        for index, used in enumerate(scenes[split]):
            categories = [a["category_id"] for a in coco["annotations"] if a["image_id"] == index + 1]
            assert categories == [int(pool.labels[i]) + 1 for i in used], (split, index)


def test_a_dev_split_that_does_not_match_its_meta_is_a_one_line_error(mosaic, tmp_path):
    import shutil

    from rapidnet.data.mosaic import has_dev_split

    assert has_dev_split(mosaic, "coco") and has_dev_split(mosaic, "ade20k")
    broken = tmp_path / "broken"
    shutil.copytree(mosaic, broken)
    shutil.rmtree(broken / "annotations" / "dev")
    assert has_dev_split(broken, "coco")  # the COCO layout is whole
    with pytest.raises(DataError) as info:
        has_dev_split(broken, "ade20k")
    assert "missing" in _one_line_error(info) and "--overwrite" in str(info.value)
    (broken / "dev" / "000000.png").unlink()
    with pytest.raises(DataError) as info:
        has_dev_split(broken, "coco")
    assert f"holds {NUM_DEV - 1} scenes" in _one_line_error(info)
    meta = json.loads((broken / "meta.json").read_text())
    (broken / "meta.json").write_text(json.dumps({**meta, "num_dev": 0}))
    with pytest.raises(DataError) as info:
        has_dev_split(broken, "coco")
    assert "does not list" in _one_line_error(info)

    plain = tmp_path / "plain"  # a COCO folder of one's own (no meta.json): a dev split is its files
    (plain / "annotations").mkdir(parents=True)
    assert not has_dev_split(plain, "coco")
    (plain / "dev").mkdir()
    (plain / "annotations" / "instances_dev.json").write_text("{}")
    assert has_dev_split(plain, "coco") and not has_dev_split(plain, "ade20k")


def test_mosaic_refuses_foreign_or_existing_folders(mosaic, fm_root, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as info:
        build_mosaic(foreign, num_train=1, num_val=1, image_size=SIZE, fashion_mnist_root=fm_root, progress=False)
    assert "not empty" in _one_line_error(info)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="overwrite"):
        build_mosaic(mosaic, num_train=1, num_val=1, image_size=SIZE, fashion_mnist_root=fm_root, progress=False)
    with pytest.raises(ConfigError):
        build_mosaic(tmp_path / "x", min_objects=5, max_objects=2, fashion_mnist_root=fm_root, progress=False)


def test_mosaic_round_trips_through_coco_reader(mosaic, fm_root):
    ds = CocoInstances(mosaic, "train", train=False)
    assert len(ds) == NUM_TRAIN and ds.num_classes == 10 and ds.classes[0] == "T-shirt/top"
    for index in range(NUM_TRAIN):
        scene = _scene(fm_root, "train", index)
        image, target = ds[index]
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(scene.image))
        assert torch.equal(target["masks"].bool(), torch.from_numpy(scene.masks))
        assert target["labels"].tolist() == (scene.classes + 1).tolist()
        for box, mask in zip(target["boxes"], scene.masks, strict=True):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert len(scene.classes) >= 1 and target["image_id"] == index + 1


def test_mosaic_round_trips_through_ade20k_reader(mosaic, fm_root):
    ds = ADE20KSegmentation(mosaic, "validation", train=False, scale=None)
    assert ds.num_classes == 11 and ds.classes[0] == "background" and not ds.reduce_zero_label
    reduced = ADE20KSegmentation(mosaic, "val", train=False, scale=None, reduce_zero_label=True)
    assert reduced.num_classes == 10 and reduced.classes[0] == "T-shirt/top"
    for index in range(NUM_VAL):
        scene = _scene(fm_root, "val", index)
        image, target = ds[index]
        assert torch.equal(target["sem_seg"], torch.from_numpy(scene.semantic).long())
        assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(scene.image))
        expected = np.where(scene.semantic == 0, 255, scene.semantic.astype(np.int64) - 1)
        assert torch.equal(reduced[index][1]["sem_seg"], torch.from_numpy(expected))
        # the two formats describe the same scene: instance masks painted by category = the semantic map
        coco_target = CocoInstances(mosaic, "val", train=False)[index][1]
        painted = torch.zeros(SIZE, SIZE, dtype=torch.long)
        for mask, label in zip(coco_target["masks"], coco_target["labels"], strict=True):
            painted[mask.bool()] = label
        assert torch.equal(painted, target["sem_seg"])


# ---- augmentation --------------------------------------------------------------------------------------------------

PALETTE = np.array([[20, 20, 20], [230, 40, 40], [40, 200, 60], [50, 60, 230]], np.uint8)


def _colour_coded_ade(root: Path, n: int = 4, size: tuple[int, int] = (48, 64)) -> Path:
    """An ADE20K-layout set whose image colours encode the labels (values 1..4; 0 = unlabeled)."""
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            blocks = rng.integers(0, 4, size=(size[0] // 16, size[1] // 16))
            label = np.kron(blocks, np.ones((16, 16), np.int64))
            Image.fromarray(PALETTE[label]).save(root / "images" / split / f"img{i}.png")
            raw = (label + 1).astype(np.uint8)
            raw[:2, :2] = 0  # some unlabeled pixels
            Image.fromarray(raw).save(root / "annotations" / split / f"img{i}.png")
    return root


def test_segmentation_augmentation_keeps_labels_on_their_pixels(tmp_path):
    root = _colour_coded_ade(tmp_path / "ade")
    ds = ADE20KSegmentation(
        root,
        "training",
        num_classes=4,
        scale=None,
        ratio_range=(0.5, 2.0),
        crop_size=(40, 40),
        cat_max_ratio=0.75,
        hflip=0.5,
        photometric=False,
    )
    assert ds.reduce_zero_label  # ADE20K's convention when nothing says otherwise
    torch.manual_seed(0)
    sizes = set()
    for _ in range(3):
        for index in range(len(ds)):
            image, target = ds[index]
            label = target["sem_seg"]
            assert image.shape[-2:] == label.shape and max(label.shape) <= 40
            sizes.add(tuple(label.shape))
            assert set(label.unique().tolist()) <= {0, 1, 2, 3, 255}
            pixels = (image * 255).permute(1, 2, 0).reshape(-1, 1, 3)
            nearest = ((pixels - torch.from_numpy(PALETTE).float()) ** 2).sum(-1).argmin(-1).reshape(label.shape)
            valid = label != 255
            assert (nearest[valid] == label[valid]).float().mean() > 0.95
    assert len(sizes) > 1  # random rescaling happened


def test_segmentation_eval_resizes_image_but_not_label(tmp_path):
    root = _colour_coded_ade(tmp_path / "ade")
    ds = ADE20KSegmentation(root, "validation", num_classes=4, scale=(64, 24))
    image, target = ds[0]
    assert target["sem_seg"].shape == (48, 64) and image.shape[-2:] == (24, 32)
    assert target["image_size"].tolist() == [24, 32] and target["orig_size"].tolist() == [48, 64]


def test_photometric_training_transform_runs():
    transform = SegTrainTransform(scale=None, crop_size=(16, 16), photometric=True)
    from torchvision import tv_tensors

    image = tv_tensors.Image(torch.randint(0, 255, (3, 24, 24), dtype=torch.uint8))
    label = tv_tensors.Mask(torch.zeros(24, 24, dtype=torch.long))
    out_image, out_label = transform(image, label)
    assert out_image.dtype == torch.uint8 and out_label.shape == out_image.shape[-2:]


def test_detection_flip_moves_boxes_and_masks(mosaic):
    plain = CocoInstances(mosaic, "train", train=False)[0]
    flipped = CocoInstances(mosaic, "train", train=True, hflip=1.0)[0]
    assert torch.equal(flipped[0], plain[0].flip(-1))
    assert torch.equal(flipped[1]["masks"], plain[1]["masks"].flip(-1))
    boxes = plain[1]["boxes"]
    expected = torch.stack([SIZE - boxes[:, 2], boxes[:, 1], SIZE - boxes[:, 0], boxes[:, 3]], dim=1)
    torch.testing.assert_close(flipped[1]["boxes"], expected)


def test_collate_keeps_lists(mosaic):
    ds = CocoInstances(mosaic, "val", train=False)
    images, targets = next(iter(DataLoader(ds, batch_size=2, collate_fn=ds.collate_fn)))
    assert isinstance(images, list) and len(images) == 2 and isinstance(targets[0]["boxes"], torch.Tensor)


# ---- COCO: polygons, crowd, errors ---------------------------------------------------------------------------------


def _coco_set(root: Path, images: list[dict], annotations: list[dict], categories=None, files=None) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(exist_ok=True)
    for name in files if files is not None else [img["file_name"] for img in images]:
        Image.new("RGB", (40, 30), (10, 20, 30)).save(root / "train" / name)
    data = {
        "images": images,
        "annotations": annotations,
        "categories": categories if categories is not None else [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
    }
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return root


IMG = {"id": 7, "file_name": "a.png", "height": 30, "width": 40}


def test_coco_polygons_rle_and_crowd(tmp_path):
    rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((5, 6), np.uint8), ((20, 5), (30, 4)))))
    rle["counts"] = rle["counts"].decode()
    anns = [
        {
            "id": 1,
            "image_id": 7,
            "category_id": 9,
            "bbox": [2, 3, 10, 8],
            "iscrowd": 0,
            "area": 80,
            "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]],
        },
        {
            "id": 2,
            "image_id": 7,
            "category_id": 5,
            "bbox": [30, 20, 6, 5],
            "iscrowd": 0,
            "area": 30,
            "segmentation": rle,
        },
        {
            "id": 3,
            "image_id": 7,
            "category_id": 5,
            "bbox": [0, 0, 40, 30],
            "iscrowd": 1,
            "area": 1200,
            "segmentation": rle,
        },
    ]
    ds = CocoInstances(_coco_set(tmp_path, [IMG], anns), "train", train=False)
    _, target = ds[0]
    assert target["labels"].tolist() == [2, 1]  # category 9 -> label 2, 5 -> 1; the crowd region is left out
    assert ds.label_to_cat == {1: 5, 2: 9}
    assert target["masks"].shape == (2, 30, 40)
    assert 70 <= int(target["masks"][0].sum()) <= 110  # the polygon's 10x8 area, give or take its border
    assert int(target["masks"][1].sum()) == 30 and target["masks"][1, 20:25, 30:36].all()
    assert target["boxes"][1].tolist() == [30.0, 20.0, 36.0, 25.0]


def test_coco_bad_input_errors(tmp_path):
    ann = {"id": 1, "image_id": 7, "category_id": 5, "bbox": [1, 1, 5, 5], "iscrowd": 0, "area": 25}
    with pytest.raises(DataError) as info:
        CocoInstances(tmp_path / "nothing", "train")
    assert "annotation file" in _one_line_error(info) and "not found" in str(info.value)

    with pytest.raises(DataError) as info:
        CocoInstances(_coco_set(tmp_path / "missing", [IMG], [ann], files=[]), "train")
    assert "a.png" in _one_line_error(info) and "missing" in str(info.value)

    with pytest.raises(DataError) as info:
        CocoInstances(_coco_set(tmp_path / "unlisted", [IMG], [ann], files=["a.png", "stray.png"]), "train")
    assert "stray.png has no entry" in _one_line_error(info)

    with pytest.raises(DataError) as info:
        CocoInstances(_coco_set(tmp_path / "range", [IMG], [dict(ann, category_id=42)]), "train")
    assert "category_id 42 is not in 'categories' (ids 5..9)" in _one_line_error(info)

    with pytest.raises(DataError) as info:
        CocoInstances(_coco_set(tmp_path / "empty", [], []), "train")
    assert "'images': is empty" in _one_line_error(info)

    with pytest.raises(DataError) as info:
        CocoInstances(_coco_set(tmp_path / "orphan", [IMG], [dict(ann, image_id=99)]), "train")
    assert "image_id 99 is not in 'images'" in _one_line_error(info)

    bad_json = _coco_set(tmp_path / "json", [IMG], [ann])
    (bad_json / "annotations" / "instances_train.json").write_text("{not json")
    with pytest.raises(DataError) as info:
        CocoInstances(bad_json, "train")
    assert "not valid JSON" in _one_line_error(info)


# ---- ADE20K errors -------------------------------------------------------------------------------------------------


def test_ade20k_bad_input_errors(tmp_path):
    with pytest.raises(DataError) as info:
        ADE20KSegmentation(tmp_path / "none", "training")
    assert "does not exist" in _one_line_error(info)

    root = _colour_coded_ade(tmp_path / "ade", n=2)
    with pytest.raises(DataError) as info:
        ADE20KSegmentation(tmp_path, "training")  # a folder without the layout
    assert "not found" in _one_line_error(info)

    (root / "annotations" / "training" / "img1.png").unlink()
    with pytest.raises(DataError) as info:
        ADE20KSegmentation(root, "training")
    assert "img1.png has no annotation" in _one_line_error(info)

    Image.fromarray(np.full((48, 64), 200, np.uint8)).save(root / "annotations" / "training" / "img1.png")
    ds = ADE20KSegmentation(root, "training", num_classes=4)
    with pytest.raises(DataError) as info:
        ds[1]
    assert "class value 200" in _one_line_error(info) and "out of range" in str(info.value)

    for p in (root / "images" / "validation").iterdir():
        p.unlink()
    with pytest.raises(DataError) as info:
        ADE20KSegmentation(root, "validation")
    assert "no images" in _one_line_error(info)

    with pytest.raises(DataError):
        ADE20KSegmentation(root, "testing")


def test_crop_box_retries_for_mixed_crops_and_skips_single_placements():
    label = torch.zeros(64, 64, dtype=torch.long)
    label[:, 32:] = torch.arange(32).repeat(64, 1) % 3 + 1  # classes only in the right half
    transform = SegTrainTransform(scale=None, ratio_range=None, crop_size=(32, 32), cat_max_ratio=0.75)
    torch.manual_seed(0)
    for _ in range(20):
        top, left, ch, cw = transform._crop_box(label)
        patch = label[top : top + ch, left : left + cw]
        counts = torch.bincount(patch.flatten())
        assert counts.max() / counts.sum() < 0.75  # a background-only crop is redrawn
    small = label[:24, 20:44]  # smaller than the crop: the whole map is the only box
    state = torch.get_rng_state()
    assert transform._crop_box(small) == (0, 0, 24, 24)
    assert torch.equal(torch.get_rng_state(), state)  # no draws spent on it
