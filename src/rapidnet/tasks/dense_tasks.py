"""Mask R-CNN detection and Semantic FPN segmentation as engine tasks (``rapidnet det|seg train``).

The backbone is ``model.name`` (with ``model.kwargs`` for custom RapidNet shapes); everything else dense-specific
lives in the config's free-form ``task:`` section, checked here so a typo is a one-line :class:`ConfigError`.
Batches are ``(list of images, list of targets)`` from ``collate_dense``, drawn through the engine's
:class:`SeededSampler`/:class:`SeededDataset`, so a resumed run sees exactly the batches of an uninterrupted one.
Weights are exported as safetensors whose metadata (``build_args``, ``class_names``, ``eval_args``) lets
:func:`load_dense_model` rebuild the network without the config.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rapidnet.config import Config
from rapidnet.engine.seeding import SeededDataset, SeededSampler, ignore_sigint, subset_indices
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.tasks.dense import collate_dense, targets_to_device

__all__ = [
    "DETECTION_DEFAULTS",
    "SEGMENTATION_DEFAULTS",
    "DetectionTask",
    "SegmentationTask",
    "build_dense_eval_dataset",
    "dense_eval_loader",
    "evaluate_dense",
    "load_dense_model",
]

#: ``task:`` keys of detection and their defaults (None: decided from the data or the model)
DETECTION_DEFAULTS: dict[str, Any] = {
    "name": "detection",
    "num_classes": None,  # default: the data set's categories
    "backbone_checkpoint": None,  # classification checkpoint for the backbone (transfer); default model.checkpoint
    "frozen_bn": True,
    "trainable_stages": 5,
    "backbone_lr_scale": 1.0,  # the pretrained backbone's learning rate over the heads' (fine-tuning)
    "min_size": 800,
    "max_size": 1333,
    "hflip": 0.5,
    "train_split": None,  # default: train2017 when the COCO files exist, else train (the mosaic's)
    "val_split": None,
    "model_kwargs": {},  # more mask_rcnn() arguments: anchor_sizes, rpn_*, box_* ...
}

#: ``task:`` keys of segmentation and their defaults
SEGMENTATION_DEFAULTS: dict[str, Any] = {
    "name": "segmentation",
    "num_classes": None,
    "backbone_checkpoint": None,
    "frozen_bn": False,
    "trainable_stages": 5,
    "backbone_lr_scale": 1.0,  # the pretrained backbone's learning rate over the heads' (fine-tuning)
    "scale": [2048, 512],
    "test_scale": None,  # evaluation resize; default: scale (a larger one can suit a model trained on enlarged crops)
    "ratio_range": [0.5, 2.0],
    "crop_size": [512, 512],
    "cat_max_ratio": 0.75,
    "hflip": 0.5,
    "photometric": True,
    "reduce_zero_label": None,  # default: the data set's meta.json, else True (ADE20K)
    "model_kwargs": {},  # more semantic_fpn() arguments: head_channels, head_norm, dropout ...
}


def _task_options(cfg: Config, defaults: dict[str, Any]) -> dict[str, Any]:
    """``cfg.task`` over ``defaults``; unknown keys and a mismatched task name are configuration errors."""
    given = dict(cfg.task or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown task option(s) {', '.join(unknown)}: known are {', '.join(sorted(defaults))}")
    opts = {**defaults, **given}
    if opts["name"] != defaults["name"]:
        raise ConfigError(
            f"the config is for task {opts['name']!r}, not {defaults['name']!r}: use the matching command"
        )
    if not isinstance(opts["model_kwargs"], dict):
        raise ConfigError(f"task.model_kwargs must be a mapping, not {opts['model_kwargs']!r}")
    if not float(opts["backbone_lr_scale"]) > 0:
        raise ConfigError(
            f"task.backbone_lr_scale={opts['backbone_lr_scale']}: use a positive factor (1.0 trains all parts alike)"
        )
    return opts


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def dense_eval_loader(dataset: Any, indices: Sequence[int], batch_size: int, rank: int = 0, world: int = 1) -> Any:
    """This process's share of ``indices`` without padding (a repeated image would count twice in mIoU)."""
    return DataLoader(
        SeededDataset(dataset, list(indices)[rank::world]),
        batch_size=batch_size,
        shuffle=False,
        num_workers=0,
        collate_fn=collate_dense,
    )


