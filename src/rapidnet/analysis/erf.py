"""The effective receptive field (ERF, Luo et al., NeurIPS 2016) of each stage, measured as RepLKNet does (Ding et al.,
CVPR 2022, "Scaling Up Your Kernels to 31x31", their ``erf/`` scripts).

For a stage's output map ``f = features(x)`` (N, C, h, w) the scalar is the rectified centre of the map summed over
channels, ``relu(f[:, :, h//2, w//2]).sum()``; its gradient with respect to the input, in absolute value and summed
over the input channels and over N images, is the ERF map (:func:`input_gradient_map`). Two numbers summarise a map
(:func:`erf_fractions`): the side of the smallest square, centred where the map's mass is, that holds a fraction
``t`` of the map's total, as a fraction of the input side (``t20``, ``t50``, ``t90``, ``t99``). Beside it, the
theoretical receptive field (:func:`theoretical_rf`): the side of the box of input pixels that can affect the centre
output at all, so that the ERF can be read against the RF it could have.

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

import copy
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
from tqdm import tqdm

from rapidnet.data import FASHION_MNIST_NAME, IMG_EXTENSIONS, FashionMNIST, is_fashion_mnist_folder, load_rgb
from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError
from rapidnet.models import create_model, is_rapidnet, load
from rapidnet.models.backbone import BackboneWithFPN
from rapidnet.models.rapidnet import RapidNet
from rapidnet.utils import atomic_write, subset_indices, unwrap_model

__all__ = [
    "ERF_THRESHOLDS",
    "RF_CAP",
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
#: the largest probe side :func:`receptive_field` tries: a larger RF is reported as this, flagged ``clipped``
RF_CAP = 1024
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


@dataclass(frozen=True)
class ReceptiveField:
    """What :func:`receptive_field` found: ``side`` (pixels) = ``max(height, width)`` of the box of input pixels that
    affect the centre output, on a ``probe``-pixel square input; ``clipped`` when even the largest probe allowed was
    too small (``side`` is then that probe's side: the RF is at least that)."""

    side: int
    height: int
    width: int
    probe: int
    clipped: bool


def receptive_field(
    features: Callable[[Tensor], Tensor],
    channels: int = 3,
    *,
    start: int = 32,
    cap: int = RF_CAP,
    probes: int = 2,
    seed: int = 0,
) -> ReceptiveField:
    """The theoretical receptive field of the centre output of ``features``, measured on random inputs.

    A square probe of ``start`` pixels, doubled until the box of input pixels with a non-zero gradient of the centre
    output lies strictly inside it (touches no border: the RF is then whole, not cut by the padding), at most
    ``cap`` pixels. A module is measured on a float64 copy (the caller's is untouched) in eval mode, with its max
    pools as average pools of the same geometry (a max pool passes gradient to one pixel per window, an average pool
    to all, and both see the same pixels); the scalar is a random combination of the centre's channels, and
    ``probes`` random images are measured at once (the union of their non-zero pixels), so a ReLU or GELU that is
    flat for one input, or channels that cancel, do not shrink the box. A plain callable is probed as it is
    (float32). Stops at the first probe holding the box, so a small RF costs little. (A box inside the probe is
    taken as whole: true of every network whose RF has no holes wider than half the ``start`` probe, which only a
    lone conv dilated by more than 15 would have.)
    """
    if not 1 <= start <= cap:
        raise ConfigError(f"receptive field probes of {start}..{cap} pixels: start must be between 1 and the cap")
    if probes < 1:
        raise ConfigError(f"probes={probes}: measure at least 1 random input")
    net, dtype = _probe_copy(features)
    device = _device(net)
    generator = torch.Generator().manual_seed(seed)
    size = start
    while True:
        ran, box = _gradient_box(net, channels, size, probes, dtype, device, generator, last=size >= cap)
        if ran and box is None:
            raise ConfigError(
                "the centre output does not depend on the input (its gradient is zero everywhere): "
                "is this the feature map of the model?"
            )
        if box is not None:
            top, bottom, left, right = box
            height, width = bottom - top + 1, right - left + 1
            if top > 0 and left > 0 and bottom < size - 1 and right < size - 1:
                return ReceptiveField(max(height, width), height, width, size, False)
            if size >= cap:
                return ReceptiveField(cap, height, width, size, True)
        size = min(2 * size, cap)


def theoretical_rf(features: Callable[[Tensor], Tensor], channels: int = 3, **options: Any) -> int:
    """The side (pixels) of the theoretical receptive field of the centre output: :func:`receptive_field`'s ``side``.

    3 for one 3x3 conv, 5 with dilation 2, 5 for two stacked 3x3 convs, 1 for 1x1 convs; ``cap`` when the RF is
    larger than the largest probe (use :func:`receptive_field` to be told so: its ``clipped``).
    """
    return receptive_field(features, channels, **options).side


def _gradient_box(
    net: Callable[[Tensor], Tensor],
    channels: int,
    size: int,
    probes: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
    last: bool,
) -> tuple[bool, tuple[int, int, int, int] | None]:
    """``(ran, (top, bottom, left, right))`` of the pixels with a non-zero gradient on a ``size`` probe; ``ran``
    False when the probe is too small for the network (retried larger unless it is the ``last`` one)."""
    x = torch.randn(probes, channels, size, size, generator=generator, dtype=dtype).to(device).requires_grad_(True)
    try:
        with torch.enable_grad():
            out = net(x)
            out = _feature_map(out, allow_empty=True)
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
    if not score.requires_grad:
        return True, None
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(score, x)
    hit = (grad.abs().sum(dim=(0, 1)) > 0).nonzero()
    if hit.numel() == 0:
        return True, None
    (top, left), (bottom, right) = hit.min(0).values.tolist(), hit.max(0).values.tolist()
    return True, (top, bottom, left, right)


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
    if not folder.exists():
        raise DataError(f"data folder {folder} does not exist: pass a folder of images or '{FASHION_MNIST_NAME}'")
    if not folder.is_dir():
        raise DataError(f"data {folder} is not a folder: pass a folder of images or '{FASHION_MNIST_NAME}'")
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMG_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and p.is_file()
    )
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
) -> list[dict[str, Any]]:
    """The ERF of each stage of ``model`` over ``images`` (N, 3, H, W) in [0, 1]: one dict per stage.

    Images are normalised with ``mean``/``std`` (default :func:`model_normalization`; a one-channel model gets their
    grey mean). Each dict: ``stage``, ``reduction`` (stride), ``resolution`` (H, or [H, W]), ``images`` (N),
    ``feature_size`` ([h, w] of the stage map), the fractions of :func:`erf_fractions` (``t20`` ... ``t99``),
    ``theoretical_rf`` (pixels, :func:`receptive_field` up to ``rf_cap``) and ``theoretical_rf_clipped``, and
    ``map``: the (H, W) ERF map averaged over the images, for :func:`plot_erf`. ``progress``: a tqdm bar on stderr
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
            rf = receptive_field(feat, x.shape[1], cap=rf_cap, probes=probes, seed=seed)
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
