"""What the Mask R-CNN and Semantic FPN tasks (``rapidnet det|seg train``) share.

The backbone is ``model.name`` (with ``model.kwargs`` for custom RapidNet shapes); everything else dense-specific
lives in the config's ``task:`` section, read into the task's :class:`DenseOptions` dataclass by the config's own
machinery (:func:`rapidnet.config.build_section`), so a typo or a value out of range is a one-line
:class:`ConfigError` naming ``task.KEY``. The saved config keeps ``task:`` as given, so old runs still resume.
Batches are ``(list of images, list of targets)`` from ``collate_dense``, drawn through the engine's
:class:`SeededSampler`/:class:`SeededDataset`, so a resumed run sees exactly the batches of an uninterrupted one.
Weights are exported as safetensors whose metadata (``build_args``, ``class_names``, ``eval_args``) lets
``rapidnet.load`` rebuild the network without the config.

Selection and reporting (``task.select_on``): when the data folder has a dev split (``rapidnet data mosaic
--num-dev``), each evaluated epoch is scored on dev, ``model_best`` is the best dev epoch, and the validation split is
scored once after the run, for the best and for the final weights, with bootstrap intervals (the engine's final
report: ``val_best_*`` / ``val_final_*``). Without a dev split (or with ``select_on: val``) val does both, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from rapidnet.config import Config, build_section, setting
from rapidnet.constants import DEFAULT_BOOTSTRAP, MAX_CLASSES
from rapidnet.data.ade20k import ADE20KSegmentation
from rapidnet.data.coco import CocoInstances
from rapidnet.data.folder import collate_dense, targets_to_device
from rapidnet.data.mosaic import DEV_SPLIT, dev_split_files, has_dev_split, mosaic_meta
from rapidnet.engine.seeding import SeededDataset, SeededSampler, ignore_sigint
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.models import load
from rapidnet.models.backbone import BN_MODES, NUM_UNITS
from rapidnet.tasks._commands import check_model_kwargs, check_task_name
from rapidnet.utils import subset_indices, unwrap_model

__all__ = [
    "SELECT_ON",
    "DenseOptions",
    "build_dense_eval_dataset",
    "dense_eval_loader",
    "evaluate_dense",
    "load_dense_model",
]

#: the most bootstrap resamples a run may ask for: each one re-scores the whole split
MAX_BOOTSTRAP = 100_000

Opts = TypeVar("Opts", bound="DenseOptions")


#: values of ``task.select_on``: the split that chooses the best epoch (None: dev when the data has one, else val)
SELECT_ON = (None, "dev", "val")


@dataclass
class DenseOptions:
    """The ``task:`` keys both dense tasks take, checked by :func:`rapidnet.config.build_section` like the rest of the
    config (unknown key, type, range: one line naming ``task.KEY`` and where it came from)."""

    name: str = ""
    num_classes: int | None = setting(None, ge=1, le=MAX_CLASSES)  # default: the data set's classes
    # classification checkpoint for the backbone (transfer); default model.checkpoint
    backbone_checkpoint: str | None = setting(None, nonempty=True, what="a file")
    # True / False, or a mode: frozen (FrozenBatchNorm2d), eval (BN in eval mode, trained affine), train
    frozen_bn: bool | str = setting(True, choices=(True, False, *BN_MODES))
    # how many of the backbone's units (stem, stage 0..3), counted from the top, are trained
    trainable_stages: int = setting(NUM_UNITS, ge=0, le=NUM_UNITS)
    # the pretrained backbone's learning rate over the heads' (fine-tuning); 1.0 trains all parts alike
    backbone_lr_scale: float = setting(1.0, gt=0.0, le=10.0)
    hflip: float = setting(0.5, ge=0.0, le=1.0)  # the probability of a horizontal flip
    # the split that chooses model_best; default dev when the data has one
    select_on: str | None = setting(None, choices=SELECT_ON[1:])
    # resamples of the images for the reported 95% intervals (0: none)
    bootstrap: int = setting(DEFAULT_BOOTSTRAP, ge=0, le=MAX_BOOTSTRAP)
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # more builder arguments (fpn_channels, ...)


def _task_options(cfg: Config, options: type[Opts]) -> Opts:
    """``cfg.task`` read into ``options``; an unknown key, a wrong type or value, and a config for another task are
    one-line configuration errors naming ``task.KEY`` and where it came from (``cfg.source_of``)."""
    given = dict(cfg.task or {})
    expected = options().name
    check_task_name(given.get("name", expected), expected)
    return build_section(options, given, prefix="task", source=cfg.source_of)


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


def build_dense_eval_dataset(
    kind: str, root: str | os.PathLike[str], eval_args: dict[str, Any], split: str = "val"
) -> Any:
    """The validation split (or with ``split="dev"`` the dev split) of ``root`` with the evaluation settings a
    checkpoint stored (``eval_args``)."""
    if split not in ("val", DEV_SPLIT):
        raise ConfigError(f"split {split!r}: evaluate on val or {DEV_SPLIT}")
    if kind == "detection":
        name = DEV_SPLIT if split == DEV_SPLIT else eval_args.get("val_split") or _coco_split(Path(root), "val")
        return CocoInstances(root, name, train=False)

    return ADE20KSegmentation(
        root,
        DEV_SPLIT if split == DEV_SPLIT else "validation",
        train=False,
        num_classes=eval_args.get("num_classes"),
        reduce_zero_label=eval_args.get("reduce_zero_label"),
        scale=eval_args.get("scale"),
    )


def _coco_split(root: Path, split: str) -> str:
    """``train2017``/``val2017`` when COCO's own files are there, else the mosaic's ``train``/``val``."""
    return f"{split}2017" if (root / "annotations" / f"instances_{split}2017.json").is_file() else split


def _image_sizes(dataset: Any) -> set[tuple[int, int]]:
    """The ``(height, width)`` of a split's images: from a COCO file's entries, else from the image headers."""
    if isinstance(dataset, CocoInstances):
        return {(int(i["height"]), int(i["width"])) for i in dataset.coco.imgs.values()}
    sizes = set()
    for path in dataset.images:
        try:
            with Image.open(path) as img:
                sizes.add((img.height, img.width))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read image {path} ({e}): replace the file") from None
    return sizes


class _DenseTask(Task):
    """What detection and segmentation share: seeded list batches, evaluation loop, metadata and export."""

    kind = ""
    layout = ""  # "coco" or "ade20k": where a dev split's files are
    options: type[DenseOptions] = DenseOptions  # the task's ``task:`` keys

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.opts = _task_options(cfg, self.options)
        self.build_args: dict[str, Any] = {}
        self.dev_set: Any = None

    def _open_data(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _open_eval_split(self, split: str) -> Any:
        """The ``val`` or ``dev`` split with this run's evaluation settings."""
        raise NotImplementedError

    def _open_dev(self) -> Any:
        """The dev split when the run selects on it (``task.select_on``; by default when the folder has one), checked
        against the training split: the same classes, and for a mosaic the size its ``meta.json`` gives."""
        root = Path(self.cfg.data.path).expanduser()
        select = self.opts.select_on
        if select == "val":  # asked for: the dev split is not even looked at
            return None
        present = has_dev_split(root, self.layout)
        if select == DEV_SPLIT and not present:
            missing = " + ".join(str(f.relative_to(root)) for f in dev_split_files(root, self.layout))
            raise ConfigError(
                f"task.select_on is dev but {root} has no dev split ({missing}): rebuild it with 'rapidnet data "
                "mosaic --num-dev 500', or set task.select_on: val"
            )
        if not present:
            return None
        dev = self._open_eval_split(DEV_SPLIT)
        if list(dev.classes) != list(self.train_set.classes):
            raise DataError(
                f"{root}: the dev split has other classes ({', '.join(dev.classes[:3])}...) than the training split "
                f"({', '.join(self.train_set.classes[:3])}...): rebuild the data set"
            )
        meta = mosaic_meta(root)
        if meta is not None and meta.get("config", {}).get("image_size"):
            want = tuple(int(v) for v in meta["config"]["image_size"])
            other = sorted(_image_sizes(dev) - {want})
            if other:
                raise DataError(
                    f"{root}: the dev split holds {other[0][0]}x{other[0][1]} images but meta.json says "
                    f"{want[0]}x{want[1]}: rebuild the data set with 'rapidnet data mosaic --overwrite'"
                )
            if isinstance(dev, ADE20KSegmentation):  # check the label values now, not after an epoch of training
                for index in range(len(dev)):
                    dev.load_label(index)
        return dev

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
        self.dev_set = self._open_dev()
        if self.dev_set is not None:  # select on dev; val only in the final report
            self.eval_split, self.report_split = DEV_SPLIT, "val"
        self.train_indices = subset_indices(len(self.train_set), d.limit_train)
        self.val_indices = subset_indices(len(self.val_set), d.limit_val)
        self.dev_indices = subset_indices(len(self.dev_set), d.limit_val) if self.dev_set is not None else []
        if len(self.train_indices) < d.batch_size:
            raise ConfigError(
                f"{len(self.train_indices)} training images but data.batch_size is {d.batch_size}: lower the batch size"
            )

    @property
    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    def _backbone_checkpoint(self) -> str | None:
        return self.opts.backbone_checkpoint or self.cfg.model.checkpoint

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
            frozen_bn=o.frozen_bn,
            trainable_stages=o.trainable_stages,
            backbone_kwargs=m.kwargs,
            drop_path_rate=m.drop_path_rate,
            class_names=self.classes,
            **self.builder_args(),
            **o.model_kwargs,
        )
        self.build_args = dict(model.build_args)
        self.params = sum(p.numel() for p in model.parameters())
        return model

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """With ``backbone_lr_scale`` != 1: the pretrained body learns at that fraction of the heads' (and FPN's) rate,
        the usual fine-tuning knob for a backbone that should keep more of what it learnt."""
        scale = self.opts.backbone_lr_scale
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
        self.dev_loader = (
            dense_eval_loader(self.dev_set, self.dev_indices, eval_bs, info.rank, info.world_size)
            if self.dev_set is not None
            else None
        )

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

    def make_evaluator(self, dataset: Any, bootstrap: int) -> Any:
        """The metrics of ``dataset``, with ``bootstrap`` resamples for the intervals (0: none)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """The selection split: dev (no intervals: they would only cost time) when the run has one, else val."""
        ctx = self.context
        if self.dev_loader is not None:
            return evaluate_dense(
                model, self.dev_loader, self.make_evaluator(self.dev_set, 0), ctx.device, ctx.autocast
            )
        evaluator = self.make_evaluator(self.val_set, self.opts.bootstrap)
        return evaluate_dense(model, self.val_loader, evaluator, ctx.device, ctx.autocast)

    def evaluate_report(self, model: nn.Module) -> dict[str, Any]:
        """The validation split, with intervals: the engine's final report of a run that selected on dev."""
        ctx = self.context
        evaluator = self.make_evaluator(self.val_set, self.opts.bootstrap)
        return evaluate_dense(model, self.val_loader, evaluator, ctx.device, ctx.autocast)

    def eval_args(self) -> dict[str, Any]:
        return {}

    def state(self) -> dict[str, Any]:
        return {"classes": self.classes, "train_images": len(self.train_indices), "select_on": self.eval_split}

    def check_state(self, saved: dict[str, Any], path: str) -> None:
        classes = saved.get("classes")
        if classes is not None and list(classes) != self.classes:
            raise CheckpointError(
                f"{path} was trained on other classes ({', '.join(classes[:4])}...) than {self.cfg.data.path} has: "
                "resume with the same data"
            )
        selected = saved.get("select_on", "val")  # checkpoints from before dev splits chose on val
        if selected != self.eval_split:
            raise CheckpointError(
                f"{path} chose its best epoch on {selected}, but this run would choose on {self.eval_split} "
                f"({self.cfg.data.path} {'has' if self.dev_set is not None else 'has no'} dev split): resume with "
                "the data folder it was trained on"
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
                "dev images": len(self.dev_indices) if self.dev_set is not None else None,
                "classes": len(self.classes),
                "batch per process": d.batch_size,
            },
            "best epoch by": (
                f"{self.metric_names.get(self.primary_metric, self.primary_metric)} on dev (val reported after the "
                "run, for the best and the final weights)"
                if self.dev_set is not None
                else f"{self.metric_names.get(self.primary_metric, self.primary_metric)} on val"
            ),
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
