"""Dense-task metrics: COCO box / mask AP through pycocotools' COCOeval, and mIoU / mAcc / aAcc from a confusion
matrix. Both follow the same protocol so a generic engine can drive them::

    evaluator.reset()
    for images, targets in loader:
        evaluator.update(model(images), targets)
    evaluator.synchronize()          # under DDP: merge every process's state (a no-op on one process)
    metrics = evaluator.compute()    # dict of floats, in percent, identical on every process

``per_class()`` and ``table()`` give the per-class breakdown after ``compute()``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

from rapidnet.errors import DataError

__all__ = ["COCO_STAT_NAMES", "CocoEvaluator", "SegmentationMetrics"]

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _to_int(value: Any) -> int:
    return int(value.item()) if torch.is_tensor(value) else int(value)


def _pct(value: float) -> float:
    """A COCOeval/confusion statistic in percent; undefined (-1 or NaN) stays NaN."""
    return float("nan") if value is None or math.isnan(value) or value < 0 else float(value) * 100.0


# ---- COCO ----------------------------------------------------------------------------------------------------------


class CocoEvaluator:
    """COCO AP / AP50 / AP75 (and S/M/L) for boxes (``bbox``) and instance masks (``segm``).

    Args:
        coco_gt: the ground truth, a pycocotools ``COCO`` (``CocoInstances.coco``).
        iou_types: ``("bbox", "segm")`` or a subset.
        label_to_category: model label -> COCO category id (``CocoInstances.label_to_cat``); None: identity.
        class_names: names in label order (1..K) for the per-class table; default the categories' names.
        mask_threshold: probability above which a predicted mask pixel counts.

    ``update`` takes torchvision's eval outputs (``boxes`` XYXY, ``labels``, ``scores``, ``masks`` ``(N, 1, H, W)``)
    and targets holding ``image_id`` (plus ``orig_size``/``image_size`` when the data set resized the image, to map
    the predictions back). A repeated image id (DDP samplers pad with repeats) is counted once.
    """

    def __init__(
        self,
        coco_gt: Any,
        iou_types: Sequence[str] = ("bbox", "segm"),
        label_to_category: Mapping[int, int] | Sequence[int] | None = None,
        class_names: Sequence[str] | None = None,
        mask_threshold: float = 0.5,
    ) -> None:
        bad = [t for t in iou_types if t not in ("bbox", "segm")]
        if bad or not iou_types:
            raise ValueError(f"iou_types {list(iou_types)}: use 'bbox' and/or 'segm'")
        self.coco_gt = coco_gt
        self.iou_types = tuple(iou_types)
        if label_to_category is None:
            self.label_to_category: dict[int, int] | None = None
        elif isinstance(label_to_category, Mapping):
            self.label_to_category = {int(k): int(v) for k, v in label_to_category.items()}
        else:  # a sequence: entry i is the category of label i + 1
            self.label_to_category = {i + 1: int(c) for i, c in enumerate(label_to_category)}
        self.class_names = list(class_names) if class_names is not None else None
        self.mask_threshold = mask_threshold
        self.reset()

    @classmethod
    def from_dataset(cls, dataset: Any, iou_types: Sequence[str] = ("bbox", "segm")) -> CocoEvaluator:
        """The evaluator of a :class:`~rapidnet.data.coco.CocoInstances` (or a ``Subset`` of one)."""
        while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        return cls(dataset.coco, iou_types, dataset.label_to_cat, dataset.classes)

    def reset(self) -> None:
        self._results: dict[int, dict[str, list[dict[str, Any]]]] = {}
        self._synced = False
        self._stats: dict[str, np.ndarray] = {}
        self._per_class: dict[str, dict[str, float]] = {}

    def _category(self, label: int) -> int:
        if self.label_to_category is None:
            return label
        try:
            return self.label_to_category[label]
        except KeyError:
            raise DataError(
                f"prediction with label {label}, which maps to no COCO category "
                f"(known labels {min(self.label_to_category)}..{max(self.label_to_category)}): "
                "check the model's num_classes against the data set"
            ) from None

    @torch.no_grad()
    def update(self, predictions: Sequence[Mapping[str, torch.Tensor]], targets: Sequence[Mapping[str, Any]]) -> None:
        """Add one batch of predictions (one dict per image) with their targets (for ``image_id``)."""

        for pred, target in zip(predictions, targets, strict=True):
            image_id = _to_int(target["image_id"])
            boxes = pred["boxes"].detach().float().cpu()
            scores = pred["scores"].detach().float().cpu().tolist()
            labels = [int(v) for v in pred["labels"].cpu().tolist()]
            masks = pred.get("masks")
            scale = None
            if "orig_size" in target and "image_size" in target:
                oh, ow = (int(v) for v in target["orig_size"])
                ih, iw = (int(v) for v in target["image_size"])
                if (oh, ow) != (ih, iw):
                    scale = (oh, ow)
                    boxes = boxes * torch.tensor([ow / iw, oh / ih, ow / iw, oh / ih])
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
            cats = [self._category(lab) for lab in labels]
            entry: dict[str, list[dict[str, Any]]] = {"bbox": [], "segm": []}
            if "bbox" in self.iou_types:
                entry["bbox"] = [
                    {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                    for c, b, s in zip(cats, xywh, scores, strict=True)
                ]
            if "segm" in self.iou_types and len(labels):
                if masks is None:
                    raise ValueError("segm evaluation needs 'masks' in the predictions (a Mask R-CNN's eval output)")
                m = masks.detach().float()
                if m.ndim == 4:
                    m = m[:, 0]
                if scale is not None:
                    m = F.interpolate(m[:, None], size=scale, mode="bilinear", align_corners=False)[:, 0]
                binary = (m >= self.mask_threshold).to(torch.uint8).cpu().numpy()
                rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
                for c, rle, s in zip(cats, rles, scores, strict=True):
                    rle["counts"] = rle["counts"].decode("ascii")
                    entry["segm"].append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
            self._results.setdefault(image_id, entry)

    def synchronize(self) -> None:
        """Merge every process's results (``all_gather_object``); a no-op on one process or when already merged."""
        if self._synced or _world_size() == 1:
            return
        gathered: list[Any] = [None] * _world_size()
        torch.distributed.all_gather_object(gathered, self._results)
        merged: dict[int, dict[str, list[dict[str, Any]]]] = {}
        for part in gathered:
            for image_id, entry in part.items():
                merged.setdefault(int(image_id), entry)
        self._results = merged
        self._synced = True

    def _evaluate(self, iou_type: str, image_ids: list[int]) -> Any:

        dets = [dict(r) for image_id in image_ids for r in self._results[image_id][iou_type]]
        if not dets:
            return None
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                coco_dt = self.coco_gt.loadRes(dets)
            except AssertionError:
                raise DataError(
                    "predictions refer to image ids the ground truth does not have: evaluate with the data set's own "
                    "annotation file"
                ) from None
            evaluator = COCOeval(self.coco_gt, coco_dt, iou_type)
            evaluator.params.imgIds = image_ids
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator

    def compute(self) -> dict[str, float]:
        """``{bbox,segm}_{AP,AP50,AP75,APs,APm,APl}`` in percent (NaN where COCO leaves a figure undefined)."""
        self.synchronize()
        image_ids = sorted(self._results)
        metrics: dict[str, float] = {}
        self._per_class = {}
        for iou_type in self.iou_types:
            evaluator = self._evaluate(iou_type, image_ids) if image_ids else None
            stats = np.zeros(len(COCO_STAT_NAMES)) if evaluator is None else evaluator.stats[: len(COCO_STAT_NAMES)]
            for name, value in zip(COCO_STAT_NAMES, stats, strict=True):
                metrics[f"{iou_type}_{name}"] = _pct(float(value))
            self._per_class[iou_type] = self._class_aps(evaluator)
        return metrics

    def _class_name(self, cat_id: int) -> str:
        if self.class_names is not None:
            if self.label_to_category is None:
                if 1 <= cat_id <= len(self.class_names):
                    return self.class_names[cat_id - 1]
            else:
                for label, cat in self.label_to_category.items():
                    if cat == cat_id and 1 <= label <= len(self.class_names):
                        return self.class_names[label - 1]
        return str(self.coco_gt.cats.get(cat_id, {}).get("name", cat_id))

    def _class_aps(self, evaluator: Any) -> dict[str, float]:
        """AP per category (IoU 0.50:0.95, all areas, 100 detections), in percent; NaN without ground truth."""
        cat_ids = sorted(self.coco_gt.getCatIds())
        if evaluator is None:
            return {self._class_name(c): 0.0 for c in cat_ids}
        precision = evaluator.eval["precision"]  # (IoU thresholds, recall points, categories, areas, max dets)
        out = {}
        for k, cat_id in enumerate(evaluator.params.catIds):
            p = precision[:, :, k, 0, -1]
            p = p[p > -1]
            out[self._class_name(cat_id)] = float(p.mean()) * 100.0 if p.size else float("nan")
        return out

    def per_class(self) -> dict[str, dict[str, float]]:
        """``{iou_type: {class name: AP}}`` from the last ``compute()``."""
        return self._per_class

    def table(self) -> str:
        """The per-class AP table as aligned text (one row per class, one column per IoU type)."""
        if not self._per_class:
            return "(no evaluation yet: call compute() first)"
        types = list(self._per_class)
        names = list(self._per_class[types[0]])
        width = max([len("class"), *(len(n) for n in names)])
        lines = [f"{'class':<{width}}  " + "  ".join(f"{t + ' AP':>8}" for t in types)]
        for name in names:
            cells = "  ".join(f"{self._per_class[t].get(name, float('nan')):8.2f}" for t in types)
            lines.append(f"{name:<{width}}  {cells}")
        return "\n".join(lines)


