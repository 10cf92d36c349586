"""What ``rapidnet det`` and ``rapidnet seg`` share: ``train`` (the engine, ``rapidnet train``'s options), ``eval``
(a checkpoint's metrics on a data set's validation split, or its dev split, with 95% bootstrap intervals) and
``predict`` (PNG overlays of images)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rapidnet.cli.train import add_train_options, load_run_config, run_training
from rapidnet.constants import DEFAULT_BOOTSTRAP
from rapidnet.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

_NAMES = {"detection": ("det", "Mask R-CNN", "a COCO-format folder (annotations/instances_{train,val}.json)"),
          "segmentation": ("seg", "Semantic FPN", "an ADE20K-layout folder (images/ and annotations/)")}  # fmt: skip


CHECKPOINT_HELP = (
    "model_best.safetensors, last.pt or best.pt of a run, or a file rapidnet export made of it (Semantic FPN: .onnx, "
    ".xml, .pte, .tflite, .pt2)"
)


def add_dense_parser(sub: argparse._SubParsersAction, kind: str, doc: str) -> argparse.ArgumentParser:
    """``rapidnet det|seg`` with its ``train``/``eval``/``predict`` actions."""

    command, model_name, data_text = _NAMES[kind]
    p = sub.add_parser(command, help=f"{model_name} {kind}: train, eval, predict", description=doc)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    t = actions.add_parser("train", help=f"train {model_name} (YAML config + overrides; works under torchrun)")
    add_train_options(
        t,
        config_help=f"YAML config, e.g. configs/mosaic_{'mask_rcnn' if kind == 'detection' else 'semantic_fpn'}"
        "_rapidnet_ti.yaml (required unless resuming)",
        data_help=f"data set: {data_text}; the mosaic builder writes both layouts into one folder",
        classification=False,
    )
    t.add_argument(
        "--backbone-checkpoint", help="classification checkpoint the backbone starts from (task.backbone_checkpoint)"
    )

    e = actions.add_parser("eval", help="metrics of a checkpoint on the validation split")
    e.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    e.add_argument("--data", required=True, help=f"data set: {data_text}")
    e.add_argument("--batch-size", type=int, default=2)
    e.add_argument("--device", default="auto")
    e.add_argument("--limit", type=int, metavar="N", help="a fixed random subset of N images (as --limit-val)")
    e.add_argument("--split", choices=("val", "dev"), default="val",
                   help="the split to score: val (default) or the dev split that chose the best epoch")  # fmt: skip
    e.add_argument("--bootstrap", type=int, default=DEFAULT_BOOTSTRAP, metavar="B",
                   help=f"resamples of the images for the 95%% intervals (default {DEFAULT_BOOTSTRAP}; "
                        "0: none)")  # fmt: skip
    e.add_argument("--raw-weights", action="store_true", help="the raw weights, not the EMA ones, when both exist")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    if kind == "detection":
        e.add_argument(
            "--size", type=int, metavar="PX",
            help="evaluate at this shorter side instead of the run's test size (e.g. to compare sizes)",
        )  # fmt: skip
    if kind == "segmentation":
        e.add_argument(
            "--scale", type=int, nargs=2, metavar=("LONG", "SHORT"),
            help="resize images to fit these sides instead of the run's test scale (e.g. to compare scales)",
        )  # fmt: skip

    r = actions.add_parser("predict", help="PNG overlays of the model's predictions")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    r.add_argument("--output", required=True, help="folder for the PNG overlays")
    r.add_argument("--device", default="auto")
    if kind == "detection":
        r.add_argument("--score-threshold", type=float, default=0.5, help="draw detections scoring at least this")
    r.add_argument("--min-side", type=int, default=256, help="enlarge small images to this side for readable labels")
    return p


def run_dense(args: argparse.Namespace, kind: str) -> int:
    return {"train": _train, "eval": _eval, "predict": _predict}[args.action](args, kind)


def _train(args: argparse.Namespace, kind: str) -> int:
    from rapidnet.tasks import TASKS

    if args.config is None and args.resume is None:
        raise ConfigError(f"give --config (e.g. configs/mosaic_*_rapidnet_ti.yaml) or --resume for a {kind} run")
    extra = {"task.backbone_checkpoint": args.backbone_checkpoint} if args.backbone_checkpoint else {}
    cfg = load_run_config(args, extra, {"task.backbone_checkpoint": "--backbone-checkpoint"})
    return run_training(args, TASKS[kind], cfg)


def _eval(args: argparse.Namespace, kind: str) -> int:
    from rapidnet.engine.distributed import resolve_device
    from rapidnet.metrics import CocoEvaluator, SegmentationMetrics
    from rapidnet.tasks import _dense as dense_tasks  # called through the module: tests patch its functions
    from rapidnet.utils import subset_indices

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: use 1 or more")
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap {args.bootstrap}: give the number of resamples (0 for no intervals)")
    scale = getattr(args, "scale", None)  # segmentation only
    if scale is not None and min(scale) < 1:
        raise ConfigError(f"--scale {scale[0]} {scale[1]}: give two positive sides, e.g. --scale 160 160")
    size = getattr(args, "size", None)  # detection only
    if size is not None and size < 1:
        raise ConfigError(f"--size {size}: give the shorter side in pixels, e.g. --size 160")
    if not Path(args.data).expanduser().is_dir():
        raise DataError(f"data set folder {args.data} not found: pass the folder the model was trained on")
    if args.split == "dev" and not dense_tasks.has_dev_split(args.data, "coco" if kind == "detection" else "ade20k"):
        raise DataError(f"{args.data} has no dev split: build one with 'rapidnet data mosaic --num-dev N'")
    device = resolve_device(args.device)
    model, meta = _load(args.checkpoint, kind, device, use_ema=not args.raw_weights)
    if scale is not None:
        meta["eval_args"]["scale"] = list(scale)
    if size is not None:
        model.transform.test_size = size
    dataset = dense_tasks.build_dense_eval_dataset(kind, args.data, meta["eval_args"], args.split)
    if list(dataset.classes) != list(meta["class_names"]):
        raise DataError(f"{args.data} has other classes than {args.checkpoint} was trained on: use the same data")
    indices = subset_indices(len(dataset), args.limit)
    if kind == "detection":
        evaluator: Any = CocoEvaluator.from_dataset(dataset, bootstrap=args.bootstrap)
    else:
        evaluator = SegmentationMetrics(dataset.num_classes, dataset.ignore_index, dataset.classes,
                                        bootstrap=args.bootstrap)  # fmt: skip
    t0 = time.perf_counter()
    loader = dense_tasks.dense_eval_loader(dataset, indices, args.batch_size)
    metrics = dense_tasks.evaluate_dense(model, loader, evaluator, device)
    if args.json:
        print(json.dumps({**metrics, "images": len(indices)}, indent=2))
    else:
        print(evaluator.table())
        main = ("bbox_AP", "segm_AP") if kind == "detection" else ("mIoU", "mAcc", "aAcc")
        text = "  ".join(_with_interval(k, metrics) for k in main)
        what = f"{args.split} split, {len(indices)} images"
        ci = f", 95% intervals from {args.bootstrap} resamples" if args.bootstrap else ""
        print(f"{text}  ({what}{ci}, {time.perf_counter() - t0:.1f} s)")
    return 0


def _with_interval(key: str, metrics: dict[str, Any]) -> str:
    """``mIoU 60.25 [59.1, 61.3]``: a metric with its bootstrap interval when it has one."""
    text = f"{key} {metrics[key]:.2f}"
    ci = metrics.get(f"{key}_ci")
    return text + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def _load(path: str, kind: str, device: torch.device, use_ema: bool = True) -> tuple[Any, dict[str, Any]]:
    """The dense model a checkpoint holds (``rapidnet.load``, which checks it is a ``kind`` one) on ``device``, or
    an exported file of one run in its runtime (:mod:`rapidnet.deploy.dense`, :mod:`rapidnet.deploy.detection`)."""
    from rapidnet.deploy import registry
    from rapidnet.deploy.dense import ExportedSegmenter
    from rapidnet.deploy.detection import ExportedDetector
    from rapidnet.models import load

    if registry.is_exported_file(path):
        runtime = registry.for_path(path)
        runtime.require(f"running {Path(path).name}")
        runner = runtime.load(path)
        model = ExportedDetector(runner) if kind == "detection" else ExportedSegmenter(runner)
        meta = runner.metadata
        if not isinstance(meta.get("class_names"), list) or len(meta["class_names"]) != model.num_classes:
            raise ConfigError(f"{path} carries no class names for its {model.num_classes} classes: re-export it")
        meta.setdefault("eval_args", {})
        if not isinstance(meta["eval_args"], dict):
            raise ConfigError(f"{path} carries unreadable evaluation settings: re-export it")
        return model, meta
    model, meta = load(path, task=kind, use_ema=use_ema)
    return model.to(device), meta


def _read_image(path: str) -> torch.Tensor:
    import torch
    from torchvision.transforms.v2 import functional as TF

    from rapidnet.data import load_rgb

    try:
        pil = load_rgb(path)  # refuses decompression bombs, scales 16-bit images
    except DataError:
        raise
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({' '.join(str(e).split())[:120]}): pass an image file") from None
    return TF.to_dtype(TF.pil_to_tensor(pil), torch.float32, scale=True)


def _predict(args: argparse.Namespace, kind: str) -> int:
    import torch

    with torch.no_grad():
        return _predict_images(args, kind)


def _predict_images(args: argparse.Namespace, kind: str) -> int:
    import torch.nn.functional as F

    from rapidnet.data.ade20k import SegEvalTransform
    from rapidnet.engine.distributed import resolve_device
    from rapidnet.utils import check_output_folder, refuse_overwriting_input
    from rapidnet.visualize import draw_instances, draw_semantic, save_png

    out = check_output_folder(args.output)
    # an overlay OUT/STEM.png must not replace one of the images (or the checkpoint) it is drawn from
    refuse_overwriting_input([out / f"{Path(p).stem}.png" for p in args.images], *args.images, args.checkpoint)
    device = resolve_device(args.device)
    images = [(path, _read_image(path)) for path in args.images]  # every file is checked before the model loads
    model, meta = _load(args.checkpoint, kind, device)
    names = meta["class_names"]
    for path, image in images:
        if kind == "detection":
            pred = {k: v.cpu() for k, v in model([image.to(device)])[0].items()}
            overlay = draw_instances(image, pred, names, args.score_threshold, min_side=args.min_side)
            found = int((pred["scores"] >= args.score_threshold).sum())
            summary = f"{found} object(s)"
        else:
            scale = meta["eval_args"].get("scale")
            resized, _ = SegEvalTransform(scale)(image, image[:1])
            logits = model([resized.to(device)])[0][:, : resized.shape[-2], : resized.shape[-1]]
            logits = F.interpolate(logits[None].float(), size=image.shape[-2:], mode="bilinear", align_corners=False)
            labels = logits[0].argmax(0).cpu()
            overlay = draw_semantic(image, labels, names, min_side=args.min_side)
            summary = f"classes {', '.join(names[int(c)] for c in labels.unique())}"
        target = save_png(overlay, out / f"{Path(path).stem}.png")
        print(f"{path} -> {target}: {summary}")
    return 0