@torch.no_grad()
def evaluate_dense(
    model: nn.Module, loader: Iterable[Any], evaluator: Any, device: torch.device, autocast: Any = None
) -> dict[str, float]:
    """Run ``model`` (eval mode) over ``loader`` and return ``evaluator``'s metrics, reduced over processes."""
    import contextlib

    model.eval()
    for images, targets in loader:
        images = [im.to(device, non_blocking=True) for im in images]
        with autocast() if autocast is not None else contextlib.nullcontext():
            outputs = model(images)
        if isinstance(outputs, torch.Tensor):
            outputs = outputs.float()
        else:
            outputs = [{k: v.float() if v.is_floating_point() else v for k, v in o.items()} for o in outputs]
        evaluator.update(outputs, targets_to_device(targets, device))
    evaluator.synchronize()
    return evaluator.compute()


def build_dense_eval_dataset(kind: str, root: str | os.PathLike[str], eval_args: dict[str, Any]) -> Any:
    """The validation split of ``root`` with the evaluation settings a checkpoint stored (``eval_args``)."""
    if kind == "detection":
        from rapidnet.data.coco import CocoInstances

        return CocoInstances(root, eval_args.get("val_split") or _coco_split(Path(root), "val"), train=False)
    from rapidnet.data.ade20k import ADE20KSegmentation

    return ADE20KSegmentation(
        root,
        "validation",
        train=False,
        num_classes=eval_args.get("num_classes"),
        reduce_zero_label=eval_args.get("reduce_zero_label"),
        scale=eval_args.get("scale"),
    )


def _coco_split(root: Path, split: str) -> str:
    """``train2017``/``val2017`` when COCO's own files are there, else the mosaic's ``train``/``val``."""
    return f"{split}2017" if (root / "annotations" / f"instances_{split}2017.json").is_file() else split


class _DenseTask(Task):
    """What detection and segmentation share: seeded list batches, evaluation loop, metadata and export."""

    kind = ""
    defaults: dict[str, Any] = {}

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.opts = _task_options(cfg, self.defaults)
        self.build_args: dict[str, Any] = {}

    def _open_data(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        d = self.cfg.data
        if d.path in ("fashion-mnist", "", None):
            raise ConfigError(
                f"data.path is {d.path!r}: give the dense data set folder (e.g. one written by 'rapidnet data mosaic')"
            )
        if not Path(d.path).expanduser().is_dir():
            raise DataError(f"data set folder {d.path} not found: build one with 'rapidnet data mosaic --out DIR'")
        self.train_set, self.val_set = self._open_data()
        self.classes: list[str] = list(self.train_set.classes)
        self.train_indices = subset_indices(len(self.train_set), d.limit_train)
        self.val_indices = subset_indices(len(self.val_set), d.limit_val)
        if len(self.train_indices) < d.batch_size:
            raise ConfigError(
                f"{len(self.train_indices)} training images but data.batch_size is {d.batch_size}: lower the batch size"
            )

    @property
    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    def _backbone_checkpoint(self) -> str | None:
        return self.opts["backbone_checkpoint"] or self.cfg.model.checkpoint

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """With ``backbone_lr_scale`` != 1: the pretrained body learns at that fraction of the heads' (and FPN's) rate,
        the usual fine-tuning knob for a backbone that should keep more of what it learnt."""
        scale = float(self.opts["backbone_lr_scale"])
        if scale == 1.0:
            return None
        body = {id(p) for p in _unwrap(model).backbone.body.parameters()}
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                decay = p.ndim > 1 and not name.endswith(".bias")  # timm's rule: no decay on norms and biases
                groups.setdefault((scale if id(p) in body else 1.0, decay), []).append(p)
        wd = self.cfg.optim.weight_decay
        return [
            {"params": params, "lr": lr, "lr_scale": s, "weight_decay": wd if decay else 0.0}  # the schedule scales
            for (s, decay), params in sorted(groups.items(), key=lambda kv: kv[0][0] != 1.0)  # heads first: logged lr
        ]

    def _build_loaders(self) -> None:
        d, info = self.cfg.data, self.context.dist
        self.sampler = SeededSampler(
            len(self.train_indices), d.batch_size, self.cfg.train.seed, info.rank, info.world_size
        )
        self.train_loader = DataLoader(
            SeededDataset(self.train_set, self.train_indices),
            batch_size=d.batch_size,
            sampler=self.sampler,
            num_workers=d.workers,
            collate_fn=collate_dense,
            drop_last=True,
            persistent_workers=d.workers > 0,
            worker_init_fn=ignore_sigint if d.workers > 0 else None,
        )
        eval_bs = d.eval_batch_size or d.batch_size
        self.val_loader = dense_eval_loader(self.val_set, self.val_indices, eval_bs, info.rank, info.world_size)

    def steps_per_epoch(self) -> int:
        return self.sampler.num_batches

    def train_batches(self, epoch: int, start_step: int) -> Iterable[Any]:
        self.sampler.set_epoch(epoch, start_step)
        return self.train_loader

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput | None:
        images, targets = batch
        device = self.context.device
        images = [im.to(device, non_blocking=True) for im in images]
        losses = model(images, targets_to_device(targets, device))
        return StepOutput(sum(losses.values()), len(images))

    def make_evaluator(self) -> Any:
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        ctx = self.context
        return evaluate_dense(model, self.val_loader, self.make_evaluator(), ctx.device, ctx.autocast)

    def eval_args(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any]:
        return {"classes": self.classes, "train_images": len(self.train_indices)}

    def check_state(self, saved: dict[str, Any], path: str) -> None:
        classes = saved.get("classes")
        if classes is not None and list(classes) != self.classes:
            raise CheckpointError(
                f"{path} was trained on other classes ({', '.join(classes[:4])}...) than {self.cfg.data.path} has: "
                "resume with the same data"
            )

    def metadata(self, model: nn.Module) -> dict[str, str]:
        return {
            "format": f"rapidnet-{self.kind}",
            "task": self.kind,
            "build_args": json.dumps(self.build_args),
            "class_names": json.dumps(self.classes),
            "eval_args": json.dumps(self.eval_args()),
        }

    def export(self, model: nn.Module, path: Path) -> Path:
        """safetensors of the whole network plus the metadata that rebuilds it."""
        from safetensors.torch import save_file

        from rapidnet.models.checkpoint import atomic_write

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in _unwrap(model).state_dict().items()}
        meta = self.metadata(model)
        return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))

    def describe(self) -> list[str]:
        d = self.cfg.data
        return [
            f"data {d.path}: {len(self.train_indices)} train / {len(self.val_indices)} val images, "
            f"{len(self.classes)} classes; batch {d.batch_size} per process",
            f"model {self.kind} on {self.cfg.model.name}: {self.params / 1e6:.2f} M parameters; backbone from "
            f"{self._backbone_checkpoint() or 'random initialisation'}",
        ]


