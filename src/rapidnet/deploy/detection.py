"""Mask R-CNN as an exported file: the graph a detection run exports (:class:`DetectorGraph`) and the host-side
wrapper that feeds a file the way the PyTorch model is fed (:class:`ExportedDetector`), so that ``rapidnet det eval``
and ``det predict`` run an ``.onnx`` or ``.xml`` file as they run the checkpoint.

The graph takes one normalised image, zero-padded at the bottom and right to the file's fixed size
``(1, 3, H, W)``, and returns fixed-size outputs for it: the ``D`` best detections (``D`` = the run's
``box_detections_per_img``) as ``boxes (1, D, 4)`` (x1, y1, x2, y2 in the padded input's pixels), ``scores (1, D)``,
``labels (1, D)`` (int64, 1..K) and ``masks (1, D, 28, 28)`` (the mask head's probabilities for each detection's
class, in its box). Slots without a detection are zeros (score 0), so a runtime's tie-breaking among them cannot
show. Inside: backbone, FPN, RPN (anchors are a constant of the file's size, per-level top-n, box decoding, clipping,
NMS per level), the multi-scale RoIAlign, box head (class scores, per-class box decoding, score threshold, NMS per
class, top ``D``) and mask head. It is torchvision's eval path with each data-dependent step turned into masks over
fixed-size tensors, except torchvision's ``nms`` and the RoIAlign level split (ONNX ``NonMaxSuppression`` and
``RoiAlign``; OpenVINO's ``NMS`` and ``ROIAlign``), whose results are turned back into fixed sizes at once. So both
exporters take the graph as it is, and ``rapidnet export`` checks the files against PyTorch output by output.
ExecuTorch and LiteRT have no kernels for torchvision's ``nms`` and ``roi_align`` and refuse it.

One difference is deliberate: the box head sends only its ``NMS_CANDIDATES`` best class-box pairs to NMS
(torchvision sends every pair above the score threshold). Survival in greedy NMS depends only on higher-scoring
boxes, so the result differs only when fewer than ``D`` of those candidates survive, and then only below the lowest
candidate's score.

What stays on the host (:class:`ExportedDetector`) is what torchvision's ``GeneralizedRCNNTransform`` does around
the network, by the run's own transform (:class:`~rapidnet.models.detection.TestSizeTransform`, rebuilt from the
file's metadata): normalise, resize to the run's test size, pad; then drop the empty slots, scale boxes back to the
image and paste each mask into a full-size ``(N, 1, H, W)`` probability map (``paste_masks_in_image``, data-dependent
per box and cheap). An image the PyTorch model would not pad (the mosaic's: a square at the test size, divisible by
32) gives the checkpoint's detections. A smaller image is padded further than PyTorch pads it (which the features at
its bottom and right border see) and its boxes are clipped to the file's size inside the graph, to its own on the
host, so detections there may differ slightly: export at the size of the data's images where they all have one
(the default is a square that holds any image the run's resize makes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops
from torchvision.ops import roi_align
from torchvision.ops.poolers import LevelMapper, _setup_scales

from rapidnet.deploy.common import ExportedModel, Runner, check_resolution
from rapidnet.errors import ConfigError, DataError

DETECTION = "detection"
#: the box head's class-box pairs that go to NMS, at least (see the module docstring)
NMS_CANDIDATES = 1000
_INVALID = -1.0  # the score of a masked-out box: below every probability, so it never suppresses a real one


def default_resolution(model: nn.Module) -> tuple[int, int]:
    """A square that holds every image the run's transform makes: the longer side's cap, rounded up to the size
    divisor (the mosaic's 64/64 run: 64x64; COCO's 800/1333: 1344x1344, where a tighter --resolution pays)."""
    t = model.transform
    short = int(t.test_size or t.min_size[-1])
    long = round(t.max_size * short / t.min_size[-1])
    side = max(short, long)
    step = int(t.size_divisible)
    return (-(-side // step) * step,) * 2  # type: ignore[return-value]


class _Pooler:
    """torchvision's ``MultiScaleRoIAlign`` for one image of a fixed size: the level of each box from its area, then
    ``roi_align`` of each level's boxes on that level's map (ONNX ``RoiAlign``, data-dependent count, scattered back
    into a fixed-size result at once)."""

    def __init__(self, pool: nn.Module, features: Sequence[Tensor], size: tuple[int, int]) -> None:
        self.output_size = tuple(pool.output_size)
        self.sampling_ratio = int(pool.sampling_ratio)
        self.scales, mapper = _setup_scales(list(features), [size], pool.canonical_scale, pool.canonical_level)
        self.mapper: LevelMapper = mapper
        self.names = list(pool.featmap_names)

    def __call__(self, features: Mapping[str, Tensor], boxes: Tensor) -> Tensor:
        maps = [features[n] for n in self.names]
        levels = self.mapper([boxes])
        rois = torch.cat([torch.zeros_like(boxes[:, :1]), boxes], dim=1)
        pooled = []
        for level, (feature, scale) in enumerate(zip(maps, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            _at_most(index, boxes.shape[0])
            pooled.append(roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio, aligned=False))
        # box k's row in the level-by-level concatenation, from counts: a gather back to the boxes' order (a
        # scatter of the pooled maps is several times slower in onnxruntime)
        onehot = (levels[:, None] == torch.arange(len(maps))[None]).long()
        counts = onehot.sum(0)
        row = (counts.cumsum(0) - counts)[levels] + (onehot.cumsum(0) - 1).gather(1, levels[:, None])[:, 0]
        return torch.cat(pooled)[row]


def _at_most(index: Tensor, n: int) -> None:
    """Tell ``torch.export`` that a data-dependent count is at most ``n`` (a bound its memory planners need;
    TorchScript tracing, OpenVINO's route, sees plain numbers)."""
    if not torch.jit.is_tracing():
        torch._check(index.shape[0] <= n)


def _keep_mask(keep: Tensor, n: int, like: Tensor) -> Tensor:
    """NMS's kept indices (data-dependent count) as a fixed-size boolean mask over its ``n`` inputs."""
    _at_most(keep, n)
    return torch.zeros(n, dtype=like.dtype).scatter(0, keep, torch.ones_like(keep, dtype=like.dtype)) > 0


class DetectorGraph(nn.Module):
    """The part of a Mask R-CNN that is exported: one normalised, padded image in, its best ``D`` detections out
    (see the module docstring)."""

    export_output_names = ("boxes", "scores", "labels", "masks")

    def __init__(self, model: nn.Module, resolution: Sequence[int]) -> None:
        super().__init__()
        h, w = check_resolution(resolution)
        step = int(model.transform.size_divisible)
        if h % step or w % step:
            raise ConfigError(
                f"a Mask R-CNN file takes sizes divisible by {step}: {h}x{w} is not (e.g. "
                f"{-(-h // step) * step}x{-(-w // step) * step})"
            )
        self.size = (h, w)
        rpn, heads = model.rpn, model.roi_heads
        if heads.mask_roi_pool is None:
            raise ConfigError("this Mask R-CNN has no mask head: export a model built with one")
        self.backbone, self.rpn_head = model.backbone, rpn.head
        self.box_head, self.box_predictor = heads.box_head, heads.box_predictor
        self.mask_head, self.mask_predictor = heads.mask_head, heads.mask_predictor
        self.rpn_coder, self.box_coder = rpn.box_coder, heads.box_coder
        self.pre_nms_top_n = int(rpn._pre_nms_top_n["testing"])
        self.post_nms_top_n = int(rpn._post_nms_top_n["testing"])
        self.rpn_nms, self.rpn_min_size = float(rpn.nms_thresh), float(rpn.min_size)
        self.rpn_score = float(rpn.score_thresh)
        self.box_score, self.box_nms = float(heads.score_thresh), float(heads.nms_thresh)
        self.detections = int(heads.detections_per_img)
        with torch.no_grad():
            was = model.backbone.training
            model.backbone.eval()
            features = model.backbone(torch.zeros(1, 3, h, w))
            model.backbone.train(was)
            maps = list(features.values())
            anchors = rpn.anchor_generator(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), maps)[0]
        self.register_buffer("anchors", anchors.float(), persistent=False)
        self.box_pool = _Pooler(heads.box_roi_pool, [features[n] for n in heads.box_roi_pool.featmap_names], (h, w))
        self.mask_pool = _Pooler(heads.mask_roi_pool, [features[n] for n in heads.mask_roi_pool.featmap_names], (h, w))
        mean = [float(v) for v in model.transform.image_mean]
        std = [float(v) for v in model.transform.image_std]
        # what the verbs read as the file's preprocessing (timm's resolve_data_config reads pretrained_cfg)
        self.pretrained_cfg = {
            "input_size": (3, h, w),
            "mean": tuple(mean),
            "std": tuple(std),
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
        }

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if x.shape[0] != 1 or tuple(x.shape[-2:]) != self.size:
            raise ConfigError(
                f"a Mask R-CNN file runs one {self.size[0]}x{self.size[1]} image at a time, got {list(x.shape)}: "
                "export without --dynamic-batch"
            )
        features = self.backbone(x)
        proposals, valid = self._proposals(list(features.values()))
        boxes, scores, labels = self._detect(features, proposals, valid)
        masks = self._masks(features, boxes, labels)
        return boxes[None], scores[None], labels[None], masks[None]

    def _proposals(self, maps: list[Tensor]) -> tuple[Tensor, Tensor]:
        """The RPN's ``post_nms_top_n`` best proposals (fixed count) and which of them torchvision would keep."""
        objectness, deltas = self.rpn_head(maps)
        counts = [int(o[0].numel()) for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        decoded = self.rpn_coder.decode(deltas.detach(), [self.anchors]).view(-1, 4)
        objectness = objectness.view(-1)
        index, levels, start = [], [], 0
        for level, n in enumerate(counts):  # the top-n of each level, as torchvision's _get_top_n_idx
            top = objectness[start : start + n].topk(min(self.pre_nms_top_n, n)).indices + start
            index.append(top)
            levels.append(torch.full_like(top, level))
            start += n
        index, level_of = torch.cat(index), torch.cat(levels)
        boxes = box_ops.clip_boxes_to_image(decoded[index], self.size)
        scores = objectness[index].sigmoid()
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = (widths >= self.rpn_min_size) & (heights >= self.rpn_min_size) & (scores >= self.rpn_score)
        ranked = torch.where(ok, scores, torch.full_like(scores, _INVALID))
        keep = box_ops._batched_nms_coordinate_trick(boxes, ranked, level_of, self.rpn_nms)
        ranked = torch.where(_keep_mask(keep, len(index), ranked) & ok, ranked, torch.full_like(ranked, _INVALID))
        top = ranked.topk(min(self.post_nms_top_n, len(index)))
        return boxes[top.indices], top.values > _INVALID

    def _detect(
        self, features: Mapping[str, Tensor], proposals: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The box head and torchvision's ``postprocess_detections`` at fixed sizes: ``D`` boxes, scores (0: none),
        labels."""
        x = self.box_head(self.box_pool(features, proposals))
        class_logits, regression = self.box_predictor(x)
        n, classes = class_logits.shape
        boxes = box_ops.clip_boxes_to_image(self.box_coder.decode(regression, [proposals]), self.size)
        scores = F.softmax(class_logits, -1)
        labels = torch.arange(classes).view(1, -1).expand(n, classes)
        boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ok = valid[:, None].expand(n, classes - 1).reshape(-1) & (scores > self.box_score)
        ok = ok & (widths >= 1e-2) & (heights >= 1e-2)
        ranked = torch.where(ok, scores, torch.full_like(scores, _INVALID))
        top = ranked.topk(min(len(ranked), max(NMS_CANDIDATES, 10 * self.detections)))
        boxes, labels, ranked = boxes[top.indices], labels[top.indices], top.values
        keep = box_ops._batched_nms_coordinate_trick(boxes, ranked, labels, self.box_nms)
        kept = _keep_mask(keep, len(ranked), ranked) & (ranked > _INVALID)
        ranked = torch.where(kept, ranked, torch.full_like(ranked, _INVALID))
        top = ranked.topk(min(self.detections, len(ranked)))
        found = top.values > _INVALID
        # empty slots are all zeros: which masked-out box fills one depends on how a runtime breaks ties
        boxes = torch.where(found[:, None], boxes[top.indices], torch.zeros_like(boxes[top.indices]))
        scores = torch.where(found, top.values, torch.zeros_like(top.values))
        return boxes, scores, torch.where(found, labels[top.indices], torch.zeros_like(labels[top.indices]))

    def _masks(self, features: Mapping[str, Tensor], boxes: Tensor, labels: Tensor) -> Tensor:
        """The mask head's probabilities for each detection's class: ``(D, 28, 28)``."""
        logits = self.mask_predictor(self.mask_head(self.mask_pool(features, boxes)))
        probs = logits.sigmoid()[torch.arange(len(labels)), labels]
        return torch.where((labels > 0)[:, None, None], probs, torch.zeros_like(probs))


def detector_metadata(model: nn.Module, checkpoint_meta: Mapping[str, Any], graph: DetectorGraph) -> dict[str, Any]:
    """The fields a detection file carries beyond the preprocessing: task, classes, evaluation settings, the run's
    resize (what :class:`ExportedDetector` rebuilds its transform from)."""
    t = model.transform
    return {
        "task": DETECTION,
        "class_names": [str(n) for n in checkpoint_meta.get("class_names", [])],
        "eval_args": dict(checkpoint_meta.get("eval_args") or {}),
        "num_classes": int(model.roi_heads.box_predictor.cls_score.out_features) - 1,
        "transform": {
            "min_size": [int(s) for s in t.min_size],
            "max_size": int(t.max_size),
            "test_size": None if t.test_size is None else int(t.test_size),
            "size_divisible": int(t.size_divisible),
        },
        "max_detections": graph.detections,
    }


def detector_export(
    model: nn.Module, checkpoint_meta: Mapping[str, Any], resolution: Sequence[int] | None
) -> tuple[DetectorGraph, dict[str, Any]]:
    """``(graph, extra metadata)`` of a Mask R-CNN run for ``rapidnet export`` (resolution default:
    :func:`default_resolution`)."""
    graph = DetectorGraph(model.eval(), resolution or default_resolution(model))
    return graph, detector_metadata(model, checkpoint_meta, graph)


class ExportedDetector(nn.Module):
    """An exported Mask R-CNN behind the PyTorch model's call: a list of images (``(3, H, W)`` floats in [0, 1]) in,
    one dict per image out (torchvision's: ``boxes`` x1y1x2y2 float, ``labels`` int64, ``scores``, ``masks``
    ``(N, 1, H, W)`` probabilities at the image's size). ``transform`` is the run's, so ``det eval --size`` works."""

    def __init__(self, runner: Runner) -> None:
        super().__init__()
        from rapidnet.models.detection import TestSizeTransform

        self.file = ExportedModel(runner)
        meta = runner.metadata
        if meta.get("task") != DETECTION:
            raise ConfigError(f"{runner.path} is not a detection model: use the command of its task for it")
        t = meta.get("transform")
        if not isinstance(t, dict) or not {"min_size", "max_size"} <= set(t):
            raise ConfigError(f"{runner.path} carries no resize settings: re-export it with rapidnet export")
        cfg = self.file.pretrained_cfg
        self.transform = TestSizeTransform(
            tuple(int(s) for s in t["min_size"]), int(t["max_size"]), list(cfg["mean"]), list(cfg["std"]),
            int(t.get("size_divisible", 32)), test_size=t.get("test_size"),
        ).eval()  # fmt: skip
        self.num_classes = int(meta.get("num_classes") or 0)

    def train(self, mode: bool = True) -> ExportedDetector:
        """A file only infers: the transform stays in eval mode (in train mode it would pick a random size and skip
        the post-processing)."""
        super().train(mode)
        self.transform.eval()
        return self

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor]) -> list[dict[str, Tensor]]:
        h, w = self.file.fixed_size
        results = []
        for image in images:
            device = image.device
            image = image.detach().float().cpu()
            original = (int(image.shape[-2]), int(image.shape[-1]))
            resized, _ = self.transform.resize(self.transform.normalize(image), None)
            ih, iw = resized.shape[-2:]
            if ih > h or iw > w:
                raise DataError(
                    f"an image of {ih}x{iw} after resizing does not fit the file's {h}x{w}: export at a size "
                    "that holds the test size (rapidnet export --resolution H W)"
                )
            batch = torch.zeros(1, 3, h, w)
            batch[0, :, :ih, :iw] = resized
            boxes, scores, labels, masks = (o[0] for o in self.file(batch))
            found = scores > 0
            out = {
                "boxes": box_ops.clip_boxes_to_image(boxes[found].float(), (ih, iw)),
                "scores": scores[found].float(),
                "labels": labels[found].long(),
                "masks": masks[found].float()[:, None],
            }
            result = self.transform.postprocess([out], [(ih, iw)], [original])[0]
            results.append({k: v.to(device) for k, v in result.items()})
        return results
