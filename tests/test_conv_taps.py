"""The training-time conv that skips padding-only taps: same outputs and gradients, nothing reaches a traced graph."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import rapidnet
from rapidnet.engine.conv_taps import PaddingTapsTrimmedConv2d, kept_radius, trim_padding_taps_, untrim_padding_taps_


@pytest.mark.parametrize(
    "kernel, dilation, groups, size",
    [(3, 2, 1, 1), (3, 3, 1, 2), (3, 2, 1, 3), (7, 1, 8, 1), (7, 1, 8, 2), (7, 1, 8, 5), (3, 3, 2, 4), (5, 2, 1, 3),
     # depthwise windows wider than the map (padded first), then a dense one (the conv pads)
     (3, 1, 8, 2), (5, 1, 8, 3), (3, 2, 8, 4), (3, 1, 1, 2)],
)  # fmt: skip
def test_trimmed_conv_matches_the_full_conv_in_values_and_gradients(kernel, dilation, groups, size):
    torch.manual_seed(kernel * 100 + dilation * 10 + size)
    full = nn.Conv2d(8, 8, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, groups=groups)
    trimmed = copy.deepcopy(full)
    assert trim_padding_taps_(trimmed) == 1 and isinstance(trimmed, PaddingTapsTrimmedConv2d)
    x = torch.randn(3, 8, size, size + 1, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = full(x), trimmed(x2)
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed.weight.grad, full.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trimmed.bias.grad, full.bias.grad, rtol=1e-5, atol=1e-5)
    assert trimmed.state_dict().keys() == full.state_dict().keys()


@pytest.mark.parametrize("groups, size, pads_first", [(8, 2, True), (8, 4, False), (1, 2, False), (2, 2, False)])
def test_only_depthwise_convs_on_maps_narrower_than_their_window_are_padded_first(
    monkeypatch, groups, size, pads_first
):
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=groups)
    trim_padding_taps_(conv)
    paddings = []
    real_conv2d = torch.nn.functional.conv2d

    def recording_conv2d(x, weight, bias=None, stride=1, padding=0, *rest):
        paddings.append((tuple(x.shape[-2:]), padding))
        return real_conv2d(x, weight, bias, stride, padding, *rest)

    monkeypatch.setattr(torch.nn.functional, "conv2d", recording_conv2d)
    y = conv(torch.randn(2, 8, size, size))
    assert y.shape[-2:] == (size, size)
    if pads_first:  # oneDNN's slow backward for a depthwise window wider than its input is avoided
        assert paddings == [((size + 2, size + 2), (0, 0))]
    else:
        assert paddings == [((size, size), (1, 1))]  # the conv pads the map itself


def test_kept_radius_is_the_taps_that_overlap_the_map():
    assert kept_radius(1, 3, 2) == 0  # a 1x1 map: only the centre
    assert kept_radius(2, 3, 2) == 0  # offsets +-2 miss a 2-pixel map
    assert kept_radius(3, 3, 2) == 1
    assert kept_radius(2, 7, 1) == 1
    assert kept_radius(100, 7, 1) == 3


def test_only_same_padded_stride_one_convs_are_swapped():
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1),  # yes
        nn.Conv2d(4, 4, 3, stride=2, padding=1),  # stride 2: no
        nn.Conv2d(4, 4, 3, padding=0),  # not "same": no
        nn.Conv2d(4, 4, 1),  # nothing to skip: no
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),  # padding that is not zero: no
        nn.Conv2d(4, 4, 3, padding="same"),  # string padding: no
    )
    assert trim_padding_taps_(model) == 1
    assert [type(m) is PaddingTapsTrimmedConv2d for m in model] == [True, False, False, False, False, False]
    untrim_padding_taps_(model)
    assert all(type(m) is nn.Conv2d for m in model)


def test_tools_that_record_the_graph_see_the_full_conv():
    model = rapidnet.create_model("rapidnet_ti", num_classes=10).eval()
    reference = copy.deepcopy(model)
    assert trim_padding_taps_(model) > 0
    x = torch.randn(1, 3, 32, 32)  # stages 2-3 run on 2x2 and 1x1 maps: the trimmed path is taken in eager mode
    torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    traced = torch.jit.trace(model, x)
    big = torch.randn(1, 3, 96, 96)  # a graph traced at 32x32 must still be right at another size
    torch.testing.assert_close(traced(big), reference(big), rtol=1e-4, atol=1e-5)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(big), reference(big), rtol=1e-4, atol=1e-5)
    with FlopCounterMode(display=False) as trimmed_count:
        model(x)
    with FlopCounterMode(display=False) as full_count:
        reference(x)
    assert trimmed_count.get_total_flops() == full_count.get_total_flops()
