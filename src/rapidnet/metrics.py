"""Dense-task metrics: COCO box / mask AP through pycocotools' COCOeval, and mIoU / mAcc / aAcc from a confusion
matrix. Both follow the same protocol so a generic engine can drive them::

    evaluator.reset()
    for images, targets in loader:
        evaluator.update(model(images), targets)
    evaluator.synchronize()          # under DDP: merge every process's state (a no-op on one process)
    metrics = evaluator.compute()    # dict of floats, in percent, identical on every process

``per_class()`` and ``table()`` give the per-class breakdown after ``compute()``.

Both also give a 95% per-image bootstrap interval of their headline figures (``bootstrap=B`` resamples, default
1000, seeded; 0 switches it off): ``compute()`` adds ``<metric>_ci: [low, high]`` (``bbox_AP_ci``, ``segm_AP_ci``;
``mIoU_ci``, ``mAcc_ci``, ``aAcc_ci``). A resample draws the evaluated images with replacement, so the interval
says how much the figure would move on another draw of as many scenes: 200 scenes are not enough to tell apart two
models half a point apart. Each statistic is recomputed from per-image parts that are cached once: per-class
intersection / ground-truth / prediction pixel counts for mIoU (a resample is a weighted sum), and COCOeval's
per-image matches (``evalImgs``) for AP, re-accumulated with pycocotools' own precision/recall rule where image ``i``
counts ``w_i`` times (:func:`coco_ap_resamples`). The images are ordered by id first, so the interval does not depend
on how many processes evaluated them. The interval is the 2.5th to 97.5th percentile of the resampled values; that
of a perfect prediction is a point (100, 100).
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

from rapidnet.constants import DEFAULT_BOOTSTRAP
from rapidnet.errors import DataError

__all__ = [
    "COCO_STAT_NAMES",
    "DEFAULT_BOOTSTRAP",
    "CocoEvaluator",
    "SegmentationMetrics",
    "bootstrap_counts",
    "coco_ap_resamples",
    "percentile_interval",
]

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")
_CHUNK_ELEMENTS = 2_000_000  # floats per (resamples x thresholds x detections) block of the AP bootstrap


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _to_int(value: Any) -> int:
    return int(value.item()) if torch.is_tensor(value) else int(value)


def _pct(value: float) -> float:
    """A COCOeval/confusion statistic in percent; undefined (-1 or NaN) stays NaN."""
    return float("nan") if value is None or math.isnan(value) or value < 0 else float(value) * 100.0


def _check_bootstrap(bootstrap: int, confidence: float) -> None:
    if int(bootstrap) < 0:
        raise ValueError(f"bootstrap={bootstrap}: give the number of resamples (0 for no interval)")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}: give a level in (0, 1), e.g. 0.95")


# ---- bootstrap -----------------------------------------------------------------------------------------------------


def bootstrap_counts(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """``(resamples, num_images)`` float64: how often each image is drawn in each resample of ``num_images`` images
    drawn with replacement (``numpy.random.default_rng(seed)``, so the same seed gives the same resamples)."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, num_images, size=(resamples, num_images))
    rows = np.repeat(np.arange(resamples) * num_images, num_images)
    counts = np.bincount(rows + draws.ravel(), minlength=resamples * num_images)
    return counts.reshape(resamples, num_images).astype(np.float64)


