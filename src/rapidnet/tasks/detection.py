"""Mask R-CNN detection and instance segmentation as an engine task (``rapidnet det train``): COCO-format data,
box and mask AP, best weights by box AP (on the dev split when the data has one; see ``rapidnet.tasks._dense``).

The dev evaluations score boxes only by default (``task.dev_masks``): they exist to choose ``model_best`` by box AP,
and the mask head on every detection took most of their time, time a budgeted run spends on training instead. The
validation report always scores masks too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from rapidnet.config import setting
from rapidnet.constants import MAX_SIDE, MIN_SIDE
from rapidnet.data.coco import CocoInstances
from rapidnet.errors import ConfigError, DataError
from rapidnet.metrics import CocoEvaluator
from rapidnet.models.detection import mask_rcnn
from rapidnet.tasks._dense import DenseOptions, _coco_split, _DenseTask, build_dense_eval_dataset, evaluate_dense

__all__ = ["DetectionOptions", "DetectionTask"]


@dataclass
class DetectionOptions(DenseOptions):
    """``task:`` keys of detection (None: decided from the data or the model)."""

    name: str = "detection"
    # torchvision's resize: the shorter side (a list: multi-scale training, one drawn per batch) and the longer
    # side's cap; the 1x recipe is 800 / 1333
    min_size: int | list[int] = setting(
        800, ge=MIN_SIDE, le=MAX_SIDE, nonempty=True, unit="pixels", what="a side or a non-empty list of sides"
    )
    max_size: int = setting(1333, ge=MIN_SIDE, le=MAX_SIDE, unit="pixels")
    # shorter side of evaluation images; default min_size (larger: objects read enlarged)
    test_size: int | None = setting(None, ge=MIN_SIDE, le=MAX_SIDE, unit="pixels")
    # default: train2017 when the COCO files exist, else train (the mosaic's)
    train_split: str | None = setting(None, nonempty=True, what="a split name")
    val_split: str | None = setting(None, nonempty=True, what="a split name")
    dev_masks: bool = False  # score masks in the dev evaluations too (they choose by box AP; val always has masks)


class DetectionTask(_DenseTask):
    """Mask R-CNN + FPN on a COCO-format data set; best weights by box AP."""

    kind = "detection"
    layout = "coco"
    builder = staticmethod(mask_rcnn)
    options = DetectionOptions
    opts: DetectionOptions
    primary_metric = "bbox_AP"
    higher_is_better = True
    metric_names = {"bbox_AP": "box AP", "segm_AP": "mask AP", "bbox_AP50": "box AP50"}

    def _open_data(self) -> tuple[Any, Any]:

        root = Path(self.cfg.data.path).expanduser()
        o = self.opts
        train_split = o.train_split or _coco_split(root, "train")
        self.val_split = o.val_split or _coco_split(root, "val")
        train = CocoInstances(root, train_split, train=True, hflip=o.hflip, remove_empty=True)
        val = CocoInstances(root, self.val_split, train=False)
        if list(train.classes) != list(val.classes):
            raise DataError(f"{root}: the {train_split} and {self.val_split} splits have different categories")
        n = o.num_classes
        if n is not None and n != len(train.classes):
            raise ConfigError(f"task.num_classes is {n} but {root} has {len(train.classes)} categories: leave it out")
        return train, val

    def builder_args(self) -> dict[str, Any]:
        o = self.opts
        return {"min_size": o.min_size, "max_size": o.max_size, "test_size": o.test_size}

    def _open_eval_split(self, split: str) -> Any:
        return build_dense_eval_dataset(self.kind, self.cfg.data.path, self.eval_args(), split)

    def make_evaluator(self, dataset: Any, bootstrap: int) -> Any:

        return CocoEvaluator.from_dataset(dataset, bootstrap=bootstrap)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """The selection split; on dev, boxes only unless ``task.dev_masks`` (val, when it selects, scores both)."""
        net = getattr(model, "module", model)  # DDP
        if self.dev_loader is None or self.opts.dev_masks or not hasattr(net, "boxes_only"):
            return super().evaluate(model)
        evaluator = CocoEvaluator.from_dataset(self.dev_set, ("bbox",), bootstrap=0)
        with net.boxes_only():
            return evaluate_dense(model, self.dev_loader, evaluator, self.context.device, self.context.autocast)

    def eval_args(self) -> dict[str, Any]:
        return {"val_split": self.val_split}
