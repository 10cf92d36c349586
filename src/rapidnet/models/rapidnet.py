"""RapidNet: Multi-Level Dilated Convolution backbones (Munir, Rahman, Marculescu, WACV 2025).

Reads top-down like Figure 3 of the paper:

    stem (stride 4) -> stage 0 -> [downsample -> stage 1] -> [downsample -> stage 2] -> [downsample -> stage 3] -> head

Each stage holds ``L`` Inverted Residual blocks followed by ``G`` Dilated Convolution blocks. A Dilated Convolution
block mixes tokens with MLDC (two parallel dense 3x3 convolutions, dilation 2 and 3, summed) and then a large-kernel
FFN. ``mldc_dilations``, ``mldc_groups`` and ``ffn_kernel`` change those for ablations; the defaults are the
paper's. Every module that can be folded for inference has a ``reparameterize()`` method (timm's convention, so
``timm.utils.reparameterize_model`` works too); :func:`rapidnet.reparameterize` applies them to a copy. As in timm's
FastViT, ``inference_mode=True`` builds the folded structure directly (no BatchNorm, layer scale or CPE identity,
one classifier), whose state dict is that of a reparameterized model.

This file is the network only: plain PyTorch modules that TorchScript, ``torch.fx`` and ``torch.export`` all take.
Backend-specific speed-ups live with their backend in :mod:`rapidnet.deploy`. The constructor checks its arguments
by the rules of ``rapidnet.models.limits``; the variants register with timm in ``rapidnet.models.factory``, which
builds them (with weights, read by ``rapidnet.models.checkpoint``) through timm's ``build_model_with_cfg``.

The forward pass equals the authors' implementation for the same weights.
"""

# No ``from __future__ import annotations`` here: TorchScript must resolve these modules' annotations, also from the
# code that ``torch.fx`` generates (timm's model files follow the same rule).

from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import DropPath, LayerScale2d
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from rapidnet.models.limits import check_args

__all__ = ["DEFAULT_DROP_PATH_RATE", "DEFAULT_MLDC", "VARIANTS", "RapidNet"]


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------------------------


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d -> optional GELU, with "same" padding; ``reparameterize`` folds the BN into the conv.

    The authors' convolutions carry a bias even when a BN follows (PyTorch's default); we keep it so that their
    weights load unchanged. ``inference_mode=True`` builds the folded unit: a conv with bias, no BN.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        act: bool = True,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=bias or inference_mode
        )
        self.bn: nn.Module = nn.Identity() if inference_mode else nn.BatchNorm2d(out_chs)
        self.act: nn.Module = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        bn = self.bn
        if not hasattr(bn, "running_var"):
            return  # already folded (BatchNorm2d and the frozen BNs of torchvision/timm all carry running_var)
        conv_bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(bn.running_mean)
        weight, bias = fuse_conv_bn_weights(
            self.conv.weight, conv_bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias
        )
        weight.requires_grad_(self.conv.weight.requires_grad)
        bias.requires_grad_(self.conv.weight.requires_grad)
        self.conv.weight = weight
        self.conv.bias = bias
        self.bn = nn.Identity()

    @torch.no_grad()
    def scale_output_(self, layer_scale: LayerScale2d) -> None:
        """Fold a per-channel layer scale that follows this (already BN-folded) unit into its conv: exact."""
        gamma = layer_scale.gamma.detach()
        self.conv.weight.mul_(gamma.view(-1, 1, 1, 1))
        self.conv.bias.mul_(gamma)


def _fold_layer_scale(unit: nn.Module, owner: nn.Module, attr: str) -> None:
    """Fold ``owner.<attr>`` (a LayerScale2d after ``unit``) into ``unit`` and replace it by an identity."""
    layer_scale = getattr(owner, attr)
    if isinstance(layer_scale, LayerScale2d) and isinstance(unit, ConvNormAct):
        unit.reparameterize()
        unit.scale_output_(layer_scale)
        setattr(owner, attr, nn.Identity())


def _layer_scale(dim: int, init: float, inference_mode: bool) -> nn.Module:
    return nn.Identity() if inference_mode else LayerScale2d(dim, init)


