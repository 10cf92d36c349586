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
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from rapidnet.config import Config, DataConfig, DistillConfig, ModelConfig
from rapidnet.data import build_dataset, check_same_classes, collate_skip_corrupt, load_rgb
from rapidnet.data.augment import keep_posterize_total
from rapidnet.engine.distributed import DistInfo, reduce_sums
from rapidnet.engine.seeding import (
    SeededDataset,
    SeededSampler,
    ignore_sigint,
    mix_seed,
    seed_everything,
)
from rapidnet.engine.task import RunContext, StepOutput, Task
from rapidnet.errors import CheckpointError, ConfigError, DataError
from rapidnet.models import create_model, is_rapidnet, load, model_metadata, save_weights
from rapidnet.models.checkpoint import load_timm_checkpoint
from rapidnet.tasks._commands import check_model_kwargs, check_task_name
from rapidnet.utils import subset_indices

__all__ = [
    "ClassificationTask",
    "DistillationLoss",
    "TensorBatches",
    "build_eval_loader",
    "build_train_transform",
    "create_classifier",
    "eval_data_config",
    "evaluate_classifier",
    "unreadable_image_error",
]

#: keys of ``pretrained_cfg`` that define the eval transform; exported with the weights as JSON
_TRANSFORM_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


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


class DistillationLoss(nn.Module):
    """DeiT's loss for a model with a distillation head: ``(1 - alpha) * base(cls) + alpha * distill(dist)``.

    ``hard``: cross-entropy of the distillation logits against the teacher's arg-max; ``soft``: KL divergence at
    temperature ``tau`` (scaled by ``tau**2``), as in the authors' training code.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        self.base = base
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self.parts(inputs, outputs, targets)[0]

    def parts(
        self, inputs: torch.Tensor, outputs: Any, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and, for two heads, its unweighted terms: ``loss_cls`` (base loss of the class head) and
        ``loss_distill`` (of the distillation head against the teacher); a single output has no terms."""
        if not isinstance(outputs, (tuple, list)):
            return self.base(outputs.float(), targets), {}
        logits, logits_dist = (o.float() for o in outputs)
        base_loss = self.base(logits, targets)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).float()
        if self.kind == "soft":
            t = self.tau
            distill = (
                F.kl_div(
                    F.log_softmax(logits_dist / t, dim=1),
                    F.log_softmax(teacher_logits / t, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (t * t)
                / logits_dist.numel()
            )
        else:
            distill = F.cross_entropy(logits_dist, teacher_logits.argmax(dim=1))
        total = base_loss * (1 - self.alpha) + distill * self.alpha
        return total, {"loss_cls": base_loss.detach(), "loss_distill": distill.detach()}


# ---- transforms and loaders ---------------------------------------------------------------------------------------


def eval_data_config(model: nn.Module, data: DataConfig | None = None, input_size: int | None = None) -> dict[str, Any]:
    """The eval transform settings: the model's ``pretrained_cfg`` with the config's overrides."""

    cfg = dict(resolve_data_config({}, model=model))
    cfg.setdefault("crop_mode", "center")
    size = input_size or (data.input_size if data is not None else None)
    if size is not None:
        cfg["input_size"] = (3, size, size)
    if data is not None:
        for key in ("crop_pct", "interpolation", "mean", "std"):
            value = getattr(data, key)
            if value is not None:
                cfg[key] = tuple(value) if isinstance(value, list) else value
    cfg["input_size"] = tuple(cfg["input_size"])
    cfg["mean"], cfg["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return {k: cfg[k] for k in _TRANSFORM_KEYS if k in cfg}


def build_eval_transform(data_config: dict[str, Any]) -> Callable[[Any], torch.Tensor]:

    return create_transform(**data_config, is_training=False)


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


def build_eval_loader(
    dataset: Any, indices: Sequence[int], batch_size: int, workers: int, dist: DistInfo, pin_memory: bool = False
) -> DataLoader:
    """Shard ``indices`` over processes without padding (so reduced metrics count every image once)."""
    shard = list(indices)[dist.rank :: dist.world_size]
    return DataLoader(
        SeededDataset(dataset, shard),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_skip_corrupt,
        pin_memory=pin_memory,
        worker_init_fn=ignore_sigint if workers > 0 else None,
    )


def unreadable_image_error(path: str) -> DataError:
    """One line naming the unreadable file, why, and the option that skips such files."""
    try:
        load_rgb(path)
        reason = "unreadable"
    except Exception as e:  # the decoder's own message says what is wrong with the file
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
    return DataError(f"cannot read image {path} ({reason}): replace or delete it, or pass --skip-corrupt to skip it")


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: DataLoader,
    ctx: RunContext,
    on_corrupt: Callable[[list[str]], None] | None = None,
    progress: bool | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1, top-5 (top-k for fewer classes) in percent, mean cross-entropy, image count: over all processes."""

    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "images": 0.0}
    disable = None if progress is None else not progress
    for images, targets, corrupt in tqdm(
        loader, desc=desc, leave=False, disable=True if not ctx.dist.is_main else disable, dynamic_ncols=True
    ):
        if corrupt:
            if on_corrupt is None:
                raise unreadable_image_error(corrupt[0])
            on_corrupt(corrupt)
        if images is None:
            continue
        x = ctx.images_to_device(images)
        y = targets.to(ctx.device)
        with ctx.autocast():
            out = model(x)
        if isinstance(out, (tuple, list)):
            out = (out[0] + out[1]) / 2
        logits = out.float()
        sums["loss"] += float(F.cross_entropy(logits, y, reduction="sum"))
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hits = top.eq(y[:, None])
        sums["top1"] += float(hits[:, 0].sum())
        sums["top5"] += float(hits.any(dim=1).sum())
        sums["images"] += len(y)
    model.train(was_training)
    total = reduce_sums(ctx.dist, sums)
    n = total["images"]
    if n == 0:
        raise DataError("no readable validation images: check the val/ folder (or --limit-val)")
    return {
        "top1": 100.0 * total["top1"] / n,
        "top5": 100.0 * total["top5"] / n,
        "loss": total["loss"] / n,
        "images": int(n),
    }


class TensorBatches:
    """Whole-batch augmentation of in-memory images (pre-resized uint8), yielding ``(images, targets, [])``.

    Per batch: random crop of the zero-padded image (``padding`` pixels each side), optionally a zoom (resize to a
    side drawn from ``zoom`` with an aspect from ``ratio``, each image placed at random on a black canvas up to a
    quarter larger), horizontal flip, optional Gaussian noise, conversion to float and normalisation, then timm
    random erasing. Grayscale images become 3 identical channels, as the PIL path's ``convert("RGB")`` makes them.
    Each batch's draws depend only on ``(seed, epoch, batch, rank)``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        sampler: SeededSampler,
        mean: Sequence[float],
        std: Sequence[float],
        hflip: float = 0.5,
        padding: int = 0,
        erasing: Any = None,
        zoom: Sequence[int] | None = None,
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        noise: float = 0.0,
    ) -> None:
        self.images = images if images.ndim == 4 else images[:, None]
        self.targets = targets
        self.sampler = sampler
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.hflip = hflip
        self.padding = padding
        self.erasing = erasing
        self.zoom = tuple(zoom) if zoom else None
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.noise = noise

    def batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        s = self.sampler
        s.set_epoch(epoch, 0)
        order = torch.tensor(s.epoch_order(), dtype=torch.long)
        for b in range(start, s.num_batches):
            seed_everything(mix_seed(s.seed, epoch, b, s.rank, 4), cuda=False)
            idx = order[b * s.batch_size : (b + 1) * s.batch_size]
            yield self.augment(self.images[idx]), self.targets[idx], []

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        if self.padding > 0:
            p = self.padding
            padded = F.pad(x, (p, p, p, p))
            oy = torch.randint(0, 2 * p + 1, (n,))
            ox = torch.randint(0, 2 * p + 1, (n,))
            x = _crop_each(padded, oy, ox, h, w)
        x = x.float()
        if self.zoom is not None:
            x = self._zoom(x)
        if self.hflip > 0:
            flip = torch.rand(n) < self.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if self.noise > 0:
            x = (x + torch.randn_like(x) * float(torch.empty(()).uniform_(0, self.noise))).clamp_(0, 255)
        x = x.div_(255)
        channels = self.mean.shape[1]
        if x.shape[1] != channels:
            x = x.expand(-1, channels, -1, -1)
        x = (x - self.mean) / self.std
        if self.erasing is not None:
            x = self.erasing(x)
        return x.contiguous()

    def _zoom(self, x: torch.Tensor) -> torch.Tensor:
        """Resize the batch to one drawn size and aspect; place each image at random on a black square canvas."""
        n = len(x)
        side = int(torch.randint(self.zoom[0], self.zoom[1] + 1, ()))
        aspect = math.exp(float(torch.empty(()).uniform_(*self.log_ratio)))
        gh, gw = max(1, round(side * math.sqrt(aspect))), max(1, round(side / math.sqrt(aspect)))
        x = F.interpolate(x, size=(gh, gw), mode="bilinear", align_corners=False, antialias=True).clamp_(0, 255)
        canvas = round(max(gh, gw) * float(torch.empty(()).uniform_(1.0, 1.25)))
        tops = torch.randint(0, canvas - gh + 1, (n,))
        lefts = torch.randint(0, canvas - gw + 1, (n,))
        # the image at (top, left) of the canvas is the canvas-sized crop at (free - top, free - left) of the image
        # zero-padded by the free space on every side
        free_y, free_x = canvas - gh, canvas - gw
        padded = F.pad(x, (free_x, free_x, free_y, free_y))
        return _crop_each(padded, free_y - tops, free_x - lefts, canvas, canvas)


def _crop_each(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """One ``h x w`` crop per image of the batch ``x``, image ``i``'s at ``(top[i], left[i])``, in one gather."""
    rows = (top[:, None] + torch.arange(h))[:, :, None]
    cols = (left[:, None] + torch.arange(w))[:, None, :]
    return x[torch.arange(len(x))[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def _resize_in_memory(dataset: Any, indices: Sequence[int], data_config: dict[str, Any]) -> torch.Tensor:
    """Apply the eval geometry (resize + centre crop, no normalisation) once to every image: uint8 (N, C, S, S)."""

    geometry = create_transform(**data_config, is_training=False, normalize=False)
    images = dataset.images
    first = geometry(Image.fromarray(images[indices[0]]))
    out = torch.empty((len(indices), *first.shape), dtype=torch.uint8)
    for i, index in enumerate(indices):
        out[i] = geometry(Image.fromarray(images[index]))
    return out


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
        self.data_config = eval_data_config(model, cfg.data)
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
        self.val_set.transform = build_eval_transform(self.data_config)
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
                _resize_in_memory(self.train_set, self.train_indices, self.data_config),
                labels,
                self.sampler,
                self.data_config["mean"],
                self.data_config["std"],
                hflip=a.hflip,
                padding=a.crop_padding,
                erasing=erasing,
                zoom=a.zoom,
                ratio=a.ratio,
                noise=a.noise,
            )
        else:
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
        if images is None:
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
        return evaluate_classifier(model, self.val_loader, self.context, on_corrupt=self._on_corrupt, desc="val")

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


def describe_metrics(metrics: dict[str, float]) -> str:
    """``top-1 91.23%  top-5 99.80%  loss 0.2512  (10000 images)``."""
    loss = metrics["loss"]
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
    return f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {loss_text}  ({metrics['images']} images)"
