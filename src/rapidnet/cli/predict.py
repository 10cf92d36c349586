"""``rapidnet predict IMAGE...``: top-k classes of images (files or folders) with a model's eval transform.

``--checkpoint`` takes weights (any format ``rapidnet.load`` reads) or a file ``rapidnet export`` wrote (``.onnx``,
``.xml``, ``.pte``, ``.tflite``, ``.pt2``, TorchScript ``.pt``): that file runs in its own runtime, with the
preprocessing and class names it carries.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rapidnet.cli._args import int_in
from rapidnet.constants import MAX_CLASSES
from rapidnet.errors import CheckpointError, ConfigError, DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".gif"}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("predict", help="classify images", description=__doc__)
    p.add_argument("images", nargs="+", help="image files or folders")
    p.add_argument(
        "--checkpoint",
        help="weights, any format, or an exported file (.onnx, .xml, .pte, .tflite, .pt2); class names are read from "
        "this project's checkpoints and exports",
    )
    p.add_argument(
        "--model",
        help="variant without a checkpoint (default rapidnet_ti, random weights); with one, the timm model a file "
        "without metadata holds, or the variant to check the file against",
    )
    p.add_argument("--top-k", type=int_in(1, MAX_CLASSES), default=5, help="classes to show per image (default 5)")
    p.add_argument("--json", action="store_true")
    return p


def collect_images(paths: list[str]) -> list[Path]:
    """The image files named; folders are searched recursively under the rules of :mod:`rapidnet.data.listing`."""
    from rapidnet.data.listing import check_regular, list_files

    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found += list_files(p, IMAGE_SUFFIXES)
        elif p.exists():
            found.append(check_regular(p))
        else:
            raise DataError(f"image not found: {p}: check the path")
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise DataError(f"no images in {', '.join(paths)}: expected files ending in {suffixes}")
    return found


def read_image(path: Path) -> Any:
    """An image as RGB (16-bit scaled, oversized refused: :func:`rapidnet.data.load_rgb`), or a one-line error."""
    from rapidnet.data import load_rgb

    try:
        return load_rgb(path)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types for a file it cannot decode (OSError, ValueError, SyntaxError)
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:120]
        raise DataError(f"cannot read image {path} ({detail}): is it a valid image file?") from None


def channel_config(data_config: dict[str, Any]) -> dict[str, Any]:
    """The eval transform for the model's input channels: RGB, or greyscale with one mean and one std (the mean of
    the stored three, as timm's ``adapt_input_conv`` sums the RGB filters of a grey model)."""
    chans = data_config["input_size"][0]
    if chans not in (1, 3):
        raise DataError(f"the model takes {chans}-channel input: predict reads RGB or greyscale images")
    if chans == 1:
        for key in ("mean", "std"):
            values = tuple(data_config[key])
            data_config[key] = (sum(values) / len(values),)
    return data_config


def class_names(metadata: Mapping[str, Any], num_classes: int) -> list[str]:
    """The stored class names (``rapidnet.load``'s decoded metadata), else ImageNet's for 1000 classes, else indices."""
    if "class_names" in metadata:
        names = metadata["class_names"]
        if not isinstance(names, (list, tuple)) or len(names) != num_classes:
            count = len(names) if isinstance(names, (list, tuple)) else "no list of"
            raise CheckpointError(
                f"the model's metadata has {count} class names for {num_classes} outputs: re-export or re-save it"
            )
        return [str(n) for n in names]
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        info = ImageNetInfo()
        return [info.index_to_description(i).split(",")[0] for i in range(1000)]
    return [str(i) for i in range(num_classes)]


def run(args: argparse.Namespace) -> int:
    import torch
    from timm.data import resolve_data_config

    from rapidnet.data.transforms import eval_transform
    from rapidnet.deploy import registry
    from rapidnet.models import create_model, load, reparameterize_

    files = collect_images(args.images)
    if args.checkpoint and registry.is_exported_file(args.checkpoint):
        if args.model:
            raise ConfigError(f"--model does not apply to {args.checkpoint}: the exported file is the model")
        model, metadata = registry.load_exported(args.checkpoint, task="classification")
    elif args.checkpoint:
        model, metadata = load(args.checkpoint, model=args.model, task="classification")
        model = reparameterize_(model)  # in place: the model is ours; a few images do not repay a compile
    else:
        name = args.model or "rapidnet_ti"
        print(f"note: no --checkpoint: {name} has RANDOM weights, so these predictions mean nothing")
        model, metadata = reparameterize_(create_model(name)), {}
    data_config = channel_config(resolve_data_config(model=model))
    transform = eval_transform(data_config)
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    names: list[str] | None = None
    results = []
    for f in files:
        image = read_image(f).convert(mode)
        with torch.no_grad():
            logits = model(transform(image).unsqueeze(0))
        if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
            raise ConfigError(f"{args.checkpoint} does not output class logits: predict takes classifiers")
        probs = logits.float().softmax(-1)[0]
        names = names or class_names(metadata, probs.numel())
        top = probs.topk(min(args.top_k, probs.numel()))
        preds = [
            {"class": names[i], "index": int(i), "prob": float(p)} for p, i in zip(top.values, top.indices, strict=True)
        ]
        results.append({"image": str(f), "top": preds})
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(r["image"])
            for p in r["top"]:
                print(f"  {p['prob']:7.2%}  {p['class']}")
    return 0
