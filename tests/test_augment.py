"""timm's RandAugment at its strongest posterize level on Pillow 13 (``rapidnet.data.augment``)."""

from __future__ import annotations

from PIL import Image
from timm.data.auto_augment import AugmentOp, RandAugment

from rapidnet.config import load_config
from rapidnet.tasks.classification import build_train_transform


def _rand_augment(transform) -> RandAugment:
    return next(t for t in transform.transforms if isinstance(t, RandAugment))


def test_the_papers_rand_augment_posterizes_every_level():
    cfg = load_config(overrides=["aug.auto_augment=rand-m9-mstd0.5-inc1"])
    transform = build_train_transform(cfg, {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3})
    posterize = [op for op in _rand_augment(transform).ops if op.name == "PosterizeIncreasing"]
    assert posterize, "the recipe samples posterize"
    image = Image.new("RGB", (16, 16), (200, 100, 50))
    for magnitude in range(11):  # 4 bits down to 0 kept
        op = AugmentOp("PosterizeIncreasing", prob=1.0, magnitude=magnitude)
        out = op(image)
        kept = 4 - int(magnitude / 10 * 4)
        mask = 0 if kept == 0 else 256 - 2 ** (8 - kept)
        assert out.getpixel((0, 0)) == (200 & mask, 100 & mask, 50 & mask)
    assert posterize[0].aug_fn is AugmentOp("PosterizeIncreasing").aug_fn
    # and the whole transform runs on many draws (the magnitude noise reaches 10 now and then)
    for _ in range(200):
        transform(image)