def percentile_interval(values: np.ndarray, confidence: float = 0.95) -> list[float]:
    """``[low, high]``: the central ``confidence`` share of resampled statistics (NaN resamples left out; NaN when
    every one is)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return [float("nan"), float("nan")]
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return [float(low), float(high)]


def coco_ap_resamples(evaluator: Any, counts: np.ndarray) -> dict[str, np.ndarray]:
    """AP, AP50 and AP75 (all areas, ``maxDets[-1]`` detections) of an evaluated ``COCOeval`` for every row of
    ``counts`` (``(B, images)``, in the order of ``evaluator.params.imgIds``): image ``i`` counted ``counts[b, i]``
    times, in fractions (0..1; NaN where no image with ground truth was drawn).

    This is pycocotools' ``accumulate()`` + ``summarize()`` with multiplicities: the detections of every image are
    sorted once; a resample weights each detection's true/false positive and each image's ground truths by the
    image's count, then takes the same cumulative precision/recall, the same monotone precision envelope and the same
    101-point recall interpolation, so all-ones counts give COCOeval's own AP (tested), and integer counts give what
    COCOeval reports for a data set holding each image that many times (up to score ties between different
    detections). Categories without ground truth in a resample are left out of its mean, as COCOeval leaves them out.

    Why it is fast: an interpolated precision is the largest precision at a recall at least the threshold, and only a
    true positive can hold that largest value (a false positive has the recall of the point before it and a lower
    precision), so each threshold's curve is evaluated at its true positives only; the false positives before each
    one come from one cumulative sum of all detections.
    """
    p = evaluator.params
    counts = np.asarray(counts, dtype=np.float64)
    num_images, num_areas = len(p.imgIds), len(p.areaRng)
    if counts.ndim != 2 or counts.shape[1] != num_images:
        raise ValueError(f"counts of shape {counts.shape} for {num_images} evaluated images")
    area = list(p.areaRngLbl).index("all")
    max_det = p.maxDets[-1]
    rec_thrs = np.asarray(p.recThrs, dtype=np.float64)
    iou_thrs = np.asarray(p.iouThrs, dtype=np.float64)
    at = {"AP50": int(np.argmin(np.abs(iou_thrs - 0.5))), "AP75": int(np.argmin(np.abs(iou_thrs - 0.75)))}
    n_rs, n_t, n_r = counts.shape[0], len(iou_thrs), len(rec_thrs)
    sums = {name: np.zeros(n_rs) for name in ("AP", "AP50", "AP75")}
    valid_cats = np.zeros(n_rs)
    for k in range(len(p.catIds) if p.useCats else 1):
        base = k * num_areas * num_images + area * num_images
        entries = [(i, evaluator.evalImgs[base + i]) for i in range(num_images)]
        entries = [(i, e) for i, e in entries if e is not None]
        if not entries:
            continue
        gts = np.zeros(num_images)
        for i, e in entries:
            gts[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        npig = counts @ gts  # ground truths of the category in each resample
        valid = npig > 0
        if not valid.any():
            continue
        q = np.zeros((n_rs, n_t, n_r))  # interpolated precision per resample, IoU threshold and recall threshold
        scores = np.concatenate([np.asarray(e["dtScores"][:max_det], dtype=np.float64) for _, e in entries])
        if scores.size:
            order = np.argsort(-scores, kind="mergesort")  # COCOeval's order (stable: ties keep the image order)
            image = np.concatenate([np.full(len(e["dtScores"][:max_det]), i) for i, e in entries])[order]
            matched = np.concatenate([np.asarray(e["dtMatches"])[:, :max_det] for _, e in entries], axis=1)[:, order]
            ignored = np.concatenate([np.asarray(e["dtIgnore"])[:, :max_det] for _, e in entries], axis=1)[:, order]
            tps = (matched != 0) & ~ignored.astype(bool)  # (T, D)
            usable = tps | ((matched == 0) & ~ignored.astype(bool))  # true or false positives (not crowd matches)
            rows_ok = np.flatnonzero(valid)
            chunk = max(1, _CHUNK_ELEMENTS // scores.size)
            for start in range(0, len(rows_ok) if tps.any() else 0, chunk):
                rows = rows_ok[start : start + chunk]
                weight = counts[rows][:, image]  # (b, D): each detection counts as often as its image
                seen: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
                for t in range(n_t):
                    tp_cols = np.flatnonzero(tps[t])
                    if not tp_cols.size:
                        continue
                    mask = usable[t].tobytes()
                    if mask not in seen:  # one cumulative sum per set of usable detections (one without crowds)
                        cols = np.flatnonzero(usable[t])
                        seen[mask] = (np.cumsum(weight[:, cols], axis=1), np.cumsum(usable[t]) - 1)
                    cum_all, position = seen[mask]
                    tp = np.cumsum(weight[:, tp_cols], axis=1)
                    fp = cum_all[:, position[tp_cols]] - tp
                    recall = tp / npig[rows, None]
                    precision = tp / (fp + tp + np.spacing(1))
                    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
                    reached = np.searchsorted(rec_thrs, recall, side="right")  # thresholds each point reaches
                    n_rows, n_pts = reached.shape
                    flat = (np.arange(n_rows)[:, None] * (n_r + 1) + reached).ravel()
                    hist = np.bincount(flat, minlength=n_rows * (n_r + 1)).reshape(n_rows, n_r + 1)
                    first = np.cumsum(hist, axis=1)[:, :n_r]  # the first point reaching each recall threshold
                    found = np.take_along_axis(envelope, np.minimum(first, n_pts - 1), axis=1)
                    q[rows, t] = np.where(first < n_pts, found, 0.0)
        sums["AP"] += np.where(valid, q.mean(axis=(1, 2)), 0.0)
        for name, t in at.items():
            sums[name] += np.where(valid, q[:, t].mean(axis=1), 0.0)
        valid_cats += valid
    with np.errstate(divide="ignore", invalid="ignore"):
        return {name: np.where(valid_cats > 0, total / valid_cats, np.nan) for name, total in sums.items()}


# ---- COCO ----------------------------------------------------------------------------------------------------------


class CocoEvaluator:
    """COCO AP / AP50 / AP75 (and S/M/L) for boxes (``bbox``) and instance masks (``segm``).

    Args:
        coco_gt: the ground truth, a pycocotools ``COCO`` (``CocoInstances.coco``).
        iou_types: ``("bbox", "segm")`` or a subset.
        label_to_category: model label -> COCO category id (``CocoInstances.label_to_cat``); None: identity.
        class_names: names in label order (1..K) for the per-class table; default the categories' names.
        mask_threshold: probability above which a predicted mask pixel counts.
        bootstrap: resamples of the images for the ``{bbox,segm}_AP_ci`` intervals (0: none); ``seed`` draws them.
        confidence: the intervals' level.

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
        *,
        bootstrap: int = DEFAULT_BOOTSTRAP,
        seed: int = 0,
        confidence: float = 0.95,
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
        _check_bootstrap(bootstrap, confidence)
        self.bootstrap, self.seed, self.confidence = int(bootstrap), int(seed), float(confidence)
        self.reset()

    @classmethod
    def from_dataset(cls, dataset: Any, iou_types: Sequence[str] = ("bbox", "segm"), **kwargs: Any) -> CocoEvaluator:
        """The evaluator of a :class:`~rapidnet.data.coco.CocoInstances` (or a ``Subset`` of one); ``kwargs`` go to
        the constructor (``bootstrap=0`` for no intervals)."""
        while not hasattr(dataset, "coco") and hasattr(dataset, "dataset"):
            dataset = dataset.dataset
        return cls(dataset.coco, iou_types, dataset.label_to_cat, dataset.classes, **kwargs)

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

    def compute(self) -> dict[str, Any]:
        """``{bbox,segm}_{AP,AP50,AP75,APs,APm,APl}`` in percent (NaN where COCO leaves a figure undefined), and with
        ``bootstrap`` the intervals ``{bbox,segm}_AP_ci`` (``[low, high]``; the same resamples for both types)."""
        self.synchronize()
        image_ids = sorted(self._results)
        metrics: dict[str, Any] = {}
        self._per_class = {}
        counts = bootstrap_counts(len(image_ids), self.bootstrap, self.seed) if self.bootstrap and image_ids else None
        for iou_type in self.iou_types:
            evaluator = self._evaluate(iou_type, image_ids) if image_ids else None
            stats = np.zeros(len(COCO_STAT_NAMES)) if evaluator is None else evaluator.stats[: len(COCO_STAT_NAMES)]
            for name, value in zip(COCO_STAT_NAMES, stats, strict=True):
                metrics[f"{iou_type}_{name}"] = _pct(float(value))
            if counts is not None:
                if evaluator is None:  # no detection at all: every resample scores 0, as the estimate does
                    metrics[f"{iou_type}_AP_ci"] = [metrics[f"{iou_type}_AP"]] * 2
                else:
                    samples = coco_ap_resamples(evaluator, counts)["AP"] * 100.0
                    metrics[f"{iou_type}_AP_ci"] = percentile_interval(samples, self.confidence)
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

    Each image's per-class intersection, ground-truth and prediction pixel counts are kept too (3 x classes integers
    an image), so ``compute()`` can add bootstrap intervals (``bootstrap`` resamples, 0: none; ``seed``; level
    ``confidence``): a resample's confusion statistics are a weighted sum of those rows. An image is one ``add``.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        *,
        bootstrap: int = DEFAULT_BOOTSTRAP,
        seed: int = 0,
        confidence: float = 0.95,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        if len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {num_classes} classes")
        _check_bootstrap(bootstrap, confidence)
        self.bootstrap, self.seed, self.confidence = int(bootstrap), int(seed), float(confidence)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        #: per image: (sort key, int64 (3, classes) of intersection, ground-truth and predicted pixels per class)
        self._images: list[tuple[Any, np.ndarray]] = []
        self._synced = False

    def add(self, pred: torch.Tensor, gt: torch.Tensor, key: Any = None) -> None:
        """Count label map ``pred`` against ground truth ``gt`` (same shape) as one image; ``key`` (its id) orders
        the images for the bootstrap (default: the order they were added in)."""
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
        gt = gt.long()
        valid = (gt != self.ignore_index) & (gt >= 0) & (gt < self.num_classes)
        idx = gt[valid] * self.num_classes + pred.long()[valid]
        counts = torch.bincount(idx.flatten(), minlength=self.num_classes**2)
        cm = counts.reshape(self.num_classes, self.num_classes).cpu()
        self.confusion += cm
        rows = torch.stack([cm.diag(), cm.sum(1), cm.sum(0)]).numpy()
        self._images.append((key, rows))

    @torch.no_grad()
    def update(self, predictions: torch.Tensor | Sequence[torch.Tensor], targets: Any) -> None:
        for pred, target in zip(predictions, targets, strict=True):
            gt, size = _target_label(target)
            key = _to_int(target["image_id"]) if isinstance(target, Mapping) and "image_id" in target else None
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
            self.add(labels.to(gt.device), gt, key)

    def synchronize(self) -> None:
        """Sum the confusion matrices of every process and gather their per-image counts (a no-op on one process or
        when already done)."""
        if self._synced or _world_size() == 1:
            return
        dist = torch.distributed
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        total = self.confusion.to(device)
        dist.all_reduce(total)
        self.confusion = total.cpu()
        gathered: list[Any] = [None] * _world_size()
        dist.all_gather_object(gathered, self._images)
        self._images = [item for part in gathered for item in part]  # rank order, then arrival order
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

    def compute(self) -> dict[str, Any]:
        """``mIoU``, ``mAcc`` and ``aAcc`` in percent; with ``bootstrap``, ``mIoU_ci``, ``mAcc_ci`` and ``aAcc_ci``."""
        self.synchronize()
        iou, acc = self._per_class_arrays()
        total = self.confusion.sum().item()
        metrics: dict[str, Any] = {
            "mIoU": _pct(float(np.nanmean(iou))) if np.isfinite(iou).any() else float("nan"),
            "mAcc": _pct(float(np.nanmean(acc))) if np.isfinite(acc).any() else float("nan"),
            "aAcc": _pct(self.confusion.diag().sum().item() / total) if total else float("nan"),
        }
        if self.bootstrap and self._images:
            for name, samples in self._resampled().items():
                metrics[f"{name}_ci"] = percentile_interval(samples * 100.0, self.confidence)
        return metrics

    def _resampled(self) -> dict[str, np.ndarray]:
        """mIoU, mAcc and aAcc (fractions) of each bootstrap resample of the images, from their per-image counts."""
        ordered = list(self._images)
        if all(key is not None for key, _ in ordered):  # by image id: the same order on any number of processes
            ordered.sort(key=lambda item: item[0])
        rows = np.stack([r for _, r in ordered]).astype(np.float64)  # (images, 3, classes)
        counts = bootstrap_counts(len(rows), self.bootstrap, self.seed)
        sums = (counts @ rows.reshape(len(rows), -1)).reshape(len(counts), 3, self.num_classes)
        tp, gt, pred = sums[:, 0], sums[:, 1], sums[:, 2]
        union = gt + pred - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), 0.0)
            acc = np.where(gt > 0, tp / np.maximum(gt, 1), 0.0)
            n_iou, n_acc = (union > 0).sum(1), (gt > 0).sum(1)
            pixels = gt.sum(1)
            return {
                "mIoU": np.where(n_iou > 0, iou.sum(1) / n_iou, np.nan),
                "mAcc": np.where(n_acc > 0, acc.sum(1) / n_acc, np.nan),
                "aAcc": np.where(pixels > 0, tp.sum(1) / pixels, np.nan),
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
