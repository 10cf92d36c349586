"""The effective receptive field (ERF, Luo et al., NeurIPS 2016) of each stage, measured as RepLKNet does (Ding et al.,
CVPR 2022, "Scaling Up Your Kernels to 31x31", their ``erf/`` scripts).

For a stage's output map ``f = features(x)`` (N, C, h, w) the scalar is the rectified centre of the map summed over
channels, ``relu(f[:, :, h//2, w//2]).sum()``; its gradient with respect to the input, in absolute value and summed
over the input channels and over N images, is the ERF map (:func:`input_gradient_map`). Two numbers summarise a map
(:func:`erf_fractions`): the side of the smallest square, centred where the map's mass is, that holds a fraction
``t`` of the map's total, as a fraction of the input side (``t20``, ``t50``, ``t90``, ``t99``). Beside it, the
theoretical receptive field (:func:`theoretical_rf`): the side of the box of input pixels that can affect the centre
output at all, so that the ERF can be read against the RF it could have; found by arithmetic over the graph that
torch.fx traces, with a gradient probe for the networks that arithmetic cannot follow (:func:`receptive_field`).

Differences from RepLKNet's scripts, on purpose: the gradient is taken in absolute value (RepLKNet rectifies it, so
negative contributions vanish from its maps), and the squares are measured on the raw map (RepLKNet measures them
on ``log10(map + 1)``, which depends on the map's scale), centred on the map's centre of mass rather than the
input's centre (:func:`erf_centre`: at small inputs the centre output looks off-centre); the plots use RepLKNet's
log scale.

A stage ``S`` is the output of stride ``4 * 2**S`` (0..3: strides 4, 8, 16, 32) for every model: RapidNet, any timm
model built with ``features_only=True`` (the feature whose ``feature_info`` reduction is that stride), and the
backbone body of this project's Mask R-CNN and Semantic FPN (:func:`stage_features`).

RapidNet's layer scales start at 1e-5, so at initialisation its blocks barely contribute to their residual sums and
the ERF of a freshly built model is that of the stem and the downsampling path, whatever the blocks' kernels and
dilations: the theoretical RF grows with every MLDC block, the ERF hardly does. Trained models are the ones that
answer how large the ERF is (pass ``--checkpoint``).
"""

from __future__ import annotations

import builtins
import copy
import math
import operator
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import FeatureDictNet
from torch import Tensor, nn
from torch.fx import Node, Tracer
from torch.fx.node import map_arg
from tqdm import tqdm

from rapidnet.constants import RF_CAP
from rapidnet.data import FASHION_MNIST_NAME, IMG_EXTENSIONS, FashionMNIST, is_fashion_mnist_folder, load_rgb
from rapidnet.data.listing import list_files
from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError
from rapidnet.models import create_model, is_rapidnet, load
from rapidnet.models.backbone import BackboneWithFPN
from rapidnet.models.rapidnet import RapidNet
from rapidnet.utils import atomic_write, subset_indices, unwrap_model

__all__ = [
    "ERF_THRESHOLDS",
    "RF_CAP",
    "RF_METHODS",
    "ReceptiveField",
    "StageFeatures",
    "build_model",
    "check_model_name",
    "check_plot_path",
    "erf_centre",
    "erf_fractions",
    "feature_body",
    "input_gradient_map",
    "load_images",
    "measure_erf",
    "model_normalization",
    "plot_erf",
    "receptive_field",
    "stage_features",
    "theoretical_rf",
    "threshold_key",
]

#: the fractions of the ERF map's total that :func:`erf_fractions` reports squares for (RepLKNet's 20/50/90/99%)
ERF_THRESHOLDS: tuple[float, ...] = (0.2, 0.5, 0.9, 0.99)
#: the task a dense checkpoint holds (its backbone body is what is measured)
_DENSE_TASKS = ("detection", "segmentation")


# ---- the ERF map and its squares -----------------------------------------------------------------------------------


