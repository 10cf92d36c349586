"""An offline dense-prediction data set from real Fashion-MNIST garments: scenes of several garments at random scales
and places on a smooth background, written in both the COCO instances and the ADE20K layout.

::

    OUT/meta.json                                   classes, label conventions, the builder's parameters, the splits
    OUT/sources.json                                per split and scene: the Fashion-MNIST image indices it drew
    OUT/annotations/instances_{train,val,dev}.json  COCO instances: boxes, RLE instance masks, category = garment
    OUT/{train,val,dev}/000000.png ...              the images (COCO layout)
    OUT/images/{training,validation,dev}/000000.png     the same images (ADE20K layout; hard links where possible)
    OUT/annotations/{training,validation,dev}/000000.png  semantic maps: 0 = background, k = garment class k (1..10)

Conventions: COCO category ids 1..10 are the Fashion-MNIST classes 0..9 (names from Fashion-MNIST); the semantic
map's value equals the category id, and background (0) is a real class, so there are 11 semantic classes and the
ADE20K reader must use ``reduce_zero_label=False`` (``meta.json`` says so, and the reader follows it). Reading the
maps with ``reduce_zero_label=True`` instead gives the 10 garment classes with background ignored.

A garment's mask is its pixels whose (resized) intensity exceeds ``mask_threshold``; later garments occlude earlier
ones and the masks, boxes and semantic map describe what is visible. Three looks (``style``):

- ``"black"`` (default): garments as Fashion-MNIST shows them, light on black (levels 0-8 and faint noise), each
  with its own brightness and a faint tint, their full texture kept. These scenes test the transfer of what the
  backbone learnt on Fashion-MNIST to finding and outlining several garments, without a change of image domain.
- ``"dark"``: the same garments on a dark grey background (levels 0-40). A classifier trained on Fashion-MNIST's
  black background names garments cut from these scenes far less often (55% against 86% on black:
  ``benchmarks/mosaic_style_probe.py``), so this is a domain gap.
- ``"tinted"``: each garment painted in a random saturated colour (texture compressed to 40-100% of it) on a
  coloured gradient: a harder scene with a domain gap to the pretraining; the same bytes as version 1 of the builder.

Splits: train scenes use Fashion-MNIST's training images, val scenes its test images, and dev scenes (the split that
chooses a run's best epoch, so that val only reports) the training images that no train scene of the same build
uses: no garment image appears in two splits (``sources.json`` records which each scene drew). Every scene draws from
its own generator seeded by ``(seed, split, index)``: the same seed gives the same bytes, and changing a count does
not change the other scenes of train and val. Dev scenes also depend on ``num_train`` (which images train left
over). Version 2 of the builder added dev and ``sources.json``; its train and val scenes are version 1's bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from rapidnet.constants import DEFAULT_MOSAIC_STYLE, MAX_OBJECTS, MAX_SCENES, MAX_SIDE, MOSAIC_STYLES
from rapidnet.data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST
from rapidnet.errors import ConfigError, DataError
from rapidnet.utils import check_output_folder

__all__ = [
    "DEFAULT_MOSAIC_STYLE",
    "DEV_SPLIT",
    "MOSAIC_FORMAT",
    "MOSAIC_STYLES",
    "MOSAIC_VERSION",
    "MosaicConfig",
    "Scene",
    "build_mosaic",
    "dev_split_files",
    "has_dev_split",
    "mosaic_meta",
    "render_scene",
    "scene_rng",
]

MOSAIC_FORMAT = "rapidnet-mosaic"
MOSAIC_VERSION = 2  # 2: the dev split and sources.json (train and val scenes unchanged from 1)
META_FILE = "meta.json"
SOURCES_FILE = "sources.json"
DEV_SPLIT = "dev"  # its name in both layouts: annotations/instances_dev.json + dev/, images/dev + annotations/dev
# name: (Fashion-MNIST split, ADE20K-layout folder, generator code)
_SPLITS = {"train": ("train", "training", 0), "val": ("test", "validation", 1), DEV_SPLIT: ("train", DEV_SPLIT, 2)}


class _Look(NamedTuple):
    """How a style draws: background levels drawn in 0..``background_max`` (per channel when ``coloured``, else one
    grey), garment colour from HSV with S and V in the given ranges, and the intensity a garment's darkest pixel keeps
    (``shade_floor``: 0 keeps the full texture)."""

    background_max: float
    coloured_background: bool
    saturation: tuple[float, float]
    value: tuple[float, float]
    shade_floor: float


_LOOKS = {  # one per name of rapidnet.constants.MOSAIC_STYLES, in that order
    "black": _Look(8.0, False, (0.0, 0.25), (0.7, 1.0), 0.0),
    "dark": _Look(40.0, False, (0.0, 0.25), (0.7, 1.0), 0.0),
    "tinted": _Look(140.0, True, (0.3, 1.0), (0.6, 1.0), 0.4),
}


@dataclass(frozen=True)
class MosaicConfig:
    """How scenes look. Scales are garment sizes as fractions of the image's shorter side."""

    image_size: tuple[int, int] = (128, 128)
    min_objects: int = 2
    max_objects: int = 6
    min_scale: float = 0.25
    max_scale: float = 0.55
    mask_threshold: int = 40
    max_occlusion: float = 0.3
    noise: float = 6.0
    style: str = DEFAULT_MOSAIC_STYLE

    def check(self) -> None:
        h, w = self.image_size
        if self.style not in MOSAIC_STYLES:
            raise ConfigError(f"mosaic style {self.style!r} is unknown: use one of {', '.join(MOSAIC_STYLES)}")
        if h < 16 or w < 16:
            raise ConfigError(f"image_size {self.image_size} is too small: use at least 16x16")
        if h > MAX_SIDE or w > MAX_SIDE:
            raise ConfigError(f"image_size {self.image_size} is too large: use at most {MAX_SIDE}x{MAX_SIDE}")
        if self.max_objects > MAX_OBJECTS:
            raise ConfigError(f"max_objects={self.max_objects}: use at most {MAX_OBJECTS}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ConfigError(
                f"min_objects={self.min_objects}, max_objects={self.max_objects}: need 1 <= min_objects <= max_objects"
            )
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise ConfigError(
                f"min_scale={self.min_scale}, max_scale={self.max_scale}: need 0 < min_scale <= max_scale <= 1"
            )
        if not 0 <= self.mask_threshold < 255:
            raise ConfigError(f"mask_threshold={self.mask_threshold}: use an intensity in 0..254")
        if not 0 <= self.max_occlusion < 1:
            raise ConfigError(f"max_occlusion={self.max_occlusion}: use a fraction in [0, 1)")


