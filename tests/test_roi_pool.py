"""The matrix-product RoIAlign gives torchvision's results and gradients, border cases included."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from conftest import MICRO
from rapidnet.models import roi_align as roi_pool
from rapidnet.models.detection import mask_rcnn
from rapidnet.models.roi_align import MatmulRoIAlign, roi_align_matmul


def _rois(image_count: int, count: int, extent: float, seed: int) -> torch.Tensor:
    """Random boxes over an ``extent``-pixel image, in shuffled image order, plus border cases."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(count, 2, generator=g) * extent * 0.8
    wh = torch.rand(count, 2, generator=g) * extent * 0.5 + 0.05
    batch = torch.randint(0, image_count, (count, 1), generator=g).float()
    rois = torch.cat([batch, xy, xy + wh], 1)
    special = torch.tensor(
        [
            [0, 0.0, 0.0, extent, extent],  # the whole image
            [0, extent - 0.3, extent - 0.3, extent, extent],  # under a pixel, at the far corner
            [image_count - 1, 0.0, extent - 0.2, 0.4, extent + 3.0],  # past the edge: torchvision's zero rule
        ]
    )
    return torch.cat([rois, special])


@pytest.mark.parametrize(
    ("shape", "scale", "output_size", "sampling"),
    [
        ((3, 16, 32, 32), 0.25, (7, 7), 2),
        ((2, 8, 8, 6), 1 / 16, (14, 14), 2),
        ((2, 4, 1, 5), 1 / 32, (7, 7), 3),
        ((1, 4, 9, 9), 0.5, (5, 3), 1),
    ],
)
def test_matches_torchvision_forward_and_backward(shape, scale, output_size, sampling):
    features = torch.randn(*shape, dtype=torch.float64).float().requires_grad_()
    rois = _rois(shape[0], 24, shape[-1] / scale, seed=sum(shape))
    ours = roi_align_matmul(features, rois, output_size, scale, sampling)
    theirs = roi_align(features, rois, output_size, scale, sampling, aligned=False)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(theirs)
    (ours_grad,) = torch.autograd.grad(ours, features, grad_out)
    (theirs_grad,) = torch.autograd.grad(theirs, features, grad_out)
    torch.testing.assert_close(ours_grad, theirs_grad, atol=1e-4, rtol=1e-5)


def test_no_boxes_gives_an_empty_result():
    out = roi_align_matmul(torch.randn(2, 3, 8, 8), torch.zeros(0, 5), (7, 7), 0.5, 2)
    assert out.shape == (0, 3, 7, 7)


def test_multiscale_pooler_matches_torchvision_and_falls_back_on_large_maps(monkeypatch):
    monkeypatch.setattr(roi_pool, "MAX_PIXELS", 16 * 16)  # P2 (32x32) takes torchvision's loop, P3..P5 the products
    calls = []
    original = roi_pool.roi_align_matmul
    monkeypatch.setattr(roi_pool, "roi_align_matmul", lambda *a: calls.append(a[0].shape) or original(*a))
    torch.manual_seed(0)
    feats = OrderedDict((str(i), torch.randn(2, 8, 32 >> i, 32 >> i, requires_grad=True)) for i in range(4))
    boxes = [_rois(1, 20, 128, seed=s)[:, 1:] for s in (1, 2)]
    sizes = [(128, 128), (128, 128)]
    ours = MatmulRoIAlign(list(feats), 7, 2, canonical_scale=32)(feats, boxes, sizes)
    theirs = MultiScaleRoIAlign(list(feats), 7, 2, canonical_scale=32)(feats, boxes, sizes)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    grads = [torch.autograd.grad(out.square().sum(), list(feats.values())) for out in (ours, theirs)]
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert calls and all(s[-2] * s[-1] <= 16 * 16 for s in calls)  # the product path ran, never on P2


def test_autocast_output_dtype_follows_the_features():
    feats = OrderedDict((str(i), torch.randn(1, 4, 16 >> i, 16 >> i)) for i in range(4))
    boxes = [torch.tensor([[2.0, 3.0, 40.0, 50.0], [0.0, 0.0, 8.0, 8.0]])]
    pool = MatmulRoIAlign(list(feats), 7, 2)
    reference = MultiScaleRoIAlign(list(feats), 7, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = {k: v.bfloat16() for k, v in feats.items()}
        ours, theirs = pool(low, boxes, [(64, 64)]), reference(low, boxes, [(64, 64)])
    assert ours.dtype == theirs.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), theirs.float())


def test_mask_rcnn_uses_it_for_both_heads():
    model = mask_rcnn("rapidnet_ti", num_classes=2, min_size=64, max_size=64, backbone_kwargs=MICRO)
    assert isinstance(model.roi_heads.box_roi_pool, MatmulRoIAlign)
    assert isinstance(model.roi_heads.mask_roi_pool, MatmulRoIAlign)
    assert model.roi_heads.mask_roi_pool.output_size == (14, 14)
