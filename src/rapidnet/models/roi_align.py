"""RoIAlign for CPU training on small feature maps: torchvision's exact result as two matrix products.

torchvision's CPU ``roi_align`` backward is a scalar, single-threaded scatter loop. On the 128-pixel mosaic it took
28% of a Mask R-CNN training step (``torch.profiler``, bfloat16 autocast, 2 threads).

With a fixed ``sampling_ratio`` RoIAlign is linear in the feature map and *separable*: a bin's value is the mean over
``g x g`` sampling points of bilinear weights, and each weight is a product of a row weight and a column weight
(torchvision's border rules, clamping into the map and zero beyond one pixel outside it, are per axis too). So for a
box ``k`` on a ``(C, H, W)`` map, ``out[k] = Ay[k] @ X @ Ax[k].T`` with ``Ay[k]`` of shape ``(PH, H)`` and ``Ax[k]``
of shape ``(PW, W)``: one matrix product per image for the rows of all its boxes, then a batched one per box for
the columns, and the backward passes are matrix products too (parallel, vectorised). The result equals
torchvision's to float rounding, gradients included (tested).

This costs about ``PH*C*H*W`` multiply-adds per box, which beats the direct loop only while maps are small, so it
runs on CPU for maps of at most ``MAX_PIXELS`` pixels (the 128-pixel mosaic's P2 has 1,024). Larger maps, other
devices, an adaptive sampling ratio, tracing and scripting use torchvision's op.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as tv_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

__all__ = ["MAX_PIXELS", "MatmulRoIAlign", "roi_align_matmul"]

#: largest feature map (H * W) that the matrix-product RoIAlign takes; above it torchvision's loop is cheaper
MAX_PIXELS = 64 * 64


def _axis_weights(start: Tensor, end: Tensor, bins: int, grid: int, size: int) -> Tensor:
    """``(K, bins, size)``: each bin's mean bilinear weight on each row (or column), torchvision's legacy rules."""
    steps = (torch.arange(bins * grid, device=start.device, dtype=start.dtype) + 0.5) / (bins * grid)
    coord = start[:, None] + (end - start).clamp(min=1.0)[:, None] * steps  # (K, bins*grid) sampling points
    inside = ((coord >= -1.0) & (coord <= size)).to(coord.dtype)
    coord = coord.clamp(min=0.0)
    low = coord.floor().clamp(max=size - 1)
    frac = torch.where(low >= size - 1, torch.zeros_like(coord), coord - low)
    low = low.long()
    high = (low + 1).clamp(max=size - 1)
    weights = coord.new_zeros((*coord.shape, size))
    weights.scatter_add_(-1, low[..., None], ((1.0 - frac) * inside)[..., None])
    weights.scatter_add_(-1, high[..., None], (frac * inside)[..., None])
    return weights.view(-1, bins, grid, size).mean(2)


def roi_align_matmul(
    features: Tensor, rois: Tensor, output_size: tuple[int, int], spatial_scale: float, sampling_ratio: int
) -> Tensor:
    """torchvision's ``roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned=False)``.

    ``rois`` is ``(K, 5)``: batch index, then x1, y1, x2, y2 in image coordinates. Computed in float32 (as
    torchvision's autocast wrapper does) and returned in ``features``' dtype.
    """
    n, c, h, w = features.shape
    ph, pw = output_size
    result = features.new_zeros((rois.shape[0], c, ph, pw))
    if rois.shape[0] == 0:
        return result
    with torch.autocast(features.device.type, enabled=False):
        boxes = rois[:, 1:].detach().float() * spatial_scale  # no gradient to the boxes, as in torchvision
        wy = _axis_weights(boxes[:, 1], boxes[:, 3], ph, sampling_ratio, h)  # (K, PH, H)
        wx = _axis_weights(boxes[:, 0], boxes[:, 2], pw, sampling_ratio, w)  # (K, PW, W)
        batch = rois[:, 0].long()
        for image in range(n):
            index = torch.where(batch == image)[0]
            k = len(index)
            if k == 0:
                continue
            x = features[image].float().permute(1, 0, 2).reshape(h, c * w)  # (H, C*W)
            rows = (wy[index].reshape(k * ph, h) @ x).view(k, ph * c, w)  # every box's rows at once
            out = torch.bmm(rows, wx[index].transpose(1, 2))  # (K, PH*C, PW)
            result = result.index_put((index,), out.view(k, ph, c, pw).permute(0, 2, 1, 3).to(result.dtype))
    return result


class MatmulRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (same level mapping, same results) with :func:`roi_align_matmul` on
    the small CPU maps it suits."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if (
            features[0].device.type != "cpu"
            or self.sampling_ratio <= 0
            or torch.jit.is_scripting()
            or torch.jit.is_tracing()
        ):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes)  # all zeros when there is one level
        result = features[0].new_zeros((len(rois), features[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(features, self.scales, strict=True)):
            index = torch.where(levels == level)[0]
            if not len(index):
                continue
            args = (feature, rois[index], self.output_size, scale, self.sampling_ratio)
            small = feature.shape[-2] * feature.shape[-1] <= MAX_PIXELS
            pooled = roi_align_matmul(*args) if small else tv_roi_align(*args, aligned=False)
            result = result.index_put((index,), pooled.to(result.dtype))
        return result