@dataclass
class Scene:
    """One rendered scene: ``image`` (H, W, 3) uint8, visible instance ``masks`` (N, H, W) bool, Fashion-MNIST
    ``classes`` (N,) in 0..9, ``semantic`` (H, W) uint8 with 0 = background and k + 1 = class k, and ``sources``
    (N,): each instance's index into the pool of garments it was drawn from."""

    image: np.ndarray
    masks: np.ndarray
    classes: np.ndarray
    semantic: np.ndarray
    sources: np.ndarray | None = None


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent of every other scene."""
    return np.random.default_rng([int(seed), _SPLITS[split][2], int(index)])


def _background(rng: np.random.Generator, h: int, w: int, noise: float, look: _Look) -> np.ndarray:
    """A linear gradient between two colours (or greys) plus Gaussian noise: plain but not trivially flat."""
    size = 3 if look.coloured_background else None
    c1, c2 = (np.broadcast_to(rng.uniform(0, look.background_max, size=size), (3,)) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    bg = c1[None, None] * (1 - t[..., None]) + c2[None, None] * t[..., None]
    return bg + rng.normal(0, noise, size=(h, w, 3))


def _tint(rng: np.random.Generator, saturation: tuple[float, float], value: tuple[float, float]) -> np.ndarray:
    """A random colour (HSV, S and V drawn from the given ranges) as RGB 0..255."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(*saturation), rng.uniform(*value)
    i = int(hue * 6) % 6
    f = hue * 6 - int(hue * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    rgb = [(val, t, p), (q, val, p), (p, val, t), (p, q, val), (t, p, val), (val, p, q)][i]
    return np.array(rgb) * 255.0


def render_scene(garments: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: MosaicConfig) -> Scene:
    """Draw one scene from the pool ``garments`` (N, 28, 28 uint8) with ``labels`` (N,), using ``rng`` only."""
    h, w = cfg.image_size
    look = _LOOKS[cfg.style]
    canvas = _background(rng, h, w, cfg.noise, look)
    count = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    visible: list[np.ndarray] = []
    full_area: list[int] = []
    classes: list[int] = []
    sources: list[int] = []
    side = min(h, w)
    for _ in range(count):
        for _attempt in range(50):
            idx = int(rng.integers(len(garments)))
            size = rng.uniform(cfg.min_scale, cfg.max_scale) * side
            aspect = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25))))
            gh = int(np.clip(round(size * np.sqrt(aspect)), 4, h))
            gw = int(np.clip(round(size / np.sqrt(aspect)), 4, w))
            patch = np.asarray(Image.fromarray(garments[idx]).resize((gw, gh), Image.BILINEAR), dtype=np.uint8)
            local = patch > cfg.mask_threshold
            if local.sum() < 16:
                continue
            top, left = int(rng.integers(0, h - gh + 1)), int(rng.integers(0, w - gw + 1))
            mask = np.zeros((h, w), bool)
            mask[top : top + gh, left : left + gw] = local
            # The new garment goes on top: every earlier one must keep most of its own pixels.
            keep = [
                (vis & ~mask).sum() >= (1 - cfg.max_occlusion) * a for vis, a in zip(visible, full_area, strict=True)
            ]
            if not all(keep):
                continue
            tint = _tint(rng, look.saturation, look.value)
            shade = look.shade_floor + (1 - look.shade_floor) * patch.astype(np.float64) / 255.0
            region = canvas[top : top + gh, left : left + gw]
            region[local] = (shade[..., None] * tint[None, None])[local]
            visible = [vis & ~mask for vis in visible]
            visible.append(mask)
            full_area.append(int(mask.sum()))
            classes.append(int(labels[idx]))
            sources.append(idx)
            break
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    masks = np.stack(visible) if visible else np.zeros((0, h, w), bool)
    semantic = np.zeros((h, w), np.uint8)
    for vis, cls in zip(visible, classes, strict=True):
        semantic[vis] = cls + 1
    return Scene(image, masks, np.array(classes, dtype=np.int64), semantic, np.array(sources, dtype=np.int64))


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG", compress_level=6)