class DetectionTask(_DenseTask):
    """Mask R-CNN + FPN on a COCO-format data set; best weights by box AP."""

    kind = "detection"
    defaults = DETECTION_DEFAULTS
    primary_metric = "bbox_AP"
    higher_is_better = True

    def _open_data(self) -> tuple[Any, Any]:
        from rapidnet.data.coco import CocoInstances

        root = Path(self.cfg.data.path).expanduser()
        o = self.opts
        train_split = o["train_split"] or _coco_split(root, "train")
        self.val_split = o["val_split"] or _coco_split(root, "val")
        train = CocoInstances(root, train_split, train=True, hflip=float(o["hflip"]), remove_empty=True)
        val = CocoInstances(root, self.val_split, train=False)
        if list(train.classes) != list(val.classes):
            raise DataError(f"{root}: the {train_split} and {self.val_split} splits have different categories")
        n = o["num_classes"]
        if n is not None and n != len(train.classes):
            raise ConfigError(f"task.num_classes is {n} but {root} has {len(train.classes)} categories: leave it out")
        return train, val

    def build_model(self) -> nn.Module:
        from rapidnet.tasks.detection import mask_rcnn

        o = self.opts
        model = mask_rcnn(
            backbone=self.cfg.model.name,
            num_classes=len(self.classes),
            backbone_checkpoint=self._backbone_checkpoint(),
            frozen_bn=o["frozen_bn"],
            trainable_stages=int(o["trainable_stages"]),
            min_size=o["min_size"],
            max_size=int(o["max_size"]),
            backbone_kwargs=self.cfg.model.kwargs,
            class_names=self.classes,
            **o["model_kwargs"],
        )
        self.build_args = dict(model.build_args)
        self.params = sum(p.numel() for p in model.parameters())
        self._build_loaders()
        return model

    def make_evaluator(self) -> Any:
        from rapidnet.tasks.metrics import CocoEvaluator

        return CocoEvaluator.from_dataset(self.val_set)

    def eval_args(self) -> dict[str, Any]:
        return {"val_split": self.val_split}

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return f"box AP {metrics['bbox_AP']:.2f}  mask AP {metrics['segm_AP']:.2f}  box AP50 {metrics['bbox_AP50']:.2f}"


