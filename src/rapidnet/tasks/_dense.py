"""What the Mask R-CNN and Semantic FPN tasks (``rapidnet det|seg train``) share.

The backbone is ``model.name`` (with ``model.kwargs`` for custom RapidNet shapes); everything else dense-specific
lives in the config's free-form ``task:`` section, checked here so a typo is a one-line :class:`ConfigError`.
Batches are ``(list of images, list of targets)`` from ``collate_dense``, drawn through the engine's
:class:`SeededSampler`/:class:`SeededDataset`, so a resumed run sees exactly the batches of an uninterrupted one.
Weights are exported as safetensors whose metadata (``build_args``, ``class_names``, ``eval_args``) lets
``rapidnet.load`` rebuild the network without the config.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from rapidnet.config import Config
from rapidnet.data.ade20k import ADE20KSegmentation
from rapidnet.data.coco import CocoInstances
from rapidnet.data.folder import collate_dense, targets_to_device
from rapidnet.engine.seeding import SeededDataset, SeededSampler, ignore_sigint
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.models import load
from rapidnet.tasks._commands import check_model_kwargs, check_task_name
from rapidnet.utils import subset_indices, unwrap_model

__all__ = [
    "build_dense_eval_dataset",
    "dense_eval_loader",
    "evaluate_dense",
    "load_dense_model",
]


def _task_options(cfg: Config, defaults: dict[str, Any]) -> dict[str, Any]:
    """``cfg.task`` over ``defaults``; unknown keys and a mismatched task name are configuration errors."""
    given = dict(cfg.task or {})
    check_task_name(given.get("name", defaults["name"]), defaults["name"])
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown task option(s) {', '.join(unknown)}: known are {', '.join(sorted(defaults))}")
    opts = {**defaults, **given}
    if not isinstance(opts["model_kwargs"], dict):
        raise ConfigError(f"task.model_kwargs must be a mapping, not {opts['model_kwargs']!r}")
    if not float(opts["backbone_lr_scale"]) > 0:
        raise ConfigError(
            f"task.backbone_lr_scale={opts['backbone_lr_scale']}: use a positive factor (1.0 trains all parts alike)"
        )
    return opts


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
        return CocoInstances(root, eval_args.get("val_split") or _coco_split(Path(root), "val"), train=False)

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
        check_model_kwargs(self.cfg.model.name, self.cfg.model.kwargs)
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

    #: the model builder (``mask_rcnn`` / ``semantic_fpn``); a staticmethod on each task
    builder: Any = None

    def builder_args(self) -> dict[str, Any]:
        """The builder arguments that only this task has (the shared ones come from ``model:`` and ``task:``)."""
        return {}

    def build_model(self) -> nn.Module:
        o, m = self.opts, self.cfg.model
        model = self.builder(
            backbone=m.name,
            num_classes=len(self.classes),
            backbone_checkpoint=self._backbone_checkpoint(),
            frozen_bn=o["frozen_bn"],
            trainable_stages=int(o["trainable_stages"]),
            backbone_kwargs=m.kwargs,
            drop_path_rate=m.drop_path_rate,
            class_names=self.classes,
            **self.builder_args(),
            **o["model_kwargs"],
        )
        self.build_args = dict(model.build_args)
        self.params = sum(p.numel() for p in model.parameters())
        return model

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """With ``backbone_lr_scale`` != 1: the pretrained body learns at that fraction of the heads' (and FPN's) rate,
        the usual fine-tuning knob for a backbone that should keep more of what it learnt."""
        scale = float(self.opts["backbone_lr_scale"])
        if scale == 1.0:
            return None
        body = {id(p) for p in unwrap_model(model).backbone.body.parameters()}
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

    def build_loaders(self) -> None:
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
        return StepOutput(sum(losses.values()), len(images), {k: v.detach() for k, v in losses.items()})

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

    # export: the engine's default, safetensors of the whole network plus the metadata above that rebuilds it

    def summary(self) -> dict[str, Any]:
        d = self.cfg.data
        return {
            "data": {
                "path": d.path,
                "train images": len(self.train_indices),
                "val images": len(self.val_indices),
                "classes": len(self.classes),
                "batch per process": d.batch_size,
            },
            "model": {
                "task": self.kind,
                "backbone": self.cfg.model.name,
                "parameters": f"{self.params / 1e6:.2f} M",
                "backbone weights": self._backbone_checkpoint() or "random initialisation",
            },
        }


def load_dense_model(path: str | os.PathLike[str], kind: str, use_ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """``rapidnet.load(path, task=kind)``: the network a dense checkpoint (``model_best.safetensors``, ``last.pt``,
    ``best.pt``) holds, in eval mode, and its metadata (``build_args``/``class_names``/``eval_args`` decoded)."""
    return load(path, task=kind, use_ema=use_ema)