def _link_or_copy(src: Path, dst: Path) -> None:
    """The ADE20K-layout copy of an image: a hard link where the file system allows (half the disk), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _coco_annotations(scene: Scene, image_id: int, first_ann_id: int) -> list[dict[str, Any]]:

    anns = []
    for k, (mask, cls) in enumerate(zip(scene.masks, scene.classes, strict=True)):
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
        anns.append(
            {
                "id": first_ann_id + k,
                "image_id": image_id,
                "category_id": int(cls) + 1,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "area": int(mask_utils.area(rle)),
                "bbox": [x, y, bw, bh],
                "iscrowd": 0,
            }
        )
    return anns


def _pool(
    images: FashionMNIST | None, split: str, drawn: dict[str, list[list[int]]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The garments ``split`` draws from, their labels and their Fashion-MNIST indices: the whole Fashion-MNIST split
    for train and val; for dev, the training images that no train scene drew (so no garment is in two splits)."""
    if images is None:  # no scene of this split
        return np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)
    index = np.arange(len(images.labels))
    if split != DEV_SPLIT:
        return images.images, images.labels, index
    used = np.array(sorted({i for scene in drawn.get("train", []) for i in scene}), dtype=np.int64)
    index = np.setdiff1d(index, used)
    if not index.size:
        raise ConfigError(
            "every Fashion-MNIST training image is in a train scene, none is left for dev scenes: lower "
            "num_train (--num-train) or build without dev (--num-dev 0)"
        )
    return images.images[index], images.labels[index], index


