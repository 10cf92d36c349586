"""``rapidnet eval --checkpoint C``: top-1/top-5 and loss on a validation folder or the Fashion-MNIST test split.

Uses the checkpoint's eval transform (its stored ``pretrained_cfg``: resize ``size / crop_pct`` bicubic, centre
crop), on any checkpoint this project or the authors wrote. ``--reparameterize`` evaluates the fused inference model
(same accuracy); ``--compile`` the fused model compiled by Inductor, the fast form on a CPU (the first batch waits
for the compile, so it pays on sets of thousands of images). An exported file (``.onnx``, ``.xml``, ``.pte``,
``.tflite``, ``.pt2``, TorchScript ``.pt``) is evaluated in its own runtime with the preprocessing it carries: fp32
files give the checkpoint's figures to float rounding.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from rapidnet.cli._args import fraction, int_in
from rapidnet.constants import INTERPOLATIONS, MAX_BATCH, MAX_IMAGES, MAX_SIDE, MAX_WORKERS, MIN_SIDE
from rapidnet.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="top-1/top-5/loss of a checkpoint on a validation set", description=__doc__)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="weights (model_best.safetensors, last.pt, authors' .pth, ...) or an exported file (.onnx, .xml, .pte, "
        ".tflite, .pt2)",
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist' (default), a folder with its IDX files, or an ImageFolder root (uses val/)",
    )
    p.add_argument("--split", default="val", choices=("val", "test", "train"), help="split (Fashion-MNIST: test=val)")
    p.add_argument(
        "--model", help="the timm model a checkpoint without metadata holds, or a variant to check the file against"
    )
    p.add_argument("--batch-size", type=int_in(1, MAX_BATCH), default=256)
    p.add_argument("--workers", type=int_in(0, MAX_WORKERS), default=2)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--amp",
        action="store_true",
        help="bfloat16 (CPU) / float16 (CUDA) autocast; CPUs without AVX-512 or AMX emulate bf16, many times slower",
    )
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--input-size",
        type=int_in(MIN_SIDE, MAX_SIDE),
        metavar="PX",
        help=f"override the checkpoint's input size ({MIN_SIDE}..{MAX_SIDE})",
    )
    p.add_argument("--crop-pct", type=fraction, help="override the checkpoint's crop_pct, in (0, 1]")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help="override the checkpoint's resize interpolation")
    p.add_argument(
        "--limit", type=int_in(1, MAX_IMAGES), metavar="N", help="a fixed random subset of N images (as --limit-val)"
    )
    p.add_argument("--reparameterize", action="store_true", help="evaluate the fused inference model")
    p.add_argument(
        "--compile",
        action="store_true",
        help="evaluate the fused model compiled by torch.compile (Inductor, frozen weights on a CPU): faster on "
        "large sets, the first batch waits for the compile",
    )
    p.add_argument("--raw-weights", action="store_true", help="the raw weights, not the EMA ones, when both exist")
    p.add_argument("--skip-corrupt", action="store_true", help="skip unreadable images (counted) instead of stopping")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    return p


def compiled(model: torch.nn.Module, device: torch.device, args: argparse.Namespace) -> torch.nn.Module:
    """The fused model compiled for ``device``: on a CPU through Inductor with frozen weights, one compile for every
    batch (the short last one is padded); elsewhere plain ``torch.compile``."""
    import torch

    from rapidnet.models import reparameterize

    if device.type != "cpu":
        return torch.compile(reparameterize(model))
    if args.amp or args.channels_last:
        flag = "--amp" if args.amp else "--channels-last"
        raise ConfigError(f"--compile on a CPU compiles the fp32 model in its own layout: drop {flag}")
    from rapidnet.deploy.inductor import compile_for_cpu

    return compile_for_cpu(model, batch_size=args.batch_size)


def run(args: argparse.Namespace) -> int:
    import torch

    from rapidnet.data import build_dataset
    from rapidnet.data.transforms import eval_data_config, eval_transform
    from rapidnet.deploy import registry
    from rapidnet.engine.distributed import DistInfo, resolve_device
    from rapidnet.models import RapidNet, load, reparameterize
    from rapidnet.models.metadata import check_resize
    from rapidnet.tasks.evaluation import build_eval_loader, describe_metrics, evaluate_classifier
    from rapidnet.utils import subset_indices

    device = resolve_device(args.device)
    exported = registry.is_exported_file(args.checkpoint)
    if exported:
        given = [
            f
            for f in ("model", "input_size", "reparameterize", "compile", "raw_weights", "channels_last")
            if getattr(args, f)
        ]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} does not apply to {args.checkpoint}: the exported file is the model as made")
        device = torch.device("cpu")
        model, metadata = registry.load_exported(args.checkpoint, task="classification")
    else:
        model, metadata = load(args.checkpoint, model=args.model, use_ema=not args.raw_weights, task="classification")
    dataset = build_dataset(args.data, args.split)
    classes = list(dataset.classes)
    num_classes = getattr(model, "num_classes", len(classes))
    if "class_names" in metadata:
        trained = [str(n) for n in metadata["class_names"]]
        if trained != classes:
            raise DataError(
                f"{args.checkpoint} was trained on {len(trained)} classes ({', '.join(trained[:3])}...) but "
                f"{args.data} has {len(classes)} ({', '.join(classes[:3])}...): evaluate on the data it was trained on"
            )
    elif num_classes and num_classes != len(classes):
        raise DataError(
            f"{args.checkpoint} predicts {num_classes} classes but {args.data} has {len(classes)}: "
            "evaluate on a data set with the same classes"
        )
    if args.reparameterize:
        if not isinstance(model, RapidNet):
            raise ConfigError("--reparameterize applies to RapidNet models only")
        model = reparameterize(model)
    data_config = eval_data_config(model, input_size=args.input_size)
    if args.crop_pct is not None:
        try:
            check_resize(max(data_config["input_size"][1:]), args.crop_pct)
        except ValueError as e:
            raise ConfigError(f"--crop-pct {args.crop_pct}: {e}: use a larger fraction, e.g. 0.875") from None
        data_config["crop_pct"] = args.crop_pct
    if args.interpolation is not None:
        data_config["interpolation"] = args.interpolation
    dataset.transform = eval_transform(data_config)
    info = DistInfo(device=device)
    indices = subset_indices(len(dataset), args.limit)
    loader = build_eval_loader(dataset, indices, args.batch_size, args.workers, info, device.type == "cuda")
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model = compiled(model, device, args)
    skipped: list[str] = []
    start = time.perf_counter()
    metrics = evaluate_classifier(
        model,
        loader,
        device,
        amp=args.amp,
        channels_last=args.channels_last,
        dist=info,
        on_corrupt=skipped.extend if args.skip_corrupt else None,
        progress=args.progress,
    )
    seconds = time.perf_counter() - start
    result = {
        "checkpoint": str(args.checkpoint),
        "data": str(args.data),
        "split": args.split,
        **metrics,
        "reparameterized": bool(args.reparameterize or args.compile),
        "compiled": bool(args.compile),
        **({"runtime": model.runner.runtime} if exported else {}),
        "input_size": list(data_config["input_size"]),
        "crop_pct": data_config.get("crop_pct"),
        "interpolation": data_config.get("interpolation"),
        "seconds": round(seconds, 3),
    }
    if args.skip_corrupt:
        result["skipped_images"] = len(set(skipped))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        form = ", compiled" if args.compile else ", reparameterized" if args.reparameterize else ""
        print(f"{args.checkpoint} on {args.data} ({args.split}{form}): {describe_metrics(metrics)}  {seconds:.1f} s")
        if skipped:
            print(f"skipped {len(set(skipped))} unreadable image file(s) (e.g. {sorted(set(skipped))[0]})")
    return 0