# ---- semantic segmentation -----------------------------------------------------------------------------------------


def _target_label(target: Any) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """A target's label map, plus the un-padded image size when the target says so."""
    if isinstance(target, Mapping):
        size = tuple(int(v) for v in target["image_size"]) if "image_size" in target else None
        return target["sem_seg"], size  # type: ignore[return-value]
    return target, None


class SegmentationMetrics:
    """Confusion-matrix metrics of semantic segmentation: mIoU, mean class accuracy (mAcc), pixel accuracy (aAcc).

    ``update`` takes logits ``(N, C, H, W)`` (or label maps ``(N, H, W)``, or lists of either) and targets as a
    list of dicts with ``sem_seg`` (and ``image_size``: the prediction is cropped to it first, removing the batch
    padding; if ``sem_seg`` is larger, as in ADE20K evaluation, logits are resized to it bilinearly), or label maps.
    Pixels labelled ``ignore_index`` never count. Classes absent from the ground truth and the predictions are left
    out of the means (NaN in the table), as mmsegmentation does.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: Sequence[str] | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self._synced = False

    def add(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        """Count label map ``pred`` against ground truth ``gt`` (same shape)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
        gt = gt.long()
        valid = (gt != self.ignore_index) & (gt >= 0) & (gt < self.num_classes)
        idx = gt[valid] * self.num_classes + pred.long()[valid]
        counts = torch.bincount(idx.flatten(), minlength=self.num_classes**2)
        self.confusion += counts.reshape(self.num_classes, self.num_classes).cpu()

    @torch.no_grad()
    def update(self, predictions: torch.Tensor | Sequence[torch.Tensor], targets: Any) -> None:
        for pred, target in zip(predictions, targets, strict=True):
            gt, size = _target_label(target)
            is_logits = pred.ndim == 3
            if size is not None:
                pred = pred[..., : size[0], : size[1]]
            if tuple(pred.shape[-2:]) != tuple(gt.shape[-2:]):
                mode = "bilinear" if is_logits else "nearest-exact"
                src = pred[None].float() if is_logits else pred[None, None].float()
                kwargs = {"align_corners": False} if is_logits else {}
                pred = F.interpolate(src, size=tuple(gt.shape[-2:]), mode=mode, **kwargs)[0]
                if not is_logits:
                    pred = pred[0].long()
            labels = pred.argmax(0) if is_logits else pred
            self.add(labels.to(gt.device), gt)

    def synchronize(self) -> None:
        """Sum the confusion matrices of every process (a no-op on one process or when already summed)."""
        if self._synced or _world_size() == 1:
            return
        dist = torch.distributed
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        total = self.confusion.to(device)
        dist.all_reduce(total)
        self.confusion = total.cpu()
        self._synced = True

    def _per_class_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        cm = self.confusion.double().numpy()
        tp = np.diag(cm)
        gt = cm.sum(1)
        union = gt + cm.sum(0) - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
            acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
        return iou, acc

    def compute(self) -> dict[str, float]:
        """``mIoU``, ``mAcc`` and ``aAcc`` in percent."""
        self.synchronize()
        iou, acc = self._per_class_arrays()
        total = self.confusion.sum().item()
        return {
            "mIoU": _pct(float(np.nanmean(iou))) if np.isfinite(iou).any() else float("nan"),
            "mAcc": _pct(float(np.nanmean(acc))) if np.isfinite(acc).any() else float("nan"),
            "aAcc": _pct(self.confusion.diag().sum().item() / total) if total else float("nan"),
        }

    def per_class(self) -> dict[str, dict[str, float]]:
        """``{class name: {"IoU": ..., "Acc": ...}}`` in percent."""
        iou, acc = self._per_class_arrays()
        return {
            name: {"IoU": float(i) * 100.0, "Acc": float(a) * 100.0}
            for name, i, a in zip(self.class_names, iou, acc, strict=True)
        }

    def table(self) -> str:
        """Per-class IoU / accuracy as aligned text."""
        rows = self.per_class()
        width = max([len("class"), *(len(n) for n in rows)])
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}"]
        lines += [f"{n:<{width}}  {r['IoU']:7.2f}  {r['Acc']:7.2f}" for n, r in rows.items()]
        return "\n".join(lines)
