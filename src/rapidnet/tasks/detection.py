"""Mask R-CNN detection and instance segmentation as an engine task (``rapidnet det train``): COCO-format data,
box and mask AP, best weights by box AP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from rapidnet.errors import ConfigError, DataError
from rapidnet.tasks._dense import _coco_split, _DenseTask

__all__ = ["DETECTION_DEFAULTS", "DetectionTask"]

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


class DetectionTask(_DenseTask):
    """Mask R-CNN + FPN on a COCO-format data set; best weights by box AP."""

    kind = "detection"
    defaults = DETECTION_DEFAULTS
    primary_metric = "bbox_AP"
    higher_is_better = True
    metric_names = {"bbox_AP": "box AP", "segm_AP": "mask AP", "bbox_AP50": "box AP50"}

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
        from rapidnet.models.mask_rcnn import mask_rcnn

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
        return model

    def make_evaluator(self) -> Any:
        from rapidnet.metrics import CocoEvaluator

        return CocoEvaluator.from_dataset(self.val_set)

    def eval_args(self) -> dict[str, Any]:
        return {"val_split": self.val_split}
