"""Image classification: the paper's DeiT-style recipe, assembled from timm pieces, as an engine task.

Data come from ``rapidnet.data.build_dataset`` (Fashion-MNIST IDX files or an ImageFolder ``train/``+``val/``
root). Training uses timm's ``create_transform`` (RandAugment, colour jitter, random erasing, random
interpolation), timm ``Mixup``/CutMix, label smoothing or soft-target cross-entropy, and the repeated-augmentation
sampler under DDP; evaluation uses the model's ``pretrained_cfg`` transform (resize ``size / crop_pct``, centre crop).
Distillation goes through RapidNet's distillation head (hard or soft, DeiT's loss) from a teacher given as a timm
name plus checkpoint, or any checkpoint this project wrote. Any timm model name trains too (for baselines).

For small in-memory data (Fashion-MNIST) ``data.pipeline: tensor`` replaces per-sample PIL work by whole-batch
tensor augmentation (random crop after zero padding, flip, timm random erasing) on images pre-resized with the
eval geometry, which keeps a 2-core CPU busy with the model rather than with PIL.

This module holds what reads the config: the model and teacher factory, the training transform, the tensor
pipeline's seeded batches and the task. The rest stands on its own, without a config: the loss
(:mod:`rapidnet.tasks.losses`), evaluation (:mod:`rapidnet.tasks.evaluation`, which ``rapidnet eval`` uses too), the
eval transform settings (:mod:`rapidnet.data.transforms`) and the batch augmentation
(:mod:`rapidnet.data.tensor_augment`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
from timm.data import Mixup, create_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from rapidnet.config import Config, DistillConfig, ModelConfig
from rapidnet.data import (
    ImageFolderDataset,
    build_dataset,
    check_classes_readable,
    check_same_classes,
    collate_skip_corrupt,
)
from rapidnet.data.augment import keep_posterize_total
from rapidnet.data.folder import unreadable_image_error
from rapidnet.data.tensor_augment import TensorAugment, resize_in_memory
from rapidnet.data.transforms import eval_data_config, eval_transform
from rapidnet.engine.seeding import SeededDataset, SeededSampler, ignore_sigint, mix_seed, seed_everything
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.models import create_model, is_rapidnet, load, model_metadata, save_weights
from rapidnet.models.checkpoint import load_timm_checkpoint
from rapidnet.tasks._commands import check_model_kwargs, check_task_name
from rapidnet.tasks.evaluation import build_eval_loader, evaluate_classifier
from rapidnet.tasks.losses import DistillationLoss
from rapidnet.utils import subset_indices

__all__ = [
    "ClassificationTask",
    "DistillationLoss",
    "TensorBatches",
    "build_eval_loader",
    "build_teacher",
    "build_train_transform",
    "create_classifier",
    "eval_data_config",
    "evaluate_classifier",
    "unreadable_image_error",
]


# ---- models -------------------------------------------------------------------------------------------------------


def create_classifier(model_cfg: ModelConfig, num_classes: int, distillation: bool) -> nn.Module:
    """A RapidNet variant (``rapidnet.create_model``) or any timm model, with ``num_classes`` outputs.

    ``model.checkpoint`` (fine-tuning) loads any file ``rapidnet.load`` reads: RapidNet weights through the variant's
    timm loader, a timm model's through :func:`~rapidnet.models.checkpoint.load_timm_weights` (a classifier of
    another class count starts afresh).
    """
    if is_rapidnet(model_cfg.name):
        return create_model(
            model_cfg.name,
            num_classes=num_classes,
            distillation=distillation,
            drop_path_rate=model_cfg.drop_path_rate,
            drop_rate=model_cfg.drop_rate,
            checkpoint=model_cfg.checkpoint,
            **model_cfg.kwargs,
        )
    if distillation:
        raise ConfigError(
            f"model {model_cfg.name} has no distillation head (only RapidNet models do): set distill.type none"
        )
    try:
        model = timm.create_model(
            model_cfg.name,
            num_classes=num_classes,
            drop_path_rate=model_cfg.drop_path_rate or None,
            drop_rate=model_cfg.drop_rate,
            **model_cfg.kwargs,
        )
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(
                f"unknown model {model_cfg.name!r}: use a RapidNet variant or a timm model name"
            ) from None
        raise
    except (TypeError, ValueError) as e:  # an argument the timm model does not take, or a bad value for one
        detail = " ".join(str(e).split())[:160]
        raise ConfigError(
            f"timm cannot build {model_cfg.name!r} with model.kwargs ({detail}): fix model.kwargs"
        ) from None
    if model_cfg.checkpoint:
        load_timm_checkpoint(model, model_cfg.checkpoint, model_cfg.name)
    return model


def build_teacher(distill: DistillConfig, num_classes: int) -> nn.Module:
    """The frozen distillation teacher: any classifier checkpoint ``rapidnet.load`` reads (with the timm name for a
    file without metadata), or a timm name whose pretrained weights timm fetches."""
    name, ckpt = distill.teacher, distill.teacher_checkpoint
    if ckpt is not None:
        # a RapidNet file describes itself; a timm name is what a file without metadata holds
        timm_name = name if name is not None and not is_rapidnet(name) else None
        teacher, _ = load(ckpt, model=timm_name, task="classification")
    else:
        assert name is not None
        try:
            teacher = timm.create_model(name, pretrained=True)
        except Exception as e:
            reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
            raise ConfigError(
                f"teacher {name} has no --teacher-checkpoint and its pretrained weights could not be loaded "
                f"({reason}): pass --teacher-checkpoint FILE"
            ) from None
    classes = getattr(teacher, "num_classes", num_classes)
    if classes != num_classes:
        raise ConfigError(
            f"teacher predicts {classes} classes but the data set has {num_classes}: use a matching teacher"
        )
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


# ---- training data ------------------------------------------------------------------------------------------------


def build_train_transform(cfg: Config, data_config: dict[str, Any]) -> Callable[[Any], torch.Tensor]:
    """timm's ImageNet training transform with the recipe in ``cfg.aug`` (random erasing per sample)."""

    a = cfg.aug
    keep_posterize_total()  # timm's strongest posterize level raises on Pillow 13 (rapidnet.data.augment)
    try:
        return create_transform(
            input_size=data_config["input_size"],
            is_training=True,
            scale=tuple(a.scale),
            ratio=tuple(a.ratio),
            hflip=a.hflip,
            color_jitter=a.color_jitter,
            auto_augment=a.auto_augment,
            interpolation=a.train_interpolation,
            mean=data_config["mean"],
            std=data_config["std"],
            re_prob=a.re_prob,
            re_mode=a.re_mode,
            re_count=a.re_count,
        )
    except (AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"bad augmentation settings in aug (auto_augment {a.auto_augment!r}?): {e}") from None


