"""Eager CPU inference: :func:`optimize` puts a RapidNet in its fastest form for eager fp32 PyTorch on the CPU.

:func:`rapidnet.reparameterize` gives the plain folded network, which is what every exporter (ONNX, TorchScript,
Core ML, ``torch.export``, int8 quantization) takes. Eager PyTorch on the CPU leaves speed on the table with that
graph, in four places; ``optimize`` takes it back without changing any value beyond float rounding (<= 4e-6 on
RapidNet-Ti logits). The figures are RapidNet-Ti, batch 1, 224x224, 2 threads (``docs/performance.md``):

1. **Conv + GELU as one oneDNN call.** After folding, every unit is a conv followed by exact GELU or by nothing.
   Each becomes a :class:`CpuConvAct`, which calls ``torch.ops.mkldnn._convolution_pointwise`` (the kernel that
   ``torch.compile`` uses on CPU) with GELU as a post-op. GELU then runs on the conv's output while it is still in
   cache, and every conv goes to oneDNN: PyTorch's size heuristic would send small ones (stage 3's 1x1s at batch 1)
   to a slower kernel. 1.09x on the fused model (AMD EPYC, NCHW).
2. **Pre-padded dilated convolutions**, on the path without oneDNN's fused call (e.g. autograd in eager mode). At
   batch 1 PyTorch sends a dense 3x3 dilated conv with an input of at most 20,480 elements (stage 3: 224 x 7 x 7) to
   a naive kernel. Padding the input explicitly makes it large enough for oneDNN: 2.8x per conv. (The fused call of
   item 1 takes the padding as an argument, so needs no copy.)
3. **channels_last weights.** oneDNN otherwise reorders every weight on every call: 21.5 -> 18.9 ms (Intel Xeon).
4. **The channels_last detour.** An NCHW input is copied to channels_last once, every unit then runs in the layout
   oneDNN is fastest in, and the features go back to the caller's layout (NCHW in, NCHW out): 1.3x on NCHW input.
   Applied by swapping the class of a :class:`~rapidnet.RapidNet` (to :class:`CpuRapidNet`) or of a timm
   ``FeatureListNet`` (``features_only=True``, to :class:`CpuFeatureListNet`); other wrappers get items 1 and 2
   only, and keep their weights' layout (channels_last weights would otherwise leak their layout into the outputs).

Each of these steps is for eager fp32 CPU inference only. Whenever autograd needs the graph (grad mode with a
tensor that requires grad), autocast, ``torch.jit`` tracing or scripting, ``torch.fx`` tracing, ``torch.compile``,
``torch.export``, ONNX export, a non-CPU device, another dtype, or a tensor dispatch mode (``FlopCounterMode`` and
other observers) is active, every module here runs plain ``conv2d`` (+ ``gelu``) with the conv's own padding, so
what those tools see is the plain folded graph. Still, export the plain model: ``rapidnet.reparameterize``, or
:func:`deoptimize_` to undo this pass (``rapidnet.deploy.prepare_model`` does both).

``optimize(model)`` returns an optimized *copy* and leaves ``model`` untouched (like ``reparameterize``);
``optimize_(model)`` works in place and returns the same object. Both fold first (``reparameterize_``) when the model
is not folded yet, and both are idempotent. The state dict keeps its keys and values (only the weights' memory
layout changes), so an optimized model saves like the plain folded one.
"""

import copy

import torch
import torch.nn.functional as F
from timm.models import FeatureListNet
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from rapidnet.models.rapidnet import ConvNormAct, RapidNet
from rapidnet.models.reparam import reparameterize_

__all__ = ["CpuConvAct", "CpuFeatureListNet", "CpuRapidNet", "deoptimize_", "is_optimized", "optimize", "optimize_"]


def _onednn_conv_act_available() -> bool:
    try:
        torch.ops.mkldnn._convolution_pointwise.default  # noqa: B018 (probe: present in builds with oneDNN)
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available()


_ONEDNN_CONV_ACT = _onednn_conv_act_available()

try:  # torch.fx's symbolic tracing (torch >= 2.5 names it apart from export, without a warning on every call)
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:  # pragma: no cover (older torch)
    from torch.fx._symbolic_trace import is_fx_tracing

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _unobserved() -> bool:
    """Nothing traces, scripts, compiles, exports or observes the ops (plain eager execution)."""
    return not (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _is_exporting()
        or torch.onnx.is_in_onnx_export()
        or is_in_torch_dispatch_mode()  # FLOP counters, fake tensors and other tensor-level observers
    )