def _prepare_output(out: Path, overwrite: bool) -> None:
    check_output_folder(out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / META_FILE).is_file():
            raise ConfigError(f"output folder {out} is not empty and holds no mosaic data set: choose an empty folder")
        if not overwrite:
            raise ConfigError(f"output folder {out} already holds a mosaic data set: pass overwrite=True to rebuild it")


def build_mosaic(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 1000,
    image_size: int | tuple[int, int] = 128,
    min_objects: int = 2,
    max_objects: int = 6,
    fashion_mnist_root: str | os.PathLike[str] | None = None,
    *,
    min_scale: float = 0.25,
    max_scale: float = 0.55,
    mask_threshold: int = 40,
    max_occlusion: float = 0.3,
    style: str = DEFAULT_MOSAIC_STYLE,
    num_dev: int = 500,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Build the mosaic data set in ``out_dir`` (see the module docstring); returns its path.

    ``num_dev`` scenes (0: none) form the dev split that chooses a run's best epoch. The set is assembled in a
    temporary sibling folder and renamed into place at the end, so an interrupted build never leaves a half-written
    data set under ``out_dir``. An existing mosaic is only replaced with ``overwrite``.
    """

    size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
    cfg = MosaicConfig(size, min_objects, max_objects, min_scale, max_scale, mask_threshold, max_occlusion, style=style)  # type: ignore[arg-type]
    cfg.check()
    counts = {"train": int(num_train), "val": int(num_val), DEV_SPLIT: int(num_dev)}
    if min(counts.values()) < 0 or sum(counts.values()) == 0 or max(counts.values()) > MAX_SCENES:
        raise ConfigError(
            f"num_train={num_train}, num_val={num_val}, num_dev={num_dev}: ask for at least one scene, no negative "
            f"counts, at most {MAX_SCENES:,} per split"
        )
    out = Path(out_dir).expanduser()
    _prepare_output(out, overwrite)
    needed = {fm for name, (fm, _, _) in _SPLITS.items() if counts[name]}
    fm_pools = {fm: FashionMNIST(fashion_mnist_root, split=fm) for fm in sorted(needed)}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    categories = [{"id": i + 1, "name": n, "supercategory": "garment"} for i, n in enumerate(FASHION_MNIST_CLASSES)]
    sources: dict[str, list[list[int]]] = {}
    try:
        bar = tqdm(total=sum(counts.values()), desc="mosaic", unit="img", disable=not progress)
        for split, (fm_split, ade_split, _) in _SPLITS.items():
            if split == DEV_SPLIT and not counts[split]:
                break  # no dev folders at all: a folder without them has no dev split
            coco_dir, ade_img = tmp / split, tmp / "images" / ade_split
            ade_lab = tmp / "annotations" / ade_split
            for folder in (coco_dir, ade_img, ade_lab):
                folder.mkdir(parents=True, exist_ok=True)
            garments, labels, pool_index = _pool(fm_pools.get(fm_split), split, sources)
            images, annotations = [], []
            sources[split] = []
            for index in range(counts[split]):
                scene = render_scene(garments, labels, scene_rng(seed, split, index), cfg)
                assert scene.sources is not None
                sources[split].append([int(i) for i in pool_index[scene.sources]])
                name = f"{index:06d}.png"
                _save_png(scene.image, coco_dir / name)
                _link_or_copy(coco_dir / name, ade_img / name)
                _save_png(scene.semantic, ade_lab / name)
                images.append({"id": index + 1, "file_name": name, "height": size[0], "width": size[1]})
                annotations += _coco_annotations(scene, index + 1, len(annotations) + 1)
                bar.update(1)
            coco = {
                "info": {"description": f"Fashion-MNIST mosaic ({split})", "version": "1", "seed": seed},
                "licenses": [],
                "images": images,
                "annotations": annotations,
                "categories": categories,
            }
            (tmp / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco), encoding="utf-8")
        bar.close()
        dev = [DEV_SPLIT] if counts[DEV_SPLIT] else []
        meta = {
            "format": MOSAIC_FORMAT,
            "version": MOSAIC_VERSION,
            "seed": seed,
            "num_train": counts["train"],
            "num_val": counts["val"],
            "num_dev": counts[DEV_SPLIT],
            "config": {**asdict(cfg), "image_size": list(size)},
            "classes": list(FASHION_MNIST_CLASSES),
            "coco": {"category_ids": list(range(1, len(FASHION_MNIST_CLASSES) + 1)), "splits": ["train", "val", *dev]},
            "semantic": {
                "classes": ["background", *FASHION_MNIST_CLASSES],
                "reduce_zero_label": False,
                "ignore_index": 255,
                "splits": ["training", "validation", *dev],
            },
            "sources": {
                "file": SOURCES_FILE,
                "fashion_mnist_split": {name: fm for name, (fm, _, _) in _SPLITS.items()},
                DEV_SPLIT: "Fashion-MNIST training images that no train scene uses",
            },
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        record = {"fashion_mnist_split": meta["sources"]["fashion_mnist_split"], "scenes": sources}
        (tmp / SOURCES_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConfigError(
            f"cannot write the mosaic data set to {out} ({e.strerror or e}): choose a writable folder"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ---- reading a mosaic's splits -------------------------------------------------------------------------------------


def mosaic_meta(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``ROOT/meta.json`` of a mosaic, None for a folder without one (COCO, ADE20K); unreadable is a DataError."""
    path = Path(root).expanduser() / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}): rebuild the data set or delete the file") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} is not a JSON object: rebuild the data set or delete the file")
    return meta if meta.get("format") == MOSAIC_FORMAT else None


