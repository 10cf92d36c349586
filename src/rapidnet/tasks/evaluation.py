"""Evaluating a classifier on its own: the sharded validation loader and the top-1 / top-5 / loss loop.

The classification task validates with it every epoch and ``rapidnet eval`` scores a checkpoint with it, so it takes
a device and the precision settings rather than a training run's context or config. Under DDP each process
evaluates its shard and the sums are reduced, so every process returns the figures of the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from rapidnet.data import collate_skip_corrupt
from rapidnet.data.folder import unreadable_image_error
from rapidnet.engine.distributed import DistInfo, reduce_sums
from rapidnet.engine.seeding import SeededDataset, ignore_sigint
from rapidnet.engine.task import autocast
from rapidnet.errors import DataError

__all__ = ["build_eval_loader", "describe_metrics", "evaluate_classifier"]


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


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[Any],
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    dist: DistInfo | None = None,
    on_corrupt: Callable[[list[str]], None] | None = None,
    progress: bool | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Top-1, top-5 (top-k for fewer classes) in percent, mean cross-entropy, image count: over all processes.

    ``loader`` yields ``(images, targets, corrupt_paths)`` (``collate_skip_corrupt``); ``model`` is already on
    ``device`` (in channels-last memory when ``channels_last``). A two-head model is scored by its heads' mean.
    Unreadable images raise unless ``on_corrupt`` takes their paths. ``dist`` (one process when None) reduces the
    sums and shows the progress bar on the main process only.
    """
    info = dist if dist is not None else DistInfo(device=device)
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "images": 0.0}
    disable = None if progress is None else not progress
    for images, targets, corrupt in tqdm(
        loader, desc=desc, leave=False, disable=True if not info.is_main else disable, dynamic_ncols=True
    ):
        if corrupt:
            if on_corrupt is None:
                raise unreadable_image_error(corrupt[0])
            on_corrupt(corrupt)
        if images is None:
            continue
        x = images.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        y = targets.to(device)
        with autocast(device, amp):
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
    total = reduce_sums(info, sums)
    n = total["images"]
    if n == 0:
        raise DataError("no readable validation images: check the val/ folder (or --limit-val)")
    return {
        "top1": 100.0 * total["top1"] / n,
        "top5": 100.0 * total["top5"] / n,
        "loss": total["loss"] / n,
        "images": int(n),
    }


def describe_metrics(metrics: dict[str, float]) -> str:
    """``top-1 91.23%  top-5 99.80%  loss 0.2512  (10000 images)``."""
    loss = metrics["loss"]
    loss_text = f"{loss:.4f}" if math.isfinite(loss) else str(loss)
    return f"top-1 {metrics['top1']:.2f}%  top-5 {metrics['top5']:.2f}%  loss {loss_text}  ({metrics['images']} images)"
