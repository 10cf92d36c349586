"""Eager CPU training: skip the kernel taps of a convolution that can only ever multiply zero padding.

At the small inputs people train on CPUs (the Fashion-MNIST demo: 32x32), RapidNet's last stages run on 2x2 and 1x1
maps. A "same"-padded conv with dilation ``d`` and kernel ``K`` there reads mostly padding: on a 1x1 map every tap
but the centre multiplies zeros, yet PyTorch computes (and differentiates) all ``K x K`` of them. Profiling the demo's
training step on the 2-core Intel Xeon (``benchmarks/train_step_profile.py``) put ``convolution_backward`` at 48% of
the step, and most of it in the dense dilated 3x3s of stages 2-3 and the 7x7 depthwise convs on 1x1 maps: 13-15 ms
each for a 224-channel dilated 3x3 on a 1x1 map, 1.8 ms as the 1x1 conv it really is.

:func:`trim_padding_taps_` gives every stride-1, zero-"same"-padded ``nn.Conv2d`` of a model a forward that keeps
only the taps whose input window overlaps the map (``|k - c| * d < H`` per axis, ``c`` the centre) and pads by what
the kept taps need. The skipped taps multiply zeros only, so outputs and gradients are those of the full conv up to
float rounding (the skipped weights get exactly zero gradient, as they would). Where a depthwise conv's kept window
is still wider than the map (a 3x3 on a 2x2 map), the map is zero-padded before the conv, which then pads nothing:
oneDNN's backward pass of a depthwise conv whose window is wider than its input is slow. On the 2-core AVX2 AMD
EPYC (batch 128, channels_last, forward and backward) a 448-channel depthwise 3x3 on a 2x2 map took 30.7 ms and
6.8 ms padded first, a 7x7 on a 4x4 map 50.4 and 22.9 ms; six such convs held 43% of the demo step's conv backward
time, and the whole step ran 1.52x faster (``benchmarks/train_step_profile.py``, settings ``-trim`` against
``-trim-nopad``). Dense convs got slower padded first (20.2 against 27.7 ms for a 224-channel 3x3 on a 2x2 map), so
they keep the conv's own padding.

Weights, their keys and the state dict are untouched. Wherever a tool records the graph (``torch.jit``, ``torch.fx``,
``torch.compile``/``export``, ONNX export, a dispatch mode such as ``FlopCounterMode``) or the tensor is not on the
CPU, the conv runs in full, so nothing size-dependent reaches a traced or exported graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

__all__ = ["PaddingTapsTrimmedConv2d", "kept_radius", "trim_padding_taps_", "untrim_padding_taps_"]


def kept_radius(size: int, kernel: int, dilation: int) -> int:
    """Taps either side of the centre that can overlap a map of ``size`` pixels ("same" padding, stride 1)."""
    centre = (kernel - 1) // 2
    return min(centre, (size - 1) // dilation)


def _records_graph(x: torch.Tensor) -> bool:
    return (  # the tracers first: under torch.fx, ``x.device`` is a proxy that cannot decide a branch
        is_fx_symbolic_tracing()
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or is_in_torch_dispatch_mode()
        or x.device.type != "cpu"
    )


class PaddingTapsTrimmedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same weights, same state dict) that skips taps which only ever see zero padding."""

    #: zero-pad a map narrower than a depthwise conv's kept window before the conv (False: the conv pads, slower)
    pad_narrow_depthwise: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _records_graph(x):
            return super().forward(x)
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        h, w = x.shape[-2:]
        rh, rw = kept_radius(h, kh, dh), kept_radius(w, kw, dw)
        ch, cw = (kh - 1) // 2, (kw - 1) // 2
        ph, pw = rh * dh, rw * dw
        depthwise = self.groups == self.in_channels > 1
        pad_first = self.pad_narrow_depthwise and depthwise and (h <= 2 * ph or w <= 2 * pw)  # window wider than map
        if rh == ch and rw == cw and not pad_first:
            return super().forward(x)
        weight = self.weight[:, :, ch - rh : ch + rh + 1, cw - rw : cw + rw + 1]
        if pad_first:
            x, ph, pw = F.pad(x, (pw, pw, ph, ph)), 0, 0
        return F.conv2d(x, weight, self.bias, 1, (ph, pw), self.dilation, self.groups)


def _trimmable(conv: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or conv.stride != (1, 1):
        return False
    if not isinstance(conv.padding, tuple):  # padding="same"/"valid" strings
        return False
    return (
        all(
            k % 2 == 1 and p == d * (k - 1) // 2
            for k, p, d in zip(conv.kernel_size, conv.padding, conv.dilation, strict=True)
        )
        and max(conv.kernel_size) > 1
    )


def trim_padding_taps_(model: nn.Module) -> int:
    """Swap the class of every trimmable conv in ``model`` (in place); returns how many were swapped."""
    count = 0
    for module in model.modules():
        if _trimmable(module):
            module.__class__ = PaddingTapsTrimmedConv2d
            count += 1
    return count


def untrim_padding_taps_(model: nn.Module) -> nn.Module:
    """Undo :func:`trim_padding_taps_` (in place), e.g. before scripting or pickling the module itself."""
    for module in model.modules():
        if type(module) is PaddingTapsTrimmedConv2d:
            module.__class__ = nn.Conv2d
    return model