class SegmentationTask(_DenseTask):
    """Semantic FPN on an ADE20K-layout data set; best weights by mIoU."""

    kind = "segmentation"
    defaults = SEGMENTATION_DEFAULTS
    primary_metric = "mIoU"
    higher_is_better = True

    def _open_data(self) -> tuple[Any, Any]:
        from rapidnet.data.ade20k import ADE20KSegmentation

        o = self.opts
        common = dict(num_classes=o["num_classes"], reduce_zero_label=o["reduce_zero_label"])
        train = ADE20KSegmentation(
            self.cfg.data.path,
            "training",
            train=True,
            scale=o["scale"],
            ratio_range=o["ratio_range"],
            crop_size=o["crop_size"],
            cat_max_ratio=o["cat_max_ratio"],
            hflip=float(o["hflip"]),
            photometric=bool(o["photometric"]),
            **common,
        )
        val = build_dense_eval_dataset(self.kind, self.cfg.data.path, {**common, "scale": self._test_scale()})
        self.reduce_zero_label = train.reduce_zero_label
        self.ignore_index = train.ignore_index
        return train, val

    def build_model(self) -> nn.Module:
        from rapidnet.tasks.segmentation import semantic_fpn

        o = self.opts
        model = semantic_fpn(
            backbone=self.cfg.model.name,
            num_classes=len(self.classes),
            backbone_checkpoint=self._backbone_checkpoint(),
            frozen_bn=o["frozen_bn"],
            trainable_stages=int(o["trainable_stages"]),
            ignore_index=self.ignore_index,
            backbone_kwargs=self.cfg.model.kwargs,
            class_names=self.classes,
            **o["model_kwargs"],
        )
        self.build_args = dict(model.build_args)
        self.params = sum(p.numel() for p in model.parameters())
        self._build_loaders()
        return model

    def make_evaluator(self) -> Any:
        from rapidnet.tasks.metrics import SegmentationMetrics

        return SegmentationMetrics(len(self.classes), self.ignore_index, self.classes)

    def _test_scale(self) -> Any:
        return self.opts["test_scale"] if self.opts["test_scale"] is not None else self.opts["scale"]

    def eval_args(self) -> dict[str, Any]:
        scale = self._test_scale()
        return {"num_classes": len(self.classes), "reduce_zero_label": self.reduce_zero_label, "scale": scale}

    def format_metrics(self, metrics: dict[str, float]) -> str:
        return f"mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}  aAcc {metrics['aAcc']:.2f}"


TASKS: dict[str, type[_DenseTask]] = {"detection": DetectionTask, "segmentation": SegmentationTask}


def load_dense_model(path: str | os.PathLike[str], kind: str, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network a dense checkpoint (``model_best.safetensors``, ``last.pt``, ``best.pt``) describes.

    Returns ``(model in eval mode, metadata)`` with ``build_args``/``class_names``/``eval_args`` decoded.
    """
    from rapidnet.models.checkpoint import read_checkpoint, strip_prefix, unwrap_state_dict

    obj, meta = read_checkpoint(path)
    if isinstance(obj, dict) and isinstance(obj.get("rapidnet"), dict):
        meta = {**obj["rapidnet"], **meta}
    if meta.get("task") != kind:
        found = meta.get("task") or "no dense task"
        raise CheckpointError(
            f"{path} holds {found}, not {kind}: pass a checkpoint written by 'rapidnet {kind[:3]} train'"
        )
    try:
        decoded = {k: json.loads(meta[k]) for k in ("build_args", "class_names", "eval_args")}
    except (KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} has incomplete dense metadata ({e}): re-export it") from None
    if kind == "detection":
        from rapidnet.tasks.detection import mask_rcnn as builder
    else:
        from rapidnet.tasks.segmentation import semantic_fpn as builder
    model = builder(**decoded["build_args"])
    state = strip_prefix(unwrap_state_dict(obj, use_ema=use_ema))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit its own build_args: {len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys: is the file damaged?"
        )
    return model.eval(), decoded
