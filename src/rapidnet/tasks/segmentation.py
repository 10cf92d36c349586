"""Semantic FPN segmentation as an engine task (``rapidnet seg train``): ADE20K-layout data, mIoU, best weights by
mIoU (on the dev split when the data has one; see ``rapidnet.tasks._dense``)."""

from __future__ import annotations

from typing import Any

from rapidnet.data.ade20k import ADE20KSegmentation
from rapidnet.metrics import SegmentationMetrics
from rapidnet.models.semantic_fpn import semantic_fpn
from rapidnet.tasks._dense import _DenseTask, build_dense_eval_dataset

__all__ = ["SEGMENTATION_DEFAULTS", "SegmentationTask"]

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
    "select_on": None,  # the split that chooses model_best: dev / val; default dev when the data has one
    "bootstrap": 1000,  # resamples of the images for the reported 95% intervals (0: none)
    "model_kwargs": {},  # more semantic_fpn() arguments: head_channels, head_norm, dropout ...
}


class SegmentationTask(_DenseTask):
    """Semantic FPN on an ADE20K-layout data set; best weights by mIoU."""

    kind = "segmentation"
    layout = "ade20k"
    builder = staticmethod(semantic_fpn)
    defaults = SEGMENTATION_DEFAULTS
    primary_metric = "mIoU"
    higher_is_better = True
    metric_names = {"mIoU": "mIoU", "mAcc": "mAcc", "aAcc": "aAcc"}

    def _open_data(self) -> tuple[Any, Any]:

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
        self._eval_dataset_args = {**common, "scale": self._test_scale()}
        val = build_dense_eval_dataset(self.kind, self.cfg.data.path, self._eval_dataset_args)
        self.reduce_zero_label = train.reduce_zero_label
        self.ignore_index = train.ignore_index
        return train, val

    def _open_eval_split(self, split: str) -> Any:
        return build_dense_eval_dataset(self.kind, self.cfg.data.path, self._eval_dataset_args, split)

    def builder_args(self) -> dict[str, Any]:
        return {"ignore_index": self.ignore_index}

    def make_evaluator(self, dataset: Any, bootstrap: int) -> Any:

        return SegmentationMetrics(len(self.classes), self.ignore_index, self.classes, bootstrap=bootstrap)

    def _test_scale(self) -> Any:
        return self.opts["test_scale"] if self.opts["test_scale"] is not None else self.opts["scale"]

    def eval_args(self) -> dict[str, Any]:
        scale = self._test_scale()
        return {"num_classes": len(self.classes), "reduce_zero_label": self.reduce_zero_label, "scale": scale}