class InvertedResidual(nn.Module):
    """MobileNetV2-style block: 1x1 expand (x4) -> 3x3 depthwise -> 1x1 project, layer-scaled residual."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-5,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.expand = ConvNormAct(dim, hidden, 1, inference_mode=inference_mode)
        self.dw = ConvNormAct(hidden, hidden, 3, groups=hidden, inference_mode=inference_mode)
        self.project = ConvNormAct(hidden, dim, 1, act=False, inference_mode=inference_mode)
        self.layer_scale = _layer_scale(dim, layer_scale_init, inference_mode)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.layer_scale(self.project(self.dw(self.expand(x)))))

    def reparameterize(self) -> None:
        for unit in (self.expand, self.dw, self.project):
            if isinstance(unit, ConvNormAct):
                unit.reparameterize()
        _fold_layer_scale(self.project, self, "layer_scale")


class ConditionalPosEnc(nn.Module):
    """Conditional positional encoding ``x + DW7x7(x)``; at inference the identity folds into the kernel centre.

    ``inference_mode=True`` builds the folded form directly: one depthwise conv, ``reparam_conv``.
    """

    def __init__(self, dim: int, kernel_size: int = 7, inference_mode: bool = False) -> None:
        super().__init__()
        conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=True)
        self.pe: nn.Conv2d | None = None if inference_mode else conv
        self.reparam_conv: nn.Conv2d | None = conv if inference_mode else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reparam_conv is not None:
            return self.reparam_conv(x)
        assert self.pe is not None
        return x + self.pe(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        if self.pe is None:
            return
        pe = self.pe
        conv = nn.Conv2d(pe.in_channels, pe.out_channels, pe.kernel_size, padding=pe.padding, groups=pe.groups)
        centre = pe.kernel_size[0] // 2
        conv.weight.copy_(pe.weight)
        conv.weight[:, 0, centre, centre] += 1.0
        conv.bias.copy_(pe.bias)
        self.reparam_conv = conv.to(pe.weight.device, pe.weight.dtype)
        self.pe = None


class MultiLevelDilatedConv(nn.Module):
    """MLDC token mixer: CPE -> 1x1 -> [dense 3x3 dilation 2 || dense 3x3 dilation 3], summed -> 1x1.

    The two dilation rates see short- and long-range context at once, giving a large receptive field with plain
    convolutions. ``dilations`` sets the parallel branches (one 3x3 conv each, ``(2, 3)`` in the paper) and
    ``groups`` their grouping (``groups == dim`` makes them depthwise), so that ablations change one argument.
    """

    def __init__(
        self, dim: int, dilations: Sequence[int] = (2, 3), groups: int = 1, inference_mode: bool = False
    ) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.cpe = ConditionalPosEnc(dim, 7, inference_mode=inference_mode)
        self.fc1 = ConvNormAct(dim, dim, 1, act=False, inference_mode=inference_mode)
        self.branches = nn.ModuleList(
            ConvNormAct(dim, dim, 3, dilation=d, groups=groups, inference_mode=inference_mode) for d in self.dilations
        )
        self.fc2 = ConvNormAct(dim, dim, 1, act=False, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.cpe(x))
        mixed: torch.Tensor | None = None
        for branch in self.branches:
            y = branch(x)
            mixed = y if mixed is None else mixed + y
        assert mixed is not None
        return self.fc2(mixed)


class LargeKernelFFN(nn.Module):
    """FFN preceded by a 7x7 depthwise conv (no bias) + BN: channel mixing with a large spatial footprint."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, kernel_size: int = 7, inference_mode: bool = False) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.dw = ConvNormAct(dim, dim, kernel_size, groups=dim, bias=False, act=False, inference_mode=inference_mode)
        self.fc1 = ConvNormAct(dim, hidden, 1, inference_mode=inference_mode)
        self.fc2 = ConvNormAct(hidden, dim, 1, act=False, inference_mode=inference_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.dw(x)))


