"""Graph rewrites that make the fused model fast on XNNPACK (ExecuTorch's CPU delegate), outputs equal to rounding.

XNNPACK runs a depthwise convolution with its depthwise micro-kernels only when the kernel has at most 25 taps
(5x5, its largest tile). A larger one, such as RapidNet's 7x7 positional encoding and FFN convs, falls back to the
grouped IGEMM path: one GEMM per channel with a single output column. ETDump of RapidNet-Ti showed each 14x14x112
7x7 depthwise conv taking about 0.75 ms that way, against 0.03 ms for a 3x3 one of the same size; the eight of them
were a quarter of the model's time. :func:`split_large_depthwise_` rewrites each such conv as column strips of at
most 25 taps (7x7 -> 7x3 + 7x3 + 7x1), each cut to the original output columns and summed: the same products,
added in another order.

These rewrites are applied by the ExecuTorch exporter and quantizer only; the network file and the other
exporters never see them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

MAX_DEPTHWISE_TAPS = 25  # XNNPACK's largest unipass depthwise tile (f32 and qs8: 25p)


class StripedDepthwiseConv2d(nn.Module):
    """A stride-1 depthwise ``nn.Conv2d`` computed as vertical strips of at most ``max_taps`` taps, summed.

    Each strip is a depthwise conv with the original padding; strip ``i`` (kernel columns ``start..``) contributes
    its output columns ``start .. start + width``. No explicit pad op: XNNPACK cannot build a quantized one.
    """

    def __init__(self, conv: nn.Conv2d, max_taps: int = MAX_DEPTHWISE_TAPS) -> None:
        super().__init__()
        kh, kw = conv.kernel_size
        self.kernel_width = kw
        self.padding_width = int(conv.padding[1])  # type: ignore[index]
        step = max(1, max_taps // kh)
        self.starts = list(range(0, kw, step))
        self.strips = nn.ModuleList()
        for i, start in enumerate(self.starts):
            stop = min(kw, start + step)
            strip = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                (kh, stop - start),
                padding=conv.padding,
                groups=conv.groups,
                bias=i == 0 and conv.bias is not None,
            )
            with torch.no_grad():
                strip.weight.copy_(conv.weight[..., start:stop])
                if strip.bias is not None:
                    strip.bias.copy_(conv.bias)
            self.strips.append(strip.to(conv.weight.device, conv.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1] + 2 * self.padding_width - self.kernel_width + 1  # the original conv's output width
        strips = [strip(x)[..., start : start + width] for start, strip in zip(self.starts, self.strips, strict=True)]
        out = strips[0]
        for y in strips[1:]:
            out = out + y
        return out


def _needs_striping(conv: nn.Module, max_taps: int) -> bool:
    if type(conv) is not nn.Conv2d or conv.groups == 1 or conv.groups != conv.in_channels:
        return False
    kh, kw = conv.kernel_size
    return (
        kh * kw > max_taps
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and kh <= max_taps
    )


def split_large_depthwise_(model: nn.Module, max_taps: int = MAX_DEPTHWISE_TAPS) -> int:
    """Replace, in place, every stride-1 depthwise conv of more than ``max_taps`` taps; returns how many."""
    replaced = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if _needs_striping(child, max_taps):
                setattr(module, name, StripedDepthwiseConv2d(child, max_taps))
                replaced += 1
    return replaced


def for_xnnpack(model: nn.Module) -> nn.Module:
    """A copy of the fused ``model`` rewritten for XNNPACK (see the module docstring); ``model`` is untouched."""
    rewritten = copy.deepcopy(model)
    split_large_depthwise_(rewritten)
    return rewritten.eval()