class TensorBatches:
    """The tensor pipeline's training batches: in-memory images (pre-resized uint8) in the sampler's order, each
    batch augmented by :class:`~rapidnet.data.tensor_augment.TensorAugment`, yielding ``(images, targets, [])``.

    Each batch's draws depend only on ``(seed, epoch, batch, rank)``: the engine's seeding makes a resumed run draw
    what an uninterrupted one would.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        sampler: SeededSampler,
        augment: TensorAugment,
    ) -> None:
        self.images = images if images.ndim == 4 else images[:, None]
        self.targets = targets
        self.sampler = sampler
        self.augment = augment

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        s = self.sampler
        s.set_epoch(epoch, 0)
        order = torch.tensor(s.epoch_order(), dtype=torch.long)
        for b in range(start, s.num_batches):
            seed_everything(mix_seed(s.seed, epoch, b, s.rank, 4), cuda=False)
            idx = order[b * s.batch_size : (b + 1) * s.batch_size]
            yield self.augment(self.images[idx]), self.targets[idx], []


# ---- the task -----------------------------------------------------------------------------------------------------


class ClassificationTask(Task):
    """Image classification with the paper's recipe; see the module docstring."""

    primary_metric = "top1"
    higher_is_better = True
    metric_names = {"top1": "top-1", "top5": "top-5", "loss": "loss"}

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        check_task_name((cfg.task or {}).get("name", "classification"), "classification")
        self.skipped: set[str] = set()
        self.skip_events = 0

    # ---- setup --------------------------------------------------------------------------------------------------

    def setup(self, ctx: RunContext) -> None:
        super().setup(ctx)
        d, a = self.cfg.data, self.cfg.aug
        check_model_kwargs(self.cfg.model.name, self.cfg.model.kwargs)
        self.train_set = build_dataset(d.path, "train")
        self.val_set = build_dataset(d.path, "val")
        self.classes = check_same_classes(self.train_set, self.val_set)
        if self.cfg.model.num_classes is not None and self.cfg.model.num_classes != len(self.classes):
            raise ConfigError(
                f"model.num_classes is {self.cfg.model.num_classes} but {d.path} has {len(self.classes)} classes: "
                "leave model.num_classes null to take it from the data"
            )
        self.num_classes = len(self.classes)
        self.train_indices = subset_indices(len(self.train_set), d.limit_train)
        self.val_indices = subset_indices(len(self.val_set), d.limit_val)
        self.use_distillation = self.cfg.distill.type != "none"
        self.mixup_active = (a.mixup > 0 or a.cutmix > 0) and a.mixup_prob > 0
        if self.mixup_active and d.batch_size % 2:
            raise ConfigError(f"data.batch_size {d.batch_size} is odd: Mixup/CutMix pair images, use an even batch")
        if d.pipeline != "tensor" and (a.zoom or a.noise > 0):
            raise ConfigError("aug.zoom and aug.noise work in the tensor pipeline only: set data.pipeline tensor")
        if d.pipeline == "tensor" and not hasattr(self.train_set, "images"):
            raise ConfigError(
                f"data.pipeline 'tensor' needs an in-memory data set such as Fashion-MNIST, not {d.path}: "
                "use data.pipeline timm"
            )

    @property
    def batch_size(self) -> int:
        return self.cfg.data.batch_size

    def build_model(self) -> nn.Module:
        cfg, ctx = self.cfg, self.context
        m = cfg.model
        distillation = m.distillation if m.distillation is not None else self.use_distillation
        model = create_classifier(m, self.num_classes, distillation)
        if distillation and not self.use_distillation and hasattr(model, "set_distilled_training"):
            model.set_distilled_training(False)  # no teacher: train the mean of both heads as one classifier
        d = cfg.data
        self.data_config = eval_data_config(
            model, d.input_size, crop_pct=d.crop_pct, interpolation=d.interpolation, mean=d.mean, std=d.std
        )
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **self.data_config}
        self.params = sum(p.numel() for p in model.parameters())
        self.model_distillation = distillation

        self._build_loss()
        self.teacher = None
        if self.use_distillation:
            self.teacher = build_teacher(cfg.distill, self.num_classes).to(ctx.device)
            if ctx.channels_last:
                self.teacher.to(memory_format=torch.channels_last)
            self.loss_fn: nn.Module = DistillationLoss(
                self.criterion, self.teacher, cfg.distill.type, cfg.distill.alpha, cfg.distill.tau
            )
        else:
            self.loss_fn = DistillationLoss(self.criterion, nn.Identity(), "none", 0.0, 1.0)
        return model

    def _build_loss(self) -> None:

        a = self.cfg.aug
        self.mixup = None
        if self.mixup_active:
            self.mixup = Mixup(
                mixup_alpha=a.mixup,
                cutmix_alpha=a.cutmix,
                prob=a.mixup_prob,
                switch_prob=a.mixup_switch_prob,
                mode=a.mixup_mode,
                label_smoothing=a.smoothing,
                num_classes=self.num_classes,
            )
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif a.smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=a.smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def build_loaders(self) -> None:
        """The training pipeline (tensor batches or a PIL DataLoader) and the validation loader, with the eval
        transform ``build_model`` derived from the model."""
        cfg, ctx = self.cfg, self.context
        d, a, info = cfg.data, cfg.aug, ctx.dist
        pin = d.pin_memory and ctx.device.type == "cuda"
        self.val_set.transform = eval_transform(self.data_config)
        repeats = a.repeats if (a.repeated_aug and info.world_size > 1) else 1
        self.sampler = SeededSampler(
            len(self.train_indices), d.batch_size, cfg.train.seed, info.rank, info.world_size, True, repeats
        )
        self.tensor_batches: TensorBatches | None = None
        self.train_loader: DataLoader | None = None
        if d.pipeline == "tensor":
            erasing = None
            if a.re_prob > 0:
                erasing = RandomErasing(a.re_prob, mode=a.re_mode, max_count=a.re_count, device="cpu")
            labels = torch.as_tensor(self.train_set.targets, dtype=torch.long)[self.train_indices]
            self.tensor_batches = TensorBatches(
                resize_in_memory(self.train_set, self.train_indices, self.data_config),
                labels,
                self.sampler,
                TensorAugment(
                    self.data_config["mean"],
                    self.data_config["std"],
                    hflip=a.hflip,
                    padding=a.crop_padding,
                    erasing=erasing,
                    zoom=a.zoom,
                    ratio=a.ratio,
                    noise=a.noise,
                ),
            )
        else:
            if d.skip_corrupt and isinstance(self.train_set, ImageFolderDataset):
                check_classes_readable(self.train_set, self.train_indices)
            self.train_set.transform = build_train_transform(cfg, self.data_config)
            self.train_loader = DataLoader(
                SeededDataset(self.train_set, self.train_indices),
                batch_size=d.batch_size,
                sampler=self.sampler,
                num_workers=d.workers,
                collate_fn=collate_skip_corrupt,
                pin_memory=pin,
                drop_last=True,
                persistent_workers=d.workers > 0,
                worker_init_fn=ignore_sigint if d.workers > 0 else None,
            )
        eval_bs = d.eval_batch_size or 2 * d.batch_size
        self.val_loader = build_eval_loader(self.val_set, self.val_indices, eval_bs, d.workers, info, pin)

    # ---- running ------------------------------------------------------------------------------------------------

    def steps_per_epoch(self) -> int:
        return self.sampler.num_batches

    def train_batches(self, epoch: int, start_step: int) -> Any:
        if self.tensor_batches is not None:
            return self.tensor_batches.batches(epoch, start_step)
        assert self.train_loader is not None
        self.sampler.set_epoch(epoch, start_step)
        return self.train_loader

    def _on_corrupt(self, paths: list[str]) -> None:
        if not self.cfg.data.skip_corrupt:
            raise unreadable_image_error(paths[0])
        self.skipped.update(paths)
        self.skip_events += len(paths)

    def train_step(self, model: nn.Module, batch: Any) -> StepOutput | None:
        images, targets, corrupt = batch
        if corrupt:
            self._on_corrupt(corrupt)
        if images is None or len(images) < 2:  # skipped images left too few: BatchNorm needs two
            return None
        ctx = self.context
        x = ctx.images_to_device(images)
        y = targets.to(ctx.device, non_blocking=True)
        if self.mixup is not None:
            if len(x) % 2:  # a skipped unreadable image left an odd batch; Mixup pairs images
                x, y = x[:-1], y[:-1]
            if len(x) == 0:
                return None
            x, y = self.mixup(x, y)
        outputs = model(x)
        loss, parts = self.loss_fn.parts(x, outputs, y)
        return StepOutput(loss, len(x), parts)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        ctx = self.context
        return evaluate_classifier(
            model,
            self.val_loader,
            ctx.device,
            amp=ctx.amp,
            channels_last=ctx.channels_last,
            dist=ctx.dist,
            on_corrupt=self._on_corrupt,
            desc="val",
        )

    # ---- bookkeeping --------------------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        d, a, dc = cfg.data, cfg.aug, cfg.distill
        size = self.data_config["input_size"][-1]
        model: dict[str, Any] = {
            "name": cfg.model.name,
            "parameters": f"{self.params / 1e6:.2f} M",
            "heads": "class + distillation" if self.model_distillation else "one",
        }
        if self.use_distillation:
            model.update(
                {
                    "teacher": dc.teacher or dc.teacher_checkpoint,
                    "distillation": dc.type,
                    "alpha": dc.alpha,
                    "tau": dc.tau,
                }
            )
        aug: dict[str, Any] = {}
        if d.pipeline == "tensor":
            aug.update({"crop padding": a.crop_padding, "flip": a.hflip})
            if a.zoom:
                aug["zoom"] = f"{a.zoom[0]}-{a.zoom[1]} px"
            if a.noise > 0:
                aug["noise std up to"] = a.noise
            ignored = [k for k in ("auto_augment", "color_jitter") if getattr(a, k)]
            if ignored:
                aug["not applied by the tensor pipeline"] = ignored
        else:
            aug.update(
                {
                    "RandAugment": a.auto_augment or "none",
                    "colour jitter": a.color_jitter,
                    "interpolation": a.train_interpolation,
                }
            )
        if a.re_prob > 0:
            aug["erasing"] = f"{a.re_prob:g} ({a.re_mode})"
        if self.mixup_active:
            aug.update({"mixup": a.mixup, "cutmix": a.cutmix, "mixup/cutmix switch": a.mixup_switch_prob})
        if a.smoothing > 0:
            aug["label smoothing"] = a.smoothing
        if self.sampler.repeats > 1:
            aug["repeated augmentation"] = self.sampler.repeats
        return {
            "data": {
                "path": d.path,
                "train images": len(self.train_indices),
                "val images": len(self.val_indices),
                "classes": self.num_classes,
                "input": f"{size}x{size}",
                "batch per process": d.batch_size,
                "pipeline": d.pipeline,
                "workers": d.workers,
            },
            "model": model,
            "augmentation": aug,
        }

    def state(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "train_images": len(self.train_indices)}

    def check_state(self, saved: dict[str, Any], path: str) -> None:
        classes = saved.get("classes")
        if classes is not None and list(classes) != list(self.classes):
            raise CheckpointError(
                f"{path} was trained on other classes ({len(classes)}: {', '.join(classes[:4])}...) than "
                f"{self.cfg.data.path} has ({len(self.classes)}): resume with the same data"
            )

    def metadata(self, model: nn.Module) -> dict[str, str]:
        meta = {
            "class_names": json.dumps(list(self.classes)),
            "pretrained_cfg": json.dumps(
                {k: list(v) if isinstance(v, tuple) else v for k, v in self.data_config.items()}
            ),
        }
        return {**model_metadata(model), **meta}  # RapidNet: its architecture; a timm model: its name

    def export(self, model: nn.Module, path: Path) -> Path:
        """RapidNet: ``save_weights`` (safetensors + architecture); other timm models: safetensors + name."""
        if is_rapidnet(self.cfg.model.name):
            return save_weights(model, path, self.metadata(model))
        return super().export(model, path)

    def epoch_stats(self) -> dict[str, Any]:
        return {"skipped_images": len(self.skipped)} if self.cfg.data.skip_corrupt else {}

    def finish(self) -> list[str]:
        skipped = set(self.skipped)
        info = self.context.dist
        if info.distributed:
            gathered: list[Any] = [None] * info.world_size
            dist.all_gather_object(gathered, sorted(skipped))
            skipped = {p for part in gathered for p in (part or [])}
        if not skipped:
            return []
        example = sorted(skipped)[0]
        return [f"skipped {len(skipped)} unreadable image file(s) (e.g. {example}); fix or delete them to use them"]