class DilatedConvBlock(nn.Module):
    """``x + gamma1 * MLDC(x)`` then ``x + gamma2 * LKFFN(x)``, each with stochastic depth."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-5,
        mldc_dilations: Sequence[int] = (2, 3),
        mldc_groups: int = 1,
        ffn_kernel: int = 7,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        self.mixer = MultiLevelDilatedConv(dim, mldc_dilations, mldc_groups, inference_mode=inference_mode)
        self.layer_scale1 = _layer_scale(dim, layer_scale_init, inference_mode)
        self.ffn = LargeKernelFFN(dim, mlp_ratio, ffn_kernel, inference_mode=inference_mode)
        self.layer_scale2 = _layer_scale(dim, layer_scale_init, inference_mode)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale1(self.mixer(x)))
        return x + self.drop_path(self.layer_scale2(self.ffn(x)))

    def reparameterize(self) -> None:
        self.mixer.cpe.reparameterize()
        for unit in (self.mixer.fc1, *self.mixer.branches, self.ffn.dw, self.ffn.fc1):
            if isinstance(unit, ConvNormAct):
                unit.reparameterize()
        _fold_layer_scale(self.mixer.fc2, self, "layer_scale1")
        _fold_layer_scale(self.ffn.fc2, self, "layer_scale2")


class RapidNetStage(nn.Module):
    """Optional stride-2 downsample (3x3 conv + BN, no activation), then Inverted Residual and Dilated Conv blocks."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        num_inverted_residual: int,
        num_dilated: int,
        downsample: bool,
        drop_path_rates: Sequence[float],
        mlp_ratio: float = 4.0,
        layer_scale_init: float = 1e-5,
        mldc_dilations: Sequence[int] = (2, 3),
        mldc_groups: int | str = 1,
        ffn_kernel: int = 7,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        self.downsample = (
            ConvNormAct(in_chs, out_chs, 3, stride=2, act=False, inference_mode=inference_mode)
            if downsample
            else nn.Identity()
        )
        rates = list(drop_path_rates)
        blocks: list[nn.Module] = [
            InvertedResidual(out_chs, mlp_ratio, rates[i], layer_scale_init, inference_mode)
            for i in range(num_inverted_residual)
        ]
        blocks += [
            DilatedConvBlock(
                out_chs,
                mlp_ratio,
                rates[num_inverted_residual + i],
                layer_scale_init,
                mldc_dilations,
                out_chs if mldc_groups == "depthwise" else mldc_groups,
                ffn_kernel,
                inference_mode,
            )
            for i in range(num_dilated)
        ]
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class RapidNetHead(nn.Module):
    """Global average pool -> 1x1 conv (C -> E) + BN + GELU -> dropout -> classifier (+ distillation classifier).

    With a distillation classifier, training mode returns ``(cls_logits, dist_logits)`` (as the authors' model does)
    and eval mode their mean. ``reparameterize`` folds the BN and merges the two classifiers into one (their mean is
    linear), so the inference model has a single head with identical outputs; ``inference_mode=True`` builds that
    head directly.

    ``global_pool=''`` skips the pooling, as in timm's early-pooling heads: the 1x1 conv (and a classifier, if any,
    acting as a 1x1 conv) then applies at every position and the output stays an NCHW map.
    """

    def __init__(
        self,
        in_chs: int,
        hidden: int,
        num_classes: int,
        distillation: bool,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        self.global_pool = global_pool
        self.conv: nn.Module = ConvNormAct(in_chs, hidden, 1, inference_mode=inference_mode)
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        with_dist = distillation and num_classes > 0 and not inference_mode
        self.fc_dist: nn.Module | None = nn.Linear(hidden, num_classes) if with_dist else None
        self.distilled_training = True

    def forward(self, x: torch.Tensor, pre_logits: bool = False):
        pooled = self.global_pool == "avg"
        if pooled:
            x = x.mean((2, 3), keepdim=True)
        x = self.drop(self.conv(x))
        if pooled:
            x = x.flatten(1)
        if pre_logits:
            return x
        if not pooled:
            x = x.permute(0, 2, 3, 1)  # NHWC: the linear classifier acts as a 1x1 conv at every position
        logits = self.fc(x)
        if not pooled:
            logits = logits.permute(0, 3, 1, 2)
        if self.fc_dist is None:
            return logits
        logits_dist = self.fc_dist(x)
        if not pooled:
            logits_dist = logits_dist.permute(0, 3, 1, 2)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return logits, logits_dist
        return (logits + logits_dist) / 2

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.conv, ConvNormAct):
            self.conv.reparameterize()
        if self.fc_dist is not None and isinstance(self.fc, nn.Linear):
            merged = nn.Linear(self.fc.in_features, self.fc.out_features).to(
                self.fc.weight.device, self.fc.weight.dtype
            )
            merged.weight.copy_((self.fc.weight + self.fc_dist.weight) / 2)
            merged.bias.copy_((self.fc.bias + self.fc_dist.bias) / 2)
            self.fc, self.fc_dist = merged, None