def input_gradient_map(
    features: Callable[[Tensor], Tensor],
    images: Tensor,
    batch_size: int = 8,
    progress: Callable[[int], Any] | None = None,
) -> np.ndarray:
    """The ERF map of ``features`` over ``images`` (N, C, H, W): an (H, W) float64 array, summed over the N images.

    Per batch of ``batch_size`` images (memory stays bounded whatever N): the gradient of
    ``relu(f[:, :, h//2, w//2]).sum()`` with respect to the input, absolute, summed over input channels. A module is
    put in eval mode (and its parameters out of autograd) for the measurement and restored afterwards. The sum, not
    the mean: callers divide by N where they need a per-image map; the ERF squares do not depend on the scale.
    ``progress`` is called with the number of images done after each batch.
    """
    _check_images(images)
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size}: use 1 or more images per batch")
    total = torch.zeros(tuple(images.shape[-2:]), dtype=torch.float64)
    with _measuring(features), torch.enable_grad():
        for chunk in images.split(batch_size):
            x = chunk.detach().clone().requires_grad_(True)
            out = _feature_map(features(x))
            h, w = out.shape[-2:]
            centre = F.relu(out[:, :, h // 2, w // 2]).sum()
            if centre.requires_grad:  # else the output does not depend on the input: nothing to add
                (grad,) = torch.autograd.grad(centre, x)
                total += grad.detach().abs().sum(dim=(0, 1)).to("cpu", torch.float64)
            if progress is not None:
                progress(len(chunk))
    return total.numpy()


def threshold_key(threshold: float) -> str:
    """The result key of a threshold: 0.5 -> ``t50``, 0.99 -> ``t99``, 0.995 -> ``t99.5``."""
    return f"t{round(threshold * 100, 6):g}"


def erf_fractions(grad_map: np.ndarray | Tensor, thresholds: Sequence[float] = ERF_THRESHOLDS) -> dict[str, float]:
    """For each ``t``: the side of the smallest square centred on the map's centre (:func:`erf_centre`) that holds at
    least ``t`` of the map's total, over the input side (``max(H, W)``); keys from :func:`threshold_key` (``t20``,
    ``t50``, ...).

    The square grows one ring of pixels at a time (sides 1, 3, 5, ...), clipped at the border, so a delta gives
    ``1/H`` for every ``t`` and a map whose mass reaches the corners gives 1. Ring sums come from an integral image:
    one pass, whatever the number of thresholds.
    """
    values = np.asarray(grad_map.detach().cpu() if isinstance(grad_map, Tensor) else grad_map, dtype=np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ConfigError(f"an ERF map is a non-empty 2-d (H, W) array, got shape {values.shape}")
    for t in thresholds:
        if not 0 < t <= 1:  # NaN fails too
            raise ConfigError(f"ERF threshold {t}: use fractions in (0, 1], e.g. 0.5 for the square holding half")
    if not np.isfinite(values).all() or (values < 0).any():
        raise DataError("the ERF map has negative or non-finite values: pass a map of absolute gradients")
    total = values.sum()
    if total <= 0:
        raise DataError(
            "the ERF map is all zeros (the centre output is never positive, or does not depend on the input): "
            "measure more images, another stage or a trained model"
        )
    height, width = values.shape
    cy, cx = erf_centre(values)
    side_max = max(height, width)
    integral = np.zeros((height + 1, width + 1))
    integral[1:, 1:] = values.cumsum(0).cumsum(1)
    rings = np.arange(max(cy, height - 1 - cy, cx, width - 1 - cx) + 1)
    top, bottom = np.maximum(cy - rings, 0), np.minimum(cy + rings, height - 1) + 1
    left, right = np.maximum(cx - rings, 0), np.minimum(cx + rings, width - 1) + 1
    held = (integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]) / total
    held[-1] = 1.0  # the whole map: exactly, whatever the rounding of the sums
    out = {}
    for t in thresholds:
        ring = int(np.argmax(held >= t - 1e-12))
        out[threshold_key(t)] = min(2 * ring + 1, side_max) / side_max
    return out


def erf_centre(grad_map: np.ndarray) -> tuple[int, int]:
    """Where the squares are centred: the map's centre of mass, rounded to a pixel.

    Not the input's centre (RepLKNet's choice, at 1024 px): every stride-2 conv with "same" padding centres output
    pixel ``i`` on input pixel ``2i``, so the centre output of a stride-32 stage looks about 16 px up and left of
    the centre of an input whose map has an odd side (160 px: 5x5), which at small inputs would inflate every square.
    """
    total = float(grad_map.sum())
    if total <= 0:
        return grad_map.shape[0] // 2, grad_map.shape[1] // 2
    ys, xs = np.arange(grad_map.shape[0]), np.arange(grad_map.shape[1])
    cy = float((grad_map.sum(1) * ys).sum() / total)
    cx = float((grad_map.sum(0) * xs).sum() / total)
    return round(cy), round(cx)


# ---- the theoretical receptive field -------------------------------------------------------------------------------

#: how :func:`receptive_field` finds the RF: arithmetic over the traced graph, the gradient probe, or the graph where
#: it can follow the network and the probe elsewhere
RF_METHODS = ("auto", "graph", "probe")


@dataclass(frozen=True)
class ReceptiveField:
    """What :func:`receptive_field` found: ``side`` (pixels) = ``max(height, width)`` of the box of input pixels that
    affect the centre output, on a ``probe``-pixel square input; ``clipped`` when even the largest probe allowed was
    too small (``side`` is then that probe's side: the RF is at least that). ``method`` says how it was found
    (``graph`` or ``probe``); it takes no part in comparisons, since both methods answer the same question."""

    side: int
    height: int
    width: int
    probe: int
    clipped: bool
    method: str = field(default="probe", compare=False)


def receptive_field(
    features: Callable[[Tensor], Tensor],
    channels: int = 3,
    *,
    start: int = 32,
    cap: int = RF_CAP,
    probes: int = 2,
    seed: int = 0,
    method: str = "auto",
) -> ReceptiveField:
    """The theoretical receptive field of the centre output of ``features``: the input pixels it depends on at all.

    Both methods look at square inputs of ``start`` pixels, doubled until the box of input pixels the centre output
    ``(h//2, w//2)`` depends on lies strictly inside the input (touches no border: the RF is then whole, not cut by
    the padding), at most ``cap`` pixels; so the answer does not depend on the images an ERF is measured on.

    ``graph`` (what ``auto`` uses wherever it applies): arithmetic over the graph that ``torch.fx`` traces (timm's
    leaf modules and functions kept whole): for each input size, the map sizes forward through the layers, then,
    backward from the centre output, the interval of each layer's input that its requested outputs need, clipped to
    the map (conv and pool windows with stride, dilation and padding, timm's dynamic 'same' padding included; nearest
    upsampling; adaptive pools; the union over the inputs of sums, products and concatenations, a broadcast operand
    needing its one pixel). An interval per layer, rather than the usual ``r, j, start`` recurrence, because it also
    gives what the probe sees at the borders, where the padding cuts the box. It costs milliseconds and needs no
    gradient, and it has none of the probe's blind spots: a dilated conv's holes, a gradient that underflows, and
    weights that are zero (timm's ResNets start their blocks' last BatchNorm at zero, so the probe of an untrained one
    sees its shortcuts only; the arithmetic gives the architecture's RF, which the probe gives once trained). An op
    that mixes every position along an axis (a global mean or pool, GroupNorm, a softmax or norm over positions, as
    in squeeze-excitation) makes the RF the whole input: reported as the probe reports it, ``cap``, clipped. An op
    it does not model (attention, reshapes of the map, bilinear resizing, code fx cannot trace) makes ``auto`` fall
    back to the probe; ``graph`` then raises a one-line error.

    ``probe``: measured on random inputs. A module is measured on a float64 copy (the caller's is untouched; float32
    would lose the far pixels of a RapidNet at initialisation, whose layer scales of 1e-5 multiply along the longest
    paths) in eval mode, with its max pools as average pools of the same geometry (a max pool passes gradient to one
    pixel per window, an average pool to all, and both see the same pixels); the scalar is a random combination of
    the centre's channels, and the box is the union over ``probes`` random images, measured one at a time so memory
    is that of one image's autograd graph, so a ReLU or GELU that is flat for one input, or channels that cancel, do
    not shrink it. A plain callable is probed as it is (float32). Stops at the first probe holding the box, so a small
    RF costs little; a large one costs forward and backward passes at up to ``cap`` pixels. (A box inside the probe is
    taken as whole: true of every network whose RF has no holes wider than half the ``start`` probe, which only a lone
    conv dilated by more than 15 would have.)
    """
    if not 1 <= start <= cap:
        raise ConfigError(f"receptive field probes of {start}..{cap} pixels: start must be between 1 and the cap")
    if probes < 1:
        raise ConfigError(f"probes={probes}: measure at least 1 random input")
    if method not in RF_METHODS:
        raise ConfigError(f"receptive field method {method!r}: use one of {', '.join(RF_METHODS)}")
    if method != "probe":
        try:
            with _measuring(features):  # eval mode: BatchNorm is per pixel, dropout and drop-path are identities
                graph = _RFGraph(features)
                return _grow(graph.box, start, cap, "graph")
        except _Unsupported as e:
            if method == "graph":
                detail = " ".join(str(e).split())[:160]
                raise ConfigError(f"the RF arithmetic cannot follow this network ({detail}): use the probe") from None
    net, dtype = _probe_copy(features)
    device = _device(net)
    generator = torch.Generator().manual_seed(seed)

    def probe_box(size: int, last: bool) -> tuple[bool, _Box | None]:
        return _gradient_box(net, channels, size, probes, dtype, device, generator, last)

    return _grow(probe_box, start, cap, "probe")


def theoretical_rf(features: Callable[[Tensor], Tensor], channels: int = 3, **options: Any) -> int:
    """The side (pixels) of the theoretical receptive field of the centre output: :func:`receptive_field`'s ``side``.

    3 for one 3x3 conv, 5 with dilation 2, 5 for two stacked 3x3 convs, 1 for 1x1 convs; ``cap`` when the RF is
    larger than the largest probe (use :func:`receptive_field` to be told so: its ``clipped``).
    """
    return receptive_field(features, channels, **options).side


#: (top, bottom, left, right) of a box of input pixels, inclusive
_Box = tuple[int, int, int, int]


def _grow(box_at: Callable[[int, bool], tuple[bool, _Box | None]], start: int, cap: int, method: str) -> ReceptiveField:
    """The search both methods share: ``box_at(size, last)`` gives ``(ran, box)`` for a ``size`` input (``ran``
    False: too small for the network, retried larger unless it is the ``last`` one)."""
    size = start
    while True:
        ran, box = box_at(size, size >= cap)
        if ran and box is None:
            raise ConfigError(
                "the centre output does not depend on the input (its gradient is zero everywhere): "
                "is this the feature map of the model?"
            )
        if box is not None:
            top, bottom, left, right = box
            height, width = bottom - top + 1, right - left + 1
            if top > 0 and left > 0 and bottom < size - 1 and right < size - 1:
                return ReceptiveField(max(height, width), height, width, size, False, method)
            if size >= cap:
                return ReceptiveField(cap, height, width, size, True, method)
        size = min(2 * size, cap)


def _gradient_box(
    net: Callable[[Tensor], Tensor],
    channels: int,
    size: int,
    probes: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    last: bool,
) -> tuple[bool, _Box | None]:
    """``(ran, (top, bottom, left, right))`` of the pixels with a non-zero gradient on a ``size`` probe, the union
    over ``probes`` images run one at a time; ``ran`` False when the probe is too small for the network (retried
    larger unless it is the ``last`` one)."""
    found: _Box | None = None
    for _ in range(probes):
        x = torch.randn(1, channels, size, size, generator=generator, dtype=dtype).to(device).requires_grad_(True)
        try:
            with torch.enable_grad():
                out = _feature_map(net(x), allow_empty=True)
        except (RuntimeError, ConfigError) as e:
            if not last:
                return False, None
            detail = " ".join(str(e).split())[:120] or type(e).__name__
            raise ConfigError(f"the network cannot take a {size}x{size} probe input ({detail})") from None
        h, w = out.shape[-2:]
        if h == 0 or w == 0:
            if last:
                raise ConfigError(f"the feature map of a {size}x{size} input is empty: the stage's stride is too large")
            return False, None
        mix = torch.randn(out.shape[:2], generator=generator, dtype=dtype).to(device)
        score = (out[:, :, h // 2, w // 2] * mix).sum()
        del out
        if not score.requires_grad:
            continue
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(score, x)
        hit = (grad.abs().sum(dim=(0, 1)) > 0).nonzero()
        del grad, score, x
        if hit.numel() == 0:
            continue
        (top, left), (bottom, right) = hit.min(0).values.tolist(), hit.max(0).values.tolist()
        box = (top, bottom, left, right)
        found = box if found is None else _union(found, box)
    return True, found


def _probe_copy(features: Callable[[Tensor], Tensor]) -> tuple[Callable[[Tensor], Tensor], torch.dtype]:
    """A float64, eval-mode, gradient-free copy of a module (max pools as average pools); a callable as it is."""
    if not isinstance(features, nn.Module):
        return features, torch.float32
    net = copy.deepcopy(features)
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.MaxPool2d and not child.return_indices and child.dilation in (1, (1, 1)):
                pool = nn.AvgPool2d(child.kernel_size, child.stride, child.padding, child.ceil_mode)
                setattr(module, name, pool)
            elif type(child) is nn.AdaptiveMaxPool2d and not child.return_indices:
                setattr(module, name, nn.AdaptiveAvgPool2d(child.output_size))
    return net.double().eval().requires_grad_(False), torch.float64


# ---- the receptive field by arithmetic over the traced graph --------------------------------------------------------


class _Unsupported(Exception):
    """The graph holds an op the arithmetic does not model, or cannot be traced: the probe measures it instead."""


class _Empty(Exception):
    """An input of this size leaves some layer an empty map, or maps that do not fit together: the network cannot
    take it (as PyTorch would raise, the probe would)."""


@dataclass(frozen=True)
class _Map:
    """An input-dependent tensor, as the arithmetic sees it: the spatial ``size`` (h, w), the dims its H and W axes
    are (None: reduced away, size 1) and its rank (None: unknown, for a map of one pixel that was reshaped)."""

    size: tuple[int, int]
    axes: tuple[int | None, int | None]
    ndim: int | None


@dataclass(frozen=True)
class _Seq:
    """The tuple an op returns of pieces of one map (chunk, split along channels): every item is ``item``."""

    item: _Map


#: per spatial axis, the (first, last) pixels of a map that an op's output needs
_Req = tuple[tuple[int, int], tuple[int, int]]
#: an op's step backward: from the pixels of its output that are needed to those of each input map
_Back = Callable[[_Req], list[tuple[Node, _Req | None]]]

#: ops that act pixel by pixel (the union over their inputs' pixels, a broadcast operand giving its one pixel)
_POINTWISE_OPS = frozenset((
    "add", "sub", "rsub", "mul", "div", "truediv", "floordiv", "true_divide", "floor_divide", "mod", "remainder",
    "fmod", "pow", "neg", "pos", "abs", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "sqrt", "rsqrt",
    "square", "reciprocal", "sign", "sigmoid", "tanh", "relu", "relu6", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "elu", "selu", "celu", "leaky_relu", "softplus", "softsign", "logsigmoid",
    "tanhshrink", "softshrink", "hardshrink", "threshold", "rrelu", "prelu", "clamp", "clamp_min", "clamp_max",
    "clip", "where", "maximum", "minimum", "erf", "erfc", "sin", "cos", "floor", "ceil", "round", "trunc", "frac",
    "lerp", "addcmul", "addcdiv", "masked_fill", "nan_to_num", "type_as", "to", "float", "double", "half", "bfloat16",
    "contiguous", "clone", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "local_response_norm", "channel_shuffle",
))  # fmt: skip
#: reductions called as ``op(input, dim=None, keepdim=False)``
_REDUCTIONS = frozenset(("mean", "sum", "amax", "amin", "logsumexp", "prod", "nansum", "nanmean"))
#: operator's in-place names, as the op they apply
_INPLACE = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv", "ifloordiv": "floordiv", "ipow": "pow"}
_POINTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softshrink, nn.Hardshrink, nn.Threshold, nn.LogSigmoid, nn.Softmax2d, nn.LocalResponseNorm, nn.ChannelShuffle,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)  # fmt: skip


class _RFGraph:
    """The traced graph of a network and, for an input size, the box of input pixels its centre output depends on."""

    def __init__(self, features: Callable[[Tensor], Tensor]) -> None:
        self.root, graph = _trace(features)
        self.nodes = list(graph.nodes)
        inputs = [n for n in self.nodes if n.op == "placeholder"]
        outputs = [n for n in self.nodes if n.op == "output"]
        if not inputs or len(outputs) != 1:
            raise _Unsupported("the traced graph has no input or no single output")
        self.input, self.output = inputs[0], outputs[0]
        self.consts: dict[Node, Any] = {}  # what does not depend on the input, computed once

    def box(self, size: int, last: bool) -> tuple[bool, _Box | None]:
        """``(ran, box)`` for a ``size`` input, as :func:`_gradient_box` gives them."""
        try:
            values, backs = self._forward(size)
        except _Empty as e:
            if not last:
                return False, None
            raise ConfigError(f"the network cannot take a {size}x{size} probe input ({e})") from None
        result = self.output.args[0]
        if isinstance(result, (tuple, list)) and len(result) == 1:
            result = result[0]
        out = values.get(result) if isinstance(result, Node) else None
        if not isinstance(out, _Map) or out.ndim != 4 or out.axes != (2, 3):
            raise _Unsupported("the output is not one (N, C, h, w) map")
        (h, w) = out.size
        requests: dict[Node, _Req] = {result: ((h // 2, h // 2), (w // 2, w // 2))}
        for node in reversed(self.nodes):
            if node is self.input or node not in requests or node not in backs:
                continue
            for source, need in backs[node](requests.pop(node)):
                if need is not None:
                    requests[source] = need if source not in requests else _union_req(requests[source], need)
        need = requests.get(self.input)
        return True, None if need is None else (*need[0], *need[1])

    def _forward(self, size: int) -> tuple[dict[Node, Any], dict[Node, _Back]]:
        """Every node's value (a :class:`_Map`, a :class:`_Seq` or a constant) and each map op's step backward."""
        values: dict[Node, Any] = {}
        backs: dict[Node, _Back] = {}
        for node in self.nodes:
            if node.op == "output":
                continue
            if node is self.input:
                values[node] = _Map((size, size), (2, 3), 4)
            elif node in self.consts:
                values[node] = self.consts[node]
            elif node.op == "placeholder":
                if not node.args:
                    raise _Unsupported(f"a second input, {node.name}, without a default")
                values[node] = self.consts[node] = node.args[0]
            elif node.op == "get_attr":
                values[node] = self.consts[node] = _attr(self.root, str(node.target))
            else:
                args = map_arg(node.args, values.__getitem__)
                kwargs = map_arg(node.kwargs, values.__getitem__)
                if not any(isinstance(values[n], (_Map, _Seq)) for n in node.all_input_nodes):
                    values[node] = self.consts[node] = self._run(node, args, kwargs)
                    continue
                try:
                    values[node], backs[node] = self._step(node, args, kwargs, values)
                except (_Empty, _Unsupported):
                    raise
                except Exception as e:  # arguments of a form the rules do not expect: the probe measures it
                    raise _Unsupported(f"{node.name} ({type(e).__name__}: {e})") from None
        return values, backs

    def _run(self, node: Node, args: Any, kwargs: Any) -> Any:
        """A node that does not depend on the input (a weight reshaped or standardised), computed as it is."""
        name = str(node.target) if node.op == "call_method" else getattr(node.target, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE or name == "setitem":
            raise _Unsupported(f"{name} would change the model's tensors in place")
        try:
            with torch.no_grad():
                if node.op == "call_function":
                    return node.target(*args, **kwargs)  # type: ignore[operator]
                if node.op == "call_method":
                    return getattr(args[0], str(node.target))(*args[1:], **kwargs)
                return self.root.get_submodule(str(node.target))(*args, **kwargs)
        except Exception as e:  # whatever the model's own code raises: let the probe report it
            raise _Unsupported(f"{node.name} fails on its constants ({type(e).__name__})") from None

    def _step(self, node: Node, args: Any, kwargs: Any, values: dict[Node, Any]) -> tuple[Any, _Back]:
        if node.op == "call_module":
            module = self.root.get_submodule(str(node.target))
            source, x = _one(node, values)
            return _module_step(module, source, x)
        name = _op_name(node)
        if name is None:
            raise _Unsupported(f"{node.op} {getattr(node.target, '__name__', node.target)}")
        if name in _POINTWISE_OPS:
            return _broadcast(node, args, kwargs, values)
        if name == "getitem":
            return _getitem(node, args, values)
        if name == "getattr" and len(args) == 2 and args[1] in ("dtype", "device"):
            return (torch.float64 if args[1] == "dtype" else torch.device("cpu")), lambda need: []
        if name == "cat" or name == "concat" or name == "concatenate":
            return _cat(node, args, kwargs, values)
        source, x = _one(node, values)
        if name in _REDUCTIONS or name in ("std", "var"):
            if name in ("std", "var") and len(args) > 2:
                raise _Unsupported(f"{name} with positional options")
            return _reduce(source, x, _arg(args, kwargs, 1, "dim", None), bool(_arg(args, kwargs, 2, "keepdim", False)))
        if name in ("softmax", "log_softmax", "softmin", "normalize"):
            dim = _arg(args, kwargs, 2 if name == "normalize" else 1, "dim", 1 if name == "normalize" else None)
            if dim is None:
                raise _Unsupported(f"{name} over an implicit dim")
            return _whole_along(source, x, _dims(dim, x))
        if name == "batch_norm":
            return _norm_step(source, x, bool(_arg(args, kwargs, 5, "training", False)))
        if name in ("group_norm", "instance_norm"):
            stats = name == "group_norm" or bool(_arg(args, kwargs, 5, "use_input_stats", True))
            return _norm_step(source, x, stats)
        if name == "layer_norm":
            return _layer_norm(source, x, len(_seq(_arg(args, kwargs, 1, "normalized_shape", ()))))
        if name == "linear":
            return _linear(source, x)
        if name == "conv2d":
            weight = _arg(args, kwargs, 1, "weight", None)
            if not isinstance(weight, Tensor) or weight.ndim != 4:
                raise _Unsupported("conv2d with a weight that is not a constant 4-d tensor")
            padding = _arg(args, kwargs, 4, "padding", 0)
            kernel, stride = tuple(weight.shape[-2:]), _pair(_arg(args, kwargs, 3, "stride", 1))
            dilation = _pair(_arg(args, kwargs, 5, "dilation", 1))
            pre, own = _conv_padding(padding, kernel, dilation)
            return _window(source, x, kernel, stride, dilation, own, pre)
        if name in ("max_pool2d", "avg_pool2d"):
            kernel = _pair(_arg(args, kwargs, 1, "kernel_size", None))
            stride = _pair(_arg(args, kwargs, 2, "stride", None) or kernel)
            own = _pair(_arg(args, kwargs, 3, "padding", 0))
            dilation = _pair(_arg(args, kwargs, 4, "dilation", 1)) if name == "max_pool2d" else (1, 1)
            ceil_mode = bool(_arg(args, kwargs, 5 if name == "max_pool2d" else 4, "ceil_mode", False))
            return _window(source, x, kernel, stride, dilation, own, ((0, 0), (0, 0)), ceil_mode)
        if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
            return _adaptive(source, x, _arg(args, kwargs, 1, "output_size", None))
        if name == "interpolate":
            return _upsample(
                source,
                x,
                _arg(args, kwargs, 1, "size", None),
                _arg(args, kwargs, 2, "scale_factor", None),
                _arg(args, kwargs, 3, "mode", "nearest"),
                _arg(args, kwargs, 5, "recompute_scale_factor", None),
            )
        if name == "pad":
            if _arg(args, kwargs, 2, "mode", "constant") != "constant":
                raise _Unsupported("reflect, replicate or circular padding")
            return _pad(source, x, list(_arg(args, kwargs, 1, "pad", ())))
        if name in ("permute", "transpose", "swapaxes", "unsqueeze", "squeeze"):
            return _move(name, source, x, args[1:], kwargs)
        if name in ("chunk", "split", "tensor_split"):
            dims = _dims(_arg(args, kwargs, 2, "dim", 0), x)
            if set(dims) & set(x.axes):
                raise _Unsupported(f"{name} along a spatial axis")
            return _Seq(x), lambda need: [(source, need)]
        if name in ("view", "reshape", "flatten"):
            if x.size != (1, 1):
                raise _Unsupported(f"{name} of a map (the spatial layout is lost)")
            return _Map((1, 1), (None, None), None), lambda need: [(source, ((0, 0), (0, 0)))]
        raise _Unsupported(f"the op {name}")


def _trace(features: Callable[[Tensor], Tensor]) -> tuple[nn.Module, torch.fx.Graph]:
    """``(root, graph)`` that ``torch.fx`` traces, timm's leaf modules and functions kept whole (as timm's own
    feature extraction does): a module that computes its padding from the input size (``Conv2dSame``) is then one
    node the arithmetic knows, and code that branches on sizes is left to the probe."""
    from timm.layers import get_notrace_functions, get_notrace_modules

    leaves = tuple(get_notrace_modules())

    class LeafTracer(Tracer):
        def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, module_qualified_name)

    tracer = LeafTracer(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
    try:
        graph = tracer.trace(features)  # type: ignore[arg-type]
    except Exception as e:  # fx raises many types for code it cannot follow: the probe measures such networks
        raise _Unsupported(f"torch.fx cannot trace it: {type(e).__name__}") from None
    return tracer.root, graph


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _op_name(node: Node) -> str | None:
    """The name of a torch, ``torch.nn.functional`` or operator function (or tensor method) a node calls: in-place
    names as the op they apply; None for any other function."""
    if node.op == "call_method":
        name = str(node.target)
    else:
        target = node.target
        name = getattr(target, "__name__", None)
        if not name or not any(getattr(ns, name, None) is target for ns in (operator, torch, F, builtins)):
            return None
    name = _INPLACE.get(name, name)
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _arg(args: Sequence[Any], kwargs: Mapping[str, Any], index: int, name: str, default: Any) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _seq(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list, torch.Size)) else (value,)


def _pair(value: Any) -> tuple[Any, Any]:
    items = _seq(value)
    if len(items) == 1:
        return items[0], items[0]
    if len(items) != 2:
        raise _Unsupported(f"a 2-d window of {value!r}")
    return items[0], items[1]


def _union(a: _Box, b: _Box) -> _Box:
    return min(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), max(a[3], b[3])


def _union_req(a: _Req, b: _Req) -> _Req:
    return (min(a[0][0], b[0][0]), max(a[0][1], b[0][1])), (min(a[1][0], b[1][0]), max(a[1][1], b[1][1]))


def _clip(first: int, last: int, size: int) -> tuple[int, int] | None:
    first, last = max(first, 0), min(last, size - 1)
    return (first, last) if first <= last else None


def _each(need: _Req, step: Callable[[int, int, int], tuple[int, int] | None]) -> _Req | None:
    """``step(axis, first, last)`` on both axes; None where either needs nothing."""
    h, w = step(0, *need[0]), step(1, *need[1])
    return None if h is None or w is None else (h, w)


def _one(node: Node, values: Mapping[Node, Any]) -> tuple[Node, _Map]:
    """The one map an op takes (its first argument); any other input that depends on the input is refused."""
    source = node.args[0] if node.args else next(iter(node.kwargs.values()), None)
    maps = [n for n in node.all_input_nodes if isinstance(values[n], (_Map, _Seq))]
    if not isinstance(source, Node) or maps != [source] or not isinstance(values[source], _Map):
        raise _Unsupported(f"{node.name} takes more than one map, or a tuple of maps")
    return source, values[source]


def _nchw(x: _Map) -> _Map:
    """A map whose last two dims are H and W (a one-pixel map of unknown layout counts as 1x1)."""
    if x.ndim is not None and x.ndim in (3, 4) and x.axes == (x.ndim - 2, x.ndim - 1):
        return x
    if x.axes == (None, None) and x.size == (1, 1):
        return _Map((1, 1), (2, 3), 4)
    raise _Unsupported("a 2-d window over a tensor whose last two dims are not H and W")


def _dims(dim: Any, x: _Map) -> tuple[int, ...]:
    if x.ndim is None:
        raise _Unsupported("an op along dims of a reshaped map")
    items = range(x.ndim) if dim is None else _seq(dim)
    if not all(isinstance(d, int) for d in items):
        raise _Unsupported(f"dims {dim!r}")
    return tuple(d % x.ndim for d in items) if x.ndim else ()


def _same(source: Node, x: _Map) -> tuple[_Map, _Back]:
    return x, lambda need: [(source, need)]


def _whole_along(source: Node, x: _Map, dims: Sequence[int]) -> tuple[_Map, _Back]:
    """An op that keeps the shape and mixes every position along ``dims`` (softmax, normalize)."""
    mixed = [x.axes[axis] is not None and x.axes[axis] in dims for axis in (0, 1)]

    def back(need: _Req) -> list[tuple[Node, _Req | None]]:
        return [(source, _each(need, lambda axis, a, b: (0, x.size[axis] - 1) if mixed[axis] else (a, b)))]

    return x, back


def _reduce(source: Node, x: _Map, dim: Any, keepdim: bool) -> tuple[_Map, _Back]:
    """A reduction over ``dim`` (all dims: None): a reduced spatial axis needs the whole input along it."""
    if x.ndim is None:  # a one-pixel map: the pixel
        return _Map((1, 1), (None, None), None), lambda need: [(source, ((0, 0), (0, 0)))]
    dims = set(_dims(dim, x))
    axes: list[int | None] = []
    for pos in x.axes:
        if pos is None or (pos in dims and not keepdim):
            axes.append(None)
        else:
            axes.append(pos if keepdim else pos - sum(d < pos for d in dims))
    reduced = [x.axes[axis] is not None and x.axes[axis] in dims for axis in (0, 1)]
    size = (1 if reduced[0] else x.size[0], 1 if reduced[1] else x.size[1])
    out = _Map(size, (axes[0], axes[1]), x.ndim if keepdim else x.ndim - len(dims))

    def back(need: _Req) -> list[tuple[Node, _Req | None]]:
        return [(source, _each(need, lambda axis, a, b: (0, x.size[axis] - 1) if reduced[axis] else (a, b)))]

    return out, back


def _norm_step(source: Node, x: _Map, batch_stats: bool) -> tuple[_Map, _Back]:
    """A norm: per pixel with stored statistics, over all positions with the input's own."""
    return _whole_along(source, x, [a for a in x.axes if a is not None]) if batch_stats else _same(source, x)


def _layer_norm(source: Node, x: _Map, count: int) -> tuple[_Map, _Back]:
    """LayerNorm over the last ``count`` dims: per pixel over channels (NHWC), over positions where they are in."""
    if x.ndim is None:
        return _same(source, x)
    return _whole_along(source, x, range(x.ndim - count, x.ndim))


def _linear(source: Node, x: _Map) -> tuple[_Map, _Back]:
    """A linear layer acts on the last dim: per pixel on NHWC maps or pooled features, not across positions."""
    if x.ndim is not None and x.ndim - 1 in x.axes:
        raise _Unsupported("a linear layer across positions")
    return _same(source, x)


def _broadcast(node: Node, args: Any, kwargs: Any, values: Mapping[Node, Any]) -> tuple[_Map, _Back]:
    """An op pixel by pixel over broadcast operands: each input map needs the requested pixels, or its one pixel
    along an axis it is broadcast along."""
    maps = [(n, values[n]) for n in node.all_input_nodes if isinstance(values[n], (_Map, _Seq))]
    if any(isinstance(m, _Seq) for _, m in maps):
        raise _Unsupported(f"{node.name} takes a tuple of maps")
    consts = [t for t in _leaves((args, kwargs)) if isinstance(t, Tensor)]
    ranks = [m.ndim for _, m in maps if m.ndim is not None] + [t.ndim for t in consts]
    ndim = max(ranks) if ranks else None
    size, axes = [1, 1], [None, None]
    for axis in (0, 1):
        placed = {m.axes[axis] + ndim - m.ndim for _, m in maps if m.axes[axis] is not None}  # type: ignore[operator]
        if len(placed) > 1:
            raise _Unsupported(f"{node.name} adds maps whose H or W dims differ")
        if not placed:
            continue
        axes[axis] = pos = placed.pop()
        sides = {m.size[axis] for _, m in maps if m.axes[axis] is not None}
        sides |= {t.shape[pos - ndim + t.ndim] for t in consts if pos - ndim + t.ndim >= 0}  # type: ignore[operator]
        if len(sides - {1}) > 1:
            raise _Empty(f"{node.name} gets maps of sizes {sorted(sides)}")
        size[axis] = max(sides)
    out = _Map((size[0], size[1]), (axes[0], axes[1]), ndim)

    def back(need: _Req) -> list[tuple[Node, _Req | None]]:
        steps: list[tuple[Node, _Req | None]] = []
        for source, m in maps:
            whole = [m.axes[axis] is None or m.size[axis] < size[axis] for axis in (0, 1)]
            steps.append((source, _each(need, lambda axis, a, b, whole=whole: (0, 0) if whole[axis] else (a, b))))
        return steps

    return out, back


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _leaves(item)
    else:
        yield value


def _getitem(node: Node, args: Any, values: Mapping[Node, Any]) -> tuple[Any, _Back]:
    """A piece of a tuple of maps, or an index of a map that keeps H and W whole (``x[:, :c]``)."""
    source, index = node.args[0], args[1]
    value = values.get(source) if isinstance(source, Node) else None
    if any(isinstance(values[n], (_Map, _Seq)) for n in node.all_input_nodes if n is not source):
        raise _Unsupported("indexing by a tensor that depends on the input")
    if isinstance(value, _Seq):
        return value.item, lambda need: [(source, need)]
    if not isinstance(value, _Map) or value.ndim is None:
        raise _Unsupported("indexing of a reshaped map")
    x = value
    items = index if isinstance(index, tuple) else (index,)
    if not all(i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int for i in items):
        raise _Unsupported("advanced indexing of a map")
    consumed = sum(i is not None and i is not Ellipsis for i in items)
    if consumed > x.ndim or sum(i is Ellipsis for i in items) > 1:
        raise _Unsupported("an index with too many dims")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items = (*items[:at], *([slice(None)] * (x.ndim - consumed)), *items[at + 1 :])
    else:
        items = (*items, *([slice(None)] * (x.ndim - consumed)))
    spatial = {pos: axis for axis, pos in enumerate(x.axes) if pos is not None}
    axes: list[int | None] = [None, None]
    dim = out = 0
    for item in items:
        if item is None:
            out += 1
            continue
        axis = spatial.get(dim)
        if axis is not None:
            if item != slice(None):
                raise _Unsupported("indexing a map along H or W")
            axes[axis] = out
        dim += 1
        out += 0 if type(item) is int else 1
    return _Map(x.size, (axes[0], axes[1]), out), lambda need: [(source, need)]


def _cat(node: Node, args: Any, kwargs: Any, values: Mapping[Node, Any]) -> tuple[_Map, _Back]:
    """A concatenation along channels: each input map needs what the output needs."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    if not isinstance(parts, (tuple, list)):
        raise _Unsupported("a concatenation of a tuple of maps")
    maps = [(n, values[n]) for n in parts if isinstance(n, Node) and isinstance(values[n], _Map)]
    if not maps or any(isinstance(values[n], _Seq) for n in node.all_input_nodes):
        raise _Unsupported("a concatenation of a tuple of maps")
    first = maps[0][1]
    dims = _dims(_arg(args, kwargs, 1, "dim", 0), first)
    if any(m.axes != first.axes or m.ndim != first.ndim for _, m in maps):
        raise _Unsupported("a concatenation of maps of different layouts")
    if any(m.size != first.size for _, m in maps):
        raise _Empty(f"{node.name} gets maps of sizes {sorted({m.size for _, m in maps})}")
    if set(dims) & set(first.axes):
        raise _Unsupported("a concatenation along H or W")
    return first, lambda need: [(n, need) for n, _ in maps]


def _move(name: str, source: Node, x: _Map, rest: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[_Map, _Back]:
    """Dims moved (permute, transpose), added or removed (unsqueeze, squeeze): where H and W are then."""
    if x.ndim is None:
        raise _Unsupported(f"{name} of a reshaped map")
    n, axes = x.ndim, list(x.axes)
    if name == "permute":
        raw = kwargs.get("dims", rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest)
        order = [int(d) % n for d in raw]
        axes = [None if a is None else order.index(a) for a in axes]
    elif name in ("transpose", "swapaxes"):
        d0, d1 = (int(_arg(rest, kwargs, i, k, None)) % n for i, k in ((0, "dim0"), (1, "dim1")))
        axes = [d1 if a == d0 else d0 if a == d1 else a for a in axes]
    elif name == "unsqueeze":
        d = int(_arg(rest, kwargs, 0, "dim", 0)) % (n + 1)
        axes, n = [None if a is None else a + (a >= d) for a in axes], n + 1
    else:
        dim = _arg(rest, kwargs, 0, "dim", None)
        if dim is None:
            raise _Unsupported("squeeze of every dim of size 1")
        dims = set(_dims(dim, x))
        if dims - {a for a in x.axes if a is not None}:
            raise _Unsupported("squeeze of a dim other than H or W (its size is not followed)")
        dims = {a for axis, a in enumerate(x.axes) if a in dims and x.size[axis] == 1}  # H or W of more stays
        axes = [None if a is None or a in dims else a - sum(d < a for d in dims) for a in axes]
        n -= len(dims)
    return _Map(x.size, (axes[0], axes[1]), n), lambda need: [(source, need)]


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """timm's dynamic 'same' padding (TensorFlow's): the (before, after) pixels for a ``size`` input."""
    total = max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


def _conv_padding(
    padding: Any, kernel: Sequence[int], dilation: Sequence[int]
) -> tuple[tuple[tuple[int, int], tuple[int, int]], tuple[int, int]]:
    """A conv's ``padding`` as (asymmetric padding added first, per axis; the conv's own, per axis)."""
    none = ((0, 0), (0, 0))
    if padding == "valid":
        return none, (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        return ((totals[0] // 2, totals[0] - totals[0] // 2), (totals[1] // 2, totals[1] - totals[1] // 2)), (0, 0)
    return none, _pair(padding)


def _window(
    source: Node,
    x: _Map,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    own: Sequence[int],
    pre: Sequence[tuple[int, int]],
    ceil_mode: bool = False,
) -> tuple[_Map, _Back]:
    """A conv or pool window: ``pre`` padding added first (timm's 'same'), then the layer's own symmetric ``own``.
    Output pixel ``i`` of an axis needs input pixels ``i*s - pad .. i*s - pad + d*(k-1)`` (those in the map)."""
    x = _nchw(x)
    size = []
    for axis in (0, 1):
        k, s, d, p = kernel[axis], stride[axis], dilation[axis], own[axis]
        n = x.size[axis] + pre[axis][0] + pre[axis][1]
        span = n + 2 * p - d * (k - 1) - 1
        if span < 0 or s < 1:
            raise _Empty(f"a {k}x{k} window gets a {x.size[0]}x{x.size[1]} map")
        out = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= n + p:  # PyTorch's rule: the last window starts inside the input
            out -= 1
        size.append(out)
    shift = [pre[axis][0] + own[axis] for axis in (0, 1)]

    def step(axis: int, a: int, b: int) -> tuple[int, int] | None:
        first = a * stride[axis] - shift[axis]
        return _clip(first, b * stride[axis] - shift[axis] + dilation[axis] * (kernel[axis] - 1), x.size[axis])

    return _Map((size[0], size[1]), x.axes, x.ndim), lambda need: [(source, _each(need, step))]


def _adaptive(source: Node, x: _Map, output_size: Any) -> tuple[_Map, _Back]:
    """An adaptive pool: output ``i`` of ``o`` pools input ``floor(i*n/o) .. ceil((i+1)*n/o) - 1``."""
    x = _nchw(x)
    wanted = _pair(output_size)
    outs = [x.size[axis] if wanted[axis] is None else int(wanted[axis]) for axis in (0, 1)]
    if min(outs) < 1:
        raise _Empty("an adaptive pool to nothing")

    def step(axis: int, a: int, b: int) -> tuple[int, int] | None:
        n, o = x.size[axis], outs[axis]
        return _clip(a * n // o, -(-(b + 1) * n // o) - 1, n)

    return _Map((outs[0], outs[1]), x.axes, x.ndim), lambda need: [(source, _each(need, step))]


def _upsample(source: Node, x: _Map, size: Any, scale: Any, mode: Any, recompute: Any) -> tuple[_Map, _Back]:
    """Nearest upsampling (or downsampling), indices as PyTorch's kernel computes them (float32 scales); other
    modes (bilinear, bicubic: taps whose weight can be zero) are left to the probe."""
    if mode != "nearest":
        raise _Unsupported(f"{mode} resizing")
    x = _nchw(x)
    outs, scales = [], []
    for axis in (0, 1):
        n = x.size[axis]
        if size is not None:
            o, s = int(_pair(size)[axis]), None
        else:
            factor = float(_pair(scale)[axis])
            o, s = math.floor(n * factor), None if recompute else factor
        if o < 1:
            raise _Empty("a resize to nothing")
        outs.append(o)
        scales.append(np.float32(1.0 / s) if s is not None and s > 0 else np.float32(n) / np.float32(o))

    def index(axis: int, i: int) -> int:
        n, o = x.size[axis], outs[axis]
        if o == n:
            return i
        if o == 2 * n:
            return i >> 1
        return min(int(np.floor(np.float32(i) * scales[axis])), n - 1)

    def step(axis: int, a: int, b: int) -> tuple[int, int] | None:
        return index(axis, a), index(axis, b)

    return _Map((outs[0], outs[1]), x.axes, x.ndim), lambda need: [(source, _each(need, step))]


def _pad(source: Node, x: _Map, pads: list[Any]) -> tuple[_Map, _Back]:
    """Constant padding ``(left, right, top, bottom, ...)`` of the last dims (negative: cropping)."""
    if x.ndim is None:
        raise _Unsupported("padding of a reshaped map")
    lo, hi, size = [0, 0], [0, 0], list(x.size)
    for axis, pos in enumerate(x.axes):
        if pos is None:
            continue
        k = 2 * (x.ndim - 1 - pos)
        if len(pads) >= k + 2:
            lo[axis], hi[axis] = int(pads[k]), int(pads[k + 1])
            size[axis] = x.size[axis] + lo[axis] + hi[axis]
    if min(size) < 1:
        raise _Empty("padding crops the map to nothing")

    def step(axis: int, a: int, b: int) -> tuple[int, int] | None:
        return _clip(a - lo[axis], b - lo[axis], x.size[axis])

    return _Map((size[0], size[1]), x.axes, x.ndim), lambda need: [(source, _each(need, step))]


def _module_step(module: nn.Module, source: Node, x: _Map) -> tuple[Any, _Back]:
    """The step of a leaf module (torch.nn's, or timm's leaves)."""
    from timm.layers import AvgPool2dSame, Conv2dSame, FrozenBatchNormAct2d, ScaledStdConv2dSame, StdConv2dSame
    from timm.layers.pool2d_same import MaxPool2dSame

    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise _Unsupported(f"{module.padding_mode} padding")
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        timm_convs = (Conv2dSame, StdConv2dSame, ScaledStdConv2dSame)
        if type(module).__module__.split(".")[0] != "torch" and not isinstance(module, timm_convs):
            raise _Unsupported(f"the conv {type(module).__name__}")
        pre, own = _conv_padding(module.padding, kernel, dilation)
        if isinstance(module, Conv2dSame) or getattr(module, "same_pad", False):  # padding from the input size
            pre = tuple(_same_padding(x.size[a], kernel[a], stride[a], dilation[a]) for a in (0, 1))  # type: ignore[assignment]
        return _window(source, x, kernel, stride, dilation, own, pre)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        kernel = _pair(module.kernel_size)
        stride = _pair(module.stride or kernel)
        dilation = _pair(module.dilation) if isinstance(module, nn.MaxPool2d) else (1, 1)
        pre = ((0, 0), (0, 0))
        if isinstance(module, (MaxPool2dSame, AvgPool2dSame)):
            same_dilation = dilation if isinstance(module, MaxPool2dSame) else (1, 1)
            pre = tuple(_same_padding(x.size[a], kernel[a], stride[a], same_dilation[a]) for a in (0, 1))  # type: ignore[assignment]
        elif type(module).__module__.split(".")[0] != "torch":
            raise _Unsupported(f"the pool {type(module).__name__}")
        return _window(source, x, kernel, stride, dilation, _pair(module.padding), pre, module.ceil_mode)
    if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(source, x, module.output_size)
    if isinstance(module, nn.Upsample):
        return _upsample(source, x, module.size, module.scale_factor, module.mode, module.recompute_scale_factor)
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
        return _pad(source, x, list(module.padding))
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNormAct2d)):
        if not all(_pointwise_module(child) for child in module.children()):  # timm's BatchNormAct2d: act, drop
            raise _Unsupported(f"{type(module).__name__} with a non-pointwise part")
        return _norm_step(source, x, module.training or getattr(module, "running_mean", 0) is None)
    if isinstance(module, nn.GroupNorm):
        return _norm_step(source, x, True)
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return _norm_step(source, x, module.training or not module.track_running_stats)
    if isinstance(module, nn.LayerNorm):
        return _layer_norm(source, x, len(module.normalized_shape))
    if isinstance(module, (nn.Softmax, nn.LogSoftmax, nn.Softmin)):
        if module.dim is None:
            raise _Unsupported(f"{type(module).__name__} over an implicit dim")
        return _whole_along(source, x, _dims(module.dim, x))
    if isinstance(module, nn.Linear):
        return _linear(source, x)
    if isinstance(module, nn.Flatten):
        if x.size != (1, 1):
            raise _Unsupported("a flatten of a map (the spatial layout is lost)")
        return _Map((1, 1), (None, None), None), lambda need: [(source, ((0, 0), (0, 0)))]
    if _pointwise_module(module):
        return _same(source, x)
    raise _Unsupported(f"the module {type(module).__name__}")


def _pointwise_module(module: nn.Module) -> bool:
    """An activation, dropout or identity of torch.nn (or of timm's activations): pixel by pixel."""
    return isinstance(module, _POINTWISE_MODULES) or type(module).__module__.startswith("timm.layers.activations")


# ---- stage outputs of a model --------------------------------------------------------------------------------------


class StageFeatures(nn.Module):
    """One stage's output of a network: ``forward(x)`` is the (N, C, h, w) map at stride ``reduction``.

    ``model`` is a :class:`~rapidnet.models.rapidnet.RapidNet` (its ``forward_intermediates``, stopping after the
    stage) or a timm feature extractor (its ``index``-th output; a ``FeatureDictNet`` stops after the module that
    gives it). Built by :func:`stage_features`.
    """

    def __init__(self, model: nn.Module, stage: int, reduction: int, index: int) -> None:
        super().__init__()
        self.model = model
        self.stage = stage
        self.reduction = reduction
        self.index = index

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(self.model, RapidNet):
            maps = self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)
            return maps[0]
        return _timm_feature(self.model, self.index, x)


def _timm_feature(body: nn.Module, index: int, x: Tensor) -> Tensor:
    """Output ``index`` of a timm feature extractor, NCHW; a ``FeatureDictNet`` (``FeatureListNet``) runs only the
    modules up to the one that gives it (stage 0 of a large body costs its stem and first stage, not the body)."""
    fmt = getattr(body, "output_fmt", None)
    nhwc = str(getattr(fmt, "value", fmt)) == "NHWC"
    layers = getattr(body, "return_layers", None) or {}
    if isinstance(body, FeatureDictNet) and not body.grad_checkpointing and len(layers) == len(body.feature_info):
        target = list(layers)[index]
        for name, module in body.items():
            x = module(x)
            if name == target:
                if isinstance(x, (tuple, list)):  # as FeatureDictNet._collect does
                    x = torch.cat(list(x), 1) if body.concat else x[0]
                return x.permute(0, 3, 1, 2) if nhwc else x
    out = body(x)
    feats = list(out.values()) if isinstance(out, Mapping) else list(out)
    return feats[index].permute(0, 3, 1, 2) if nhwc else feats[index]


def feature_body(model: nn.Module) -> nn.Module:
    """The network whose stages are measured: a dense model's (or FPN backbone's) feature body, else the model."""
    model = unwrap_model(model)
    if isinstance(model, BackboneWithFPN):
        return model.body
    backbone = getattr(model, "backbone", None)
    if isinstance(backbone, BackboneWithFPN):  # Semantic FPN and Mask R-CNN alike
        return backbone.body
    return model


def stage_features(
    model: nn.Module, stages: Sequence[int] = (0, 1, 2, 3), name: str | None = None
) -> dict[int, StageFeatures]:
    """``{stage: StageFeatures}``: stage ``S`` is the output of stride ``4 * 2**S`` (0..3: strides 4, 8, 16, 32).

    ``model`` is a RapidNet (classifier or not), a timm model built with ``features_only=True`` (the last feature of
    that ``feature_info`` reduction: a timm model listing a stride-2 output first still has stage 2 at stride 16),
    or a Mask R-CNN / Semantic FPN of this project (its backbone body). A stride the model does not give is a
    one-line error naming the strides it has; ``name`` is the model's name in messages.
    """
    body = feature_body(model)
    label = name or type(body).__name__
    if isinstance(body, RapidNet):
        reductions = [int(info["reduction"]) for info in body.feature_info]
    elif callable(getattr(getattr(body, "feature_info", None), "reduction", None)):
        reductions = [int(r) for r in body.feature_info.reduction()]
    else:
        raise ConfigError(
            f"{label} ({type(body).__name__}) gives no stage outputs: pass a RapidNet, a timm model built with "
            "features_only=True, or a Mask R-CNN / Semantic FPN of this project"
        )
    have = [int(math.log2(r // 4)) for r in reductions if r >= 4 and r % 4 == 0 and (r // 4) & (r // 4 - 1) == 0]
    extractors: dict[int, StageFeatures] = {}
    for stage in stages:
        if isinstance(stage, bool) or not isinstance(stage, int) or stage < 0:
            raise ConfigError(f"stage {stage!r}: stages are 0, 1, 2, 3 (strides 4, 8, 16, 32)")
        want = 4 * 2**stage
        if want not in reductions:
            choose = f"choose among stages {', '.join(map(str, sorted(set(have))))}" if have else "no stage fits"
            raise ConfigError(
                f"{label} has no stage {stage} (stride {want}): its feature strides are "
                f"{', '.join(map(str, reductions))}; {choose}"
            )
        index = len(reductions) - 1 - reductions[::-1].index(want)  # the last output at that stride: the stage's end
        extractors[stage] = StageFeatures(body, stage, want, index)
    return extractors


# ---- models and images ---------------------------------------------------------------------------------------------


def build_model(
    name: str | None = None,
    checkpoint: str | Path | None = None,
    mldc_dilations: Sequence[int] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``(model in eval mode, metadata)`` to measure: a RapidNet variant or a timm model by name (random weights;
    timm's built with ``features_only=True``), or what a checkpoint holds (through ``rapidnet.load``).

    With a checkpoint, ``name`` checks the file (a RapidNet variant, a dense model's backbone) or names the timm
    model a file without metadata holds. A timm classifier file is loaded as timm's ``features_only`` wrapper of the
    same weights. ``mldc_dilations`` reaches a RapidNet built by name (a checkpoint's dilations are its own).
    """
    if name is None and checkpoint is None:
        raise ConfigError("nothing to measure: give a model name (e.g. rapidnet_ti) or a checkpoint")
    if name is not None:
        check_model_name(name)
    if mldc_dilations is not None and (checkpoint is not None or not is_rapidnet(name or "")):
        raise ConfigError(
            "mldc_dilations apply to a RapidNet variant built by name: a checkpoint holds its own, other models "
            "have no MLDC"
        )
    if checkpoint is not None:
        return _load_checkpoint(checkpoint, name)
    assert name is not None
    if is_rapidnet(name):
        extra = {} if mldc_dilations is None else {"mldc_dilations": tuple(int(d) for d in mldc_dilations)}
        try:
            return create_model(name, num_classes=0, **extra).eval(), {}
        except TypeError as e:  # a RapidNet that does not know the argument yet
            detail = " ".join(str(e).split())[:120]
            raise ConfigError(f"{name} cannot be built with {extra} ({detail}): update rapidnet") from None
    try:
        return timm.create_model(name, features_only=True, pretrained=False).eval(), {}
    except (RuntimeError, TypeError, ValueError, AssertionError, KeyError, NotImplementedError) as e:
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:120]
        raise ConfigError(
            f"timm model {name!r} cannot be built as a feature extractor (features_only=True; {detail}): "
            "choose a model with stage outputs, e.g. mobilenetv2_100 or resnet18"
        ) from None


def check_model_name(name: str) -> None:
    """A one-line error for a name that is neither a RapidNet variant nor a timm model (before any file is read)."""
    if not is_rapidnet(name) and not timm.is_model(name):
        raise ConfigError(f"unknown model {name!r}: use a RapidNet variant (rapidnet_ti/s/m/b) or a timm model name")


def _load_checkpoint(path: str | Path, name: str | None) -> tuple[nn.Module, dict[str, Any]]:
    try:
        model, meta = load(path, model=name)
    except ConfigError as refused:  # a dense file refuses a model name (it names classifiers): check its backbone
        if name is None:
            raise
        try:
            model, meta = load(path)
        except RapidNetError:
            raise refused from None
        if meta.get("task") not in _DENSE_TASKS:
            raise refused from None
        backbone = str(meta["build_args"]["backbone"])
        if backbone.split(".")[0] != name.split(".")[0]:
            raise CheckpointError(
                f"{path} holds a {meta['task']} model on {backbone}, not {name}: pass --model {backbone}, or no "
                "model name"
            ) from None
    if isinstance(model, RapidNet) or feature_body(model) is not model:
        return model, meta
    # a timm classifier: its stage outputs come from timm's features_only wrapper of the same weights
    return load(path, model=meta.get("arch") or name, features_only=True)


def model_normalization(
    model: nn.Module, meta: Mapping[str, Any] | None = None
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` the model's inputs are normalised with: a dense file's stored ``build_args``, the dense
    model's own, the (stored) ``pretrained_cfg``, else ImageNet's."""
    build = (meta or {}).get("build_args") or {}
    if build.get("image_mean") and build.get("image_std"):
        return tuple(map(float, build["image_mean"])), tuple(map(float, build["image_std"]))
    model = unwrap_model(model)
    for owner in (model, getattr(model, "transform", None)):  # Semantic FPN's buffers; torchvision's transform
        mean, std = getattr(owner, "image_mean", None), getattr(owner, "image_std", None)
        if mean is not None and std is not None:
            return _floats(mean), _floats(std)
    for owner in (model, feature_body(model)):
        cfg = getattr(owner, "pretrained_cfg", None) or {}
        if cfg.get("mean") and cfg.get("std"):
            return _floats(cfg["mean"]), _floats(cfg["std"])
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


def _floats(values: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in torch.as_tensor(values, dtype=torch.float64).flatten())


def load_images(data: str | Path, count: int, resolution: int, seed: int = 0) -> Tensor:
    """``count`` images as an (n, 3, R, R) float tensor in [0, 1], each resized to ``resolution`` squared.

    ``data`` is ``fashion-mnist`` (the installed test split; a fixed random subset chosen by ``seed``), a folder
    of the Fashion-MNIST IDX files (the same), or a folder of images: every image file under it, recursively, in
    sorted order, the first ``count`` (fewer when it holds fewer), read with :func:`rapidnet.data.load_rgb`.
    Greyscale becomes three equal channels.
    """
    if count < 1:
        raise ConfigError(f"{count} images: measure at least 1 image")
    if resolution < 1:
        raise ConfigError(f"resolution {resolution}: give the image side in pixels, e.g. 224")
    if str(data) == FASHION_MNIST_NAME or (Path(data).is_dir() and is_fashion_mnist_folder(data)):
        dataset = FashionMNIST(None if str(data) == FASHION_MNIST_NAME else data, split="test")
        pictures = [Image.fromarray(dataset.images[i]) for i in subset_indices(len(dataset), count, seed)]
    else:
        pictures = [_read_image(f) for f in _image_files(Path(data).expanduser())[:count]]
    return torch.stack([_to_tensor(p, resolution) for p in pictures])


def _image_files(folder: Path) -> list[Path]:
    """The images under ``folder``, listed by the data folder rules (:mod:`rapidnet.data.listing`)."""
    fix = f"pass a folder of images or '{FASHION_MNIST_NAME}'"
    files = list_files(folder, IMG_EXTENSIONS, fix=fix)
    if not files:
        raise DataError(
            f"no images in {folder} (searched recursively): expected files ending in {', '.join(IMG_EXTENSIONS)}"
        )
    return files


def _read_image(path: Path) -> Image.Image:
    try:
        return load_rgb(path)
    except DataError:
        raise
    except Exception as e:  # Pillow raises many types for a file it cannot decode
        detail = " ".join(f"{type(e).__name__}: {e}".split())[:120]
        raise DataError(f"cannot read image {path} ({detail}): remove it or fix it") from None


def _to_tensor(image: Image.Image, resolution: int) -> Tensor:
    image = image.convert("RGB").resize((resolution, resolution), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div_(255)


# ---- one model, several stages -------------------------------------------------------------------------------------


def measure_erf(
    model: nn.Module,
    images: Tensor,
    stages: Sequence[int] = (0, 1, 2, 3),
    *,
    name: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 8,
    thresholds: Sequence[float] = ERF_THRESHOLDS,
    rf_cap: int = RF_CAP,
    probes: int = 2,
    seed: int = 0,
    progress: bool | None = False,
    rf_method: str = "auto",
) -> list[dict[str, Any]]:
    """The ERF of each stage of ``model`` over ``images`` (N, 3, H, W) in [0, 1]: one dict per stage.

    Images are normalised with ``mean``/``std`` (default :func:`model_normalization`; a one-channel model gets their
    grey mean). Each dict: ``stage``, ``reduction`` (stride), ``resolution`` (H, or [H, W]), ``images`` (N),
    ``feature_size`` ([h, w] of the stage map), the fractions of :func:`erf_fractions` (``t20`` ... ``t99``),
    ``theoretical_rf`` (pixels, :func:`receptive_field` up to ``rf_cap``, by ``rf_method``; ``probes`` and ``seed``
    reach its probe) and ``theoretical_rf_clipped``, and ``map``: the (H, W) ERF map averaged over the images, for
    :func:`plot_erf`. ``progress``: a tqdm bar on stderr
    over the images (None: only on a terminal).
    """
    _check_images(images)
    label = name or type(feature_body(model)).__name__
    extractors = stage_features(model, stages, label)  # a stage the model lacks fails before any work
    count, _, height, width = images.shape
    for stage, feat in extractors.items():
        if min(height, width) < feat.reduction:
            raise ConfigError(
                f"{height}x{width} images are too small for stage {stage} of {label} (stride {feat.reduction}): "
                f"use a resolution of at least {feat.reduction} pixels (the stage map must be at least 1x1)"
            )
    if mean is None or std is None:
        mean, std = model_normalization(model)
    x = _normalize(images, mean, std).to(_device(model))
    rows = []
    with tqdm(
        total=len(extractors) * count, desc=label, unit="img", file=sys.stderr, disable=_disable(progress)
    ) as bar:
        for stage, feat in extractors.items():
            size = _feature_size(feat, x[:1], label, stage)
            total = input_gradient_map(feat, x, batch_size, progress=bar.update)
            try:
                fractions = erf_fractions(total, thresholds)
            except DataError as e:
                raise DataError(f"{label} stage {stage}: {e}") from None
            rf = receptive_field(feat, x.shape[1], cap=rf_cap, probes=probes, seed=seed, method=rf_method)
            rows.append(
                {
                    "stage": stage,
                    "reduction": feat.reduction,
                    "resolution": height if height == width else [height, width],
                    "images": count,
                    "feature_size": size,
                    **fractions,
                    "theoretical_rf": rf.side,
                    "theoretical_rf_clipped": rf.clipped,
                    "map": total / count,
                }
            )
    return rows


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _feature_size(feat: StageFeatures, x: Tensor, label: str, stage: int) -> list[int]:
    """[h, w] of the stage map for one image; a network that cannot take the size is a one-line error."""
    try:
        with torch.no_grad(), _measuring(feat):
            out = _feature_map(feat(x), allow_empty=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:120] or type(e).__name__
        raise ConfigError(
            f"stage {stage} of {label} cannot take {x.shape[-2]}x{x.shape[-1]} images ({detail}): use a larger "
            "resolution"
        ) from None
    h, w = out.shape[-2:]
    if h == 0 or w == 0:
        raise ConfigError(
            f"stage {stage} of {label} gives an empty map for {x.shape[-2]}x{x.shape[-1]} images: use a resolution "
            f"of at least {feat.reduction} pixels"
        )
    return [int(h), int(w)]


def _normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.tensor(list(mean), dtype=images.dtype).view(-1, 1, 1)
    std_t = torch.tensor(list(std), dtype=images.dtype).view(-1, 1, 1)
    if len(mean_t) == 1 and images.shape[1] == 3:  # a greyscale model
        images = images.mean(dim=1, keepdim=True)
    if len(mean_t) != images.shape[1] or len(std_t) != len(mean_t):
        raise ConfigError(f"normalisation of {len(mean_t)} channels does not fit {images.shape[1]}-channel images")
    return (images - mean_t) / std_t


# ---- the figure ----------------------------------------------------------------------------------------------------


def check_plot_path(path: str | Path) -> Path:
    """A PNG path that can be written: not a folder, in a folder that exists (checked before minutes of work)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise ConfigError(f"plot path {path} is a folder: give a file name, e.g. {path / 'erf.png'}")
    if not path.parent.is_dir():
        raise ConfigError(f"plot folder {path.parent} does not exist: create it or choose another plot path")
    return path


def plot_erf(results: Sequence[Mapping[str, Any]], path: str | Path, scale: float = 1000.0) -> Path:
    """One PNG of ERF heat maps: a row per model, a column per stage, one colour bar; written atomically.

    ``results`` are :func:`measure_erf`'s dicts, each with ``model`` (and optionally ``checkpoint``) added: rows in
    order of first appearance. Maps are shown on RepLKNet's log scale, ``log10(1 + scale * map / max)`` normalised
    to [0, 1], so the faint tails show beside the centre; each title gives the model, the stage and ``t50``/``t90``,
    whose squares are drawn (solid, dashed).
    """
    path = check_plot_path(path)
    if not results:
        raise ConfigError("no ERF results to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    rows: dict[tuple[str, str | None], dict[int, Mapping[str, Any]]] = {}
    for r in results:
        rows.setdefault((str(r.get("model", "model")), r.get("checkpoint")), {})[int(r["stage"])] = r
    stages = sorted({int(r["stage"]) for r in results})
    fig, axes = plt.subplots(
        len(rows), len(stages), figsize=(2.6 * len(stages) + 1.2, 2.7 * len(rows)), squeeze=False, layout="constrained"
    )
    image = None
    for i, ((model, checkpoint), by_stage) in enumerate(rows.items()):
        label = model if checkpoint is None else f"{model} ({Path(str(checkpoint)).name})"
        for j, stage in enumerate(stages):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            r = by_stage.get(stage)
            if r is None:
                ax.axis("off")
                continue
            values = np.asarray(r["map"], dtype=np.float64)
            peak = float(values.max()) if values.size else 0.0
            shown = np.log10(1 + scale * values / peak) / np.log10(1 + scale) if peak > 0 else np.zeros_like(values)
            image = ax.imshow(shown, cmap="RdYlGn", vmin=0, vmax=1, interpolation="nearest")
            height, width = values.shape
            side_max = max(height, width)
            title = f"{label}\nstage {stage} (stride {r.get('reduction', 4 * 2**stage)})"
            parts = []
            cy, cx = erf_centre(values)
            for key, style in (("t50", "-"), ("t90", "--")):
                if key in r:
                    side = float(r[key]) * side_max
                    corner = (cx - side / 2, cy - side / 2)
                    ax.add_patch(Rectangle(corner, side, side, fill=False, edgecolor="black", linestyle=style, lw=0.8))
                    parts.append(f"{key} {float(r[key]):.2f}")
            ax.set_title(title + ("\n" + "  ".join(parts) if parts else ""), fontsize=8)
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label=f"log10(1 + {scale:g} g / max g), scaled")
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


# ---- helpers -------------------------------------------------------------------------------------------------------


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ConfigError(f"images must be a non-empty (N, C, H, W) tensor, got {shape}")


def _feature_map(out: Any, allow_empty: bool = False) -> Tensor:
    if isinstance(out, (list, tuple)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ConfigError(f"the features gave {shape}: expected one (N, C, h, w) map")
    if not allow_empty and min(out.shape[-2:]) == 0:
        raise ConfigError(f"the feature map is empty ({tuple(out.shape)}): use larger images")
    return out


def _device(net: Any) -> torch.device:
    if isinstance(net, nn.Module):
        for tensor in (*net.parameters(), *net.buffers()):
            return tensor.device
    return torch.device("cpu")


@contextmanager
def _measuring(features: Any) -> Iterator[None]:
    """A module in eval mode with its parameters out of autograd (no weight gradients kept) while measured; every
    submodule's mode and every parameter's flag are put back afterwards."""
    if not isinstance(features, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in features.modules()]
    flags = [(p, p.requires_grad) for p in features.parameters()]
    features.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for p, flag in flags:
            p.requires_grad_(flag)
