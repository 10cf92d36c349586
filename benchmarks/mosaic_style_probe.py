"""How well a Fashion-MNIST classifier names garments drawn by each mosaic style: a probe of the domain gap.

For each style, every garment of the first N Fashion-MNIST test images is drawn alone into a 128x128 scene by the
mosaic's own renderer (same sizes, tint, background and noise as ``rapidnet data mosaic``), cut out as the square
around its mask (5% margin, as a Fashion-MNIST garment fills its tile), resized to the classifier's input size and
classified. A style whose garments the classifier still names transfers its pretraining to the scenes; one where it
fails asks the dense model to relearn the garments from the 2,000 scenes.

    python benchmarks/mosaic_style_probe.py runs/fashion_mnist_rapidnet_ti/model_best.safetensors [--count 500]
                                            [--native]

``--native`` classifies each cut-out at its own size (30-82 px for the default scales), as a dense model's backbone
meets it, instead of resizing it to the classifier's input size: a probe of the scale gap.

Prints one JSON line per style: top-1 of the cut-out garments (the classifier's Fashion-MNIST top-1 for reference).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

from rapidnet.data.fashion_mnist import FashionMNIST
from rapidnet.data.mosaic import MOSAIC_STYLES, MosaicConfig, render_scene
from rapidnet.models import load


def garment_crop(image: np.ndarray, mask: np.ndarray, margin: float = 1.05) -> torch.Tensor:
    """The square around ``mask`` (zero-padded at the scene's edge) as a (1, 3, S, S) float tensor in 0..1."""
    ys, xs = np.nonzero(mask)
    side = round(float(max(np.ptp(ys), np.ptp(xs)) + 1) * margin)
    cy, cx = float(ys.min() + ys.max()) / 2, float(xs.min() + xs.max()) / 2
    t = F.pad(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, (side,) * 4)
    top, left = round(cy - side / 2) + side, round(cx - side / 2) + side
    return t[:, :, top : top + side, left : left + side]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--count", type=int, default=500, help="Fashion-MNIST test images to draw (default 500)")
    p.add_argument("--styles", nargs="+", default=list(MOSAIC_STYLES), choices=MOSAIC_STYLES)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--native", action="store_true", help="classify cut-outs at their own size, not the input size")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = load(args.checkpoint, task="classification")
    model.eval()
    cfg = model.pretrained_cfg
    size = int(cfg["input_size"][-1])
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    test = FashionMNIST(split="test")
    images, labels = test.images[: args.count], test.labels[: args.count]

    def predict(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model((x.clamp(0, 1) - mean) / std).argmax(1).numpy()

    def top1(batch: list[torch.Tensor], native: bool = False) -> float:
        if native:  # one forward per garment: the sizes differ
            pred = np.concatenate([predict(c) for c in batch])
        else:
            pred = predict(torch.cat([F.interpolate(c, size=(size, size), mode="bicubic") for c in batch]))
        return float((pred == labels).mean() * 100)

    plain = [torch.from_numpy(img).float().div(255)[None, None].expand(1, 3, -1, -1) for img in images]
    reference = top1(plain)
    for style in args.styles:
        one = MosaicConfig(min_objects=1, max_objects=1, style=style)
        crops = []
        for i in range(len(images)):
            scene = render_scene(images[i : i + 1], labels[i : i + 1], np.random.default_rng(i), one)
            crops.append(garment_crop(scene.image, scene.masks[0]))
        print(json.dumps({"style": style, "garments": len(crops), "top1": round(top1(crops, args.native), 1),
                          "fashion_mnist_top1": round(reference, 1),
                          "input": "native" if args.native else size}))  # fmt: skip


if __name__ == "__main__":
    main()