# --------------------------------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------------------------------


def _init_weights(module: nn.Module) -> None:
    """The authors' init: Kaiming-normal conv (and classifier) weights, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _check_global_pool(global_pool: str) -> str:
    check_args({"global_pool": global_pool})
    return global_pool


class RapidNet(nn.Module):
    """RapidNet backbone and classifier.

    Args:
        depths: per stage, ``(number of Inverted Residual blocks, number of Dilated Convolution blocks)``.
        widths: channels of the four stages (stem output = ``widths[0]``).
        head_dim: width ``E`` of the 1x1 conv before the classifier (``head_hidden_size``).
        num_classes: classifier outputs; 0 for none (the model returns pre-logits).
        distillation: add the DeiT-style distillation classifier (``head.fc_dist``).
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks in order. (The authors' code only
            advances the rate on Dilated Convolution blocks; eval outputs are the same either way.)
        global_pool: ``'avg'`` (the paper's head) or ``''``: no pooling, the head's 1x1 conv (and classifier) then
            apply at every position and the output is an NCHW map of ``head_dim`` (or ``num_classes``) channels.
        inference_mode: build the folded inference structure directly (timm FastViT's convention): no BatchNorm,
            every conv with a bias, the CPE as one conv (``reparam_conv``), no layer scales, one classifier. Its
            state dict has exactly the keys and shapes of ``rapidnet.reparameterize(RapidNet(...))``, so a fused
            file loads strictly into it without building and folding a training model first. ``distillation`` is
            then moot: the folded head has one classifier (the mean of both), as ``reparameterize`` leaves it.
        mldc_dilations: the dilation of each parallel 3x3 branch of MLDC, ``(2, 3)`` in the paper; ``(2,)`` is a single
            branch, ``(1, 2, 3)`` three levels. The research knob of the paper's ablations.
        mldc_groups: groups of the MLDC branches: ``1`` (dense, the paper), a number dividing the widths of the
            stages with Dilated Convolution blocks, or ``'depthwise'`` (one group per channel).
        ffn_kernel: odd kernel size of the large-kernel FFN's depthwise conv (7 in the paper).
    """

    def __init__(
        self,
        depths: Sequence[Sequence[int]] = ((2, 0), (2, 0), (6, 2), (2, 2)),
        widths: Sequence[int] = (32, 64, 112, 224),
        head_dim: int = 512,
        num_classes: int = 1000,
        in_chans: int = 3,
        distillation: bool = True,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-5,
        global_pool: str = "avg",
        inference_mode: bool = False,
        mldc_dilations: Sequence[int] = (2, 3),
        mldc_groups: int | str = 1,
        ffn_kernel: int = 7,
    ) -> None:
        super().__init__()
        # what a checkpoint can describe is checked here, by the rules every other reader of these arguments uses
        check_args(
            dict(
                depths=depths,
                widths=widths,
                head_dim=head_dim,
                num_classes=num_classes,
                in_chans=in_chans,
                global_pool=global_pool,
                mldc_dilations=mldc_dilations,
                mldc_groups=mldc_groups,
                ffn_kernel=ffn_kernel,
            )
        )
        self.mldc_dilations = tuple(int(d) for d in mldc_dilations)
        self.mldc_groups = mldc_groups
        self.ffn_kernel = int(ffn_kernel)
        self.depths = tuple(tuple(int(n) for n in d) for d in depths)
        self.widths = tuple(int(w) for w in widths)
        self.head_dim = head_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.global_pool = global_pool

        self.stem = nn.Sequential(
            ConvNormAct(in_chans, widths[0] // 2, 3, stride=2, inference_mode=inference_mode),
            ConvNormAct(widths[0] // 2, widths[0], 3, stride=2, inference_mode=inference_mode),
        )

        total_blocks = sum(sum(d) for d in self.depths)
        rates = torch.linspace(0, drop_path_rate, total_blocks).tolist() if total_blocks else []
        stages: list[nn.Module] = []
        feature_info: list[dict[str, Any]] = []
        in_chs, first = widths[0], 0
        for i, ((num_ir, num_dc), out_chs) in enumerate(zip(self.depths, self.widths, strict=True)):
            n = num_ir + num_dc
            stages.append(
                RapidNetStage(
                    in_chs,
                    out_chs,
                    num_ir,
                    num_dc,
                    i > 0,
                    rates[first : first + n],
                    mlp_ratio,
                    layer_scale_init,
                    self.mldc_dilations,
                    mldc_groups,
                    self.ffn_kernel,
                    inference_mode,
                )
            )
            feature_info.append(dict(num_chs=out_chs, reduction=4 * 2**i, module=f"stages.{i}"))
            in_chs, first = out_chs, first + n
        self.stages = nn.Sequential(*stages)
        self.feature_info = feature_info

        self.num_features = self.widths[-1]
        self.head_hidden_size = head_dim
        self.head = RapidNetHead(
            self.num_features, head_dim, num_classes, distillation, drop_rate, global_pool, inference_mode
        )
        self.apply(_init_weights)

    # ---- forward -------------------------------------------------------------------------------------------------

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's feature API: the outputs of the chosen stages (strides 4, 8, 16, 32), and the last one.

        Returns ``(forward_features(x), intermediates)``, or the intermediates alone with ``intermediates_only``.
        RapidNet has no final norm, so ``norm`` changes nothing.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"RapidNet intermediates are NCHW only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and the head) that ``forward_intermediates(indices)`` does not need.

        Without its head (``prune_head``, or when trailing stages go, since the head's conv needs the last one) the
        model returns the last kept stage's features, unpooled.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head or max_index < len(self.widths) - 1:
            self.head.conv = nn.Identity()
            self.reset_classifier(0, "")
            self.num_features = self.head_hidden_size = self.widths[max_index]
        return take_indices

    # ---- timm model API ------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """Whether training-mode forward returns ``(cls, dist)`` logits (default) or their mean."""
        self.head.distilled_training = enable

    @property
    def distillation(self) -> bool:
        return self.head.fc_dist is not None

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    @torch.jit.ignore
    def reset_classifier(
        self, num_classes: int, global_pool: str | None = None, distillation: bool | None = None
    ) -> None:
        """New (randomly initialised) classifier(s) for ``num_classes``; 0 makes the model return pre-logits.

        ``global_pool=''`` turns pooling off (``forward`` then returns an NCHW map), ``'avg'`` back on.
        """
        if global_pool is not None:
            self.global_pool = self.head.global_pool = _check_global_pool(global_pool)
        self.num_classes = num_classes
        if distillation is None:
            distillation = self.head.fc_dist is not None
        hidden = self.head_hidden_size
        self.head.fc = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()
        self.head.fc_dist = nn.Linear(hidden, num_classes) if distillation and num_classes > 0 else None
        for fc in (self.head.fc, self.head.fc_dist):
            if fc is not None:
                _init_weights(fc)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()  # layer scales, norms and biases are 1-D: timm's optimizer factory already skips them


# --------------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------------


#: stochastic depth of every RapidNet built without an explicit rate (the paper's 0.1): ``rapidnet.create_model``,
#: ``timm.create_model("rapidnet_*")``, the dense builders, and ``model.drop_path_rate`` in configs, which the tasks
#: pass to every backbone, RapidNet or timm peer alike. Eval outputs do not depend on it.
DEFAULT_DROP_PATH_RATE = 0.1

#: the paper's MLDC (dense 3x3 branches of dilation 2 and 3) and FFN kernel: every variant's default
DEFAULT_MLDC: dict[str, Any] = dict(mldc_dilations=(2, 3), mldc_groups=1, ffn_kernel=7)

VARIANTS: dict[str, dict[str, Any]] = {
    "rapidnet_ti": dict(depths=((2, 0), (2, 0), (6, 2), (2, 2)), widths=(32, 64, 112, 224), head_dim=512),
    "rapidnet_s": dict(depths=((3, 0), (3, 0), (9, 3), (3, 3)), widths=(32, 64, 112, 224), head_dim=512),
    "rapidnet_m": dict(depths=((3, 0), (3, 0), (9, 3), (3, 3)), widths=(32, 64, 160, 320), head_dim=512),
    "rapidnet_b": dict(depths=((3, 0), (3, 0), (9, 3), (3, 3)), widths=(64, 128, 224, 416), head_dim=768),
}