def _eager_cpu(x: torch.Tensor) -> bool:
    """Plain eager execution on the CPU."""
    return not is_fx_tracing() and x.device.type == "cpu" and _unobserved()


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a folded conv may call oneDNN's conv+activation kernel directly: eager fp32 CPU inference only
    (no autograd, autocast, tracing, scripting, compilation, export or dispatch mode, which all need plain conv2d).
    Cheapest checks first (but FX's proxies first of all: they cannot be asked): this runs before every unit."""
    return (
        _ONEDNN_CONV_ACT
        and not is_fx_tracing()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 4
        and torch.backends.mkldnn.enabled
        and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and not torch.is_autocast_enabled("cpu")
        and _unobserved()
    )


class CpuConvAct(nn.Module):
    """A folded RapidNet unit (conv with bias, then exact GELU or nothing) for eager CPU inference.

    Eager fp32 CPU inference: one oneDNN ``_convolution_pointwise`` call. Otherwise plain ``conv2d`` (+ ``gelu``),
    with the input of a dense dilated conv padded explicitly in plain eager CPU execution (see the module notes).
    Holds the original ``conv`` under the same name, so the state dict is that of the folded ``ConvNormAct``.
    """

    def __init__(self, conv: nn.Conv2d, gelu: bool) -> None:
        super().__init__()
        self.conv = conv
        self.gelu = gelu
        self.post_op = "gelu" if gelu else "none"
        ph, pw = conv.padding  # type: ignore[misc]
        dilated_dense = conv.dilation != (1, 1) and conv.groups == 1 and (ph > 0 or pw > 0)
        self.prepad: list[int] | None = [pw, pw, ph, ph] if dilated_dense else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # TorchScript skips only a bare is_scripting() branch: keep it bare
            if _use_onednn(x, self.conv.weight):
                return self._forward_onednn(x)
            if self.prepad is not None and _eager_cpu(x):
                return self._forward_prepadded(x)
        x = self.conv(x)
        return F.gelu(x) if self.gelu else x

    @torch.jit.unused
    def _forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
            self.post_op, [], "none",
        )  # fmt: skip

    @torch.jit.unused
    def _forward_prepadded(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        x = F.conv2d(F.pad(x, self.prepad), conv.weight, conv.bias, conv.stride, 0, conv.dilation, conv.groups)
        return F.gelu(x) if self.gelu else x

    def reparameterize(self) -> None:
        """Already folded: nothing to do (so ``reparameterize_`` may run over an optimized model)."""

    def extra_repr(self) -> str:
        return f"post_op={self.post_op!r}, prepad={self.prepad}"


def _wants_channels_last(model: nn.Module, x: torch.Tensor) -> bool:
    """An NCHW input to an optimized model in eager fp32 CPU inference: the case for the channels_last detour."""
    if not isinstance(model, (CpuRapidNet, CpuFeatureListNet)) or is_fx_tracing():
        return False
    if x.dim() != 4 or not x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return False
    weight = next(model.parameters(), None)
    return weight is not None and _use_onednn(x, weight)


class CpuRapidNet(RapidNet):
    """A :class:`~rapidnet.RapidNet` after :func:`optimize`: NCHW input runs in channels_last inside."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript skips only a bare is_scripting() branch)
            if _wants_channels_last(self, x):
                # one copy of the input, then every unit in oneDNN's preferred layout; NCHW features back out
                return self.stages(self.stem(x.contiguous(memory_format=torch.channels_last))).contiguous()
        return self.stages(self.stem(x))


class CpuFeatureListNet(FeatureListNet):
    """A timm ``FeatureListNet`` over RapidNet after :func:`optimize`: NCHW input runs in channels_last inside."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript skips only a bare is_scripting() branch)
            if _wants_channels_last(self, x):
                features = self._collect(x.contiguous(memory_format=torch.channels_last))
                return [f.contiguous() for f in features.values()]
        return list(self._collect(x).values())


_DETOUR_CLASSES: dict[type[nn.Module], type[nn.Module]] = {RapidNet: CpuRapidNet, FeatureListNet: CpuFeatureListNet}


def _foldable_act(act: nn.Module) -> bool | None:
    """True for exact GELU, False for no activation, None for anything oneDNN's post-op would not reproduce."""
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return True
    return False if isinstance(act, nn.Identity) else None


def is_optimized(model: nn.Module) -> bool:
    """Whether ``model`` holds any module of this pass."""
    return any(isinstance(m, (CpuConvAct, CpuRapidNet, CpuFeatureListNet)) for m in model.modules())


def optimize_(model: nn.Module) -> nn.Module:
    """The eager-CPU inference pass, in place (see the module notes); returns ``model``, in eval mode."""
    reparameterize_(model)
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ConvNormAct) and isinstance(child.bn, nn.Identity):
                gelu = _foldable_act(child.act)
                if gelu is not None:
                    setattr(parent, name, CpuConvAct(child.conv, gelu))
                    swapped += 1
    detour = _DETOUR_CLASSES.get(type(model))
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if detour is not None and on_cpu and (swapped or is_optimized(model)):
        model.__class__ = detour
        model.to(memory_format=torch.channels_last)  # 4-D weights only; values unchanged
    return model


def optimize(model: nn.Module) -> nn.Module:
    """An eager-CPU-optimized, folded copy of ``model`` (see the module notes); ``model`` itself is untouched."""
    return optimize_(copy.deepcopy(model))


def deoptimize_(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize_` in place: plain folded ``ConvNormAct`` units, plain classes, contiguous weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, CpuConvAct):
                conv = child.conv
                unit = ConvNormAct(
                    conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.dilation[0],
                    conv.groups, act=child.gelu, inference_mode=True,
                )  # fmt: skip
                unit.conv = conv
                setattr(parent, name, unit.to(conv.weight.device))
    for module in model.modules():
        if type(module) in (CpuRapidNet, CpuFeatureListNet):
            module.__class__ = RapidNet if isinstance(module, CpuRapidNet) else FeatureListNet
    return model.to(memory_format=torch.contiguous_format)