def dev_split_files(root: str | os.PathLike[str], layout: str) -> list[Path]:
    """The files and folders a dev split has in ``layout`` (``"coco"`` or ``"ade20k"``)."""
    root = Path(root).expanduser()
    if layout == "coco":
        return [root / "annotations" / f"instances_{DEV_SPLIT}.json", root / DEV_SPLIT]
    return [root / "images" / DEV_SPLIT, root / "annotations" / DEV_SPLIT]


def has_dev_split(root: str | os.PathLike[str], layout: str) -> bool:
    """Whether ``root`` holds a dev split in ``layout`` (``"coco"``/``"ade20k"``). For a mosaic, its files must agree
    with ``meta.json`` (a listed dev split whose files are missing, files that it does not list, or another number of
    scenes are a one-line DataError: the folder was changed after it was built)."""
    root = Path(root).expanduser()
    files = dev_split_files(root, layout)
    present = [f for f in files if f.exists()]
    meta = mosaic_meta(root)
    if meta is None:
        return len(present) == len(files)
    rebuild = f"rebuild it with 'rapidnet data mosaic --out {root} --overwrite' (same seed and counts)"
    listed = int(meta.get("num_dev") or 0)
    if listed and len(present) < len(files):
        missing = next(f for f in files if not f.exists())
        raise DataError(f"{root}/{META_FILE} lists {listed} dev scenes but {missing} is missing: {rebuild}")
    if not listed and present:
        raise DataError(f"{present[0]} is a dev split that {root}/{META_FILE} does not list: remove it or {rebuild}")
    if listed:
        folder = files[1] if layout == "coco" else files[0]
        found = sum(1 for f in folder.iterdir() if f.suffix == ".png")
        if found != listed:
            raise DataError(f"{folder} holds {found} scenes but {root}/{META_FILE} lists {listed}: {rebuild}")
    return bool(listed)
