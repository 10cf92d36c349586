"""Semantic FPN segmentation as an engine task (``rapidnet seg train``): ADE20K-layout data, mIoU, best weights by
mIoU (on the dev split when the data has one; see ``rapidnet.tasks._dense``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rapidnet.config import setting
from rapidnet.constants import MAX_SIDE, MIN_SIDE
from rapidnet.data.ade20k import ADE20KSegmentation
from rapidnet.metrics import SegmentationMetrics
from rapidnet.models.backbone import BN_MODES
from rapidnet.models.segmentation import semantic_fpn
from rapidnet.tasks._dense import DenseOptions, _DenseTask, build_dense_eval_dataset

__all__ = ["SegmentationOptions", "SegmentationTask"]

#: how ``scale`` and ``test_scale`` read in a message (mmsegmentation's order: the longer side first)
_LONG_SHORT = "a [long, short] pair of sides"


@dataclass
class SegmentationOptions(DenseOptions):
    """``task:`` keys of segmentation (None switches an augmentation step off, or takes the data's own value)."""

    name: str = "segmentation"
    frozen_bn: bool | str = setting(False, choices=(True, False, *BN_MODES))
    # mmsegmentation's keep-ratio rescale: fit [long, short] sides (times a ratio drawn from ratio_range)
    scale: list[int] | None = setting([2048, 512], length=2, ge=MIN_SIDE, le=MAX_SIDE, unit="pixels", what=_LONG_SHORT)
    # evaluation resize; default: scale (a larger one can suit a model trained on enlarged crops)
    test_scale: list[int] | None = setting(None, length=2, ge=MIN_SIDE, le=MAX_SIDE, unit="pixels", what=_LONG_SHORT)
    ratio_range: list[float] | None = setting([0.5, 2.0], length=2, gt=0.0, le=10.0)
    crop_size: list[int] | None = setting(
        [512, 512], length=2, ge=MIN_SIDE, le=MAX_SIDE, unit="pixels", what="a [height, width] pair"
    )
    # a crop is redrawn (10 tries) while one class fills more than this fraction of it; 1 or null: never
    cat_max_ratio: float | None = setting(0.75, gt=0.0, le=1.0)
    photometric: bool = True
    reduce_zero_label: bool | None = None  # default: the data set's meta.json, else True (ADE20K)


class SegmentationTask(_DenseTask):
    """Semantic FPN on an ADE20K-layout data set; best weights by mIoU."""

    kind = "segmentation"
    layout = "ade20k"
    builder = staticmethod(semantic_fpn)
    options = SegmentationOptions
    opts: SegmentationOptions
    primary_metric = "mIoU"
    higher_is_better = True
    metric_names = {"mIoU": "mIoU", "mAcc": "mAcc", "aAcc": "aAcc"}

    def _open_data(self) -> tuple[Any, Any]:

        o = self.opts
        common = dict(num_classes=o.num_classes, reduce_zero_label=o.reduce_zero_label)
        train = ADE20KSegmentation(
            self.cfg.data.path,
            "training",
            train=True,
            scale=o.scale,
            ratio_range=o.ratio_range,
            crop_size=o.crop_size,
            cat_max_ratio=o.cat_max_ratio,
            hflip=o.hflip,
            photometric=o.photometric,
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
        return self.opts.test_scale if self.opts.test_scale is not None else self.opts.scale

    def eval_args(self) -> dict[str, Any]:
        scale = self._test_scale()
        return {"num_classes": len(self.classes), "reduce_zero_label": self.reduce_zero_label, "scale": scale}
