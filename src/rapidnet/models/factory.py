"""The variants: timm's entry points (``timm.create_model("rapidnet_ti")``) and ``rapidnet.create_model``, which
takes a local checkpoint as a first-class argument. Every RapidNet with or without weights is built here, once,
through timm's ``build_model_with_cfg``."""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import nn

from rapidnet.errors import ConfigError
from rapidnet.models.checkpoint import Checkpoint, checkpoint_filter_fn, read_pretrained
from rapidnet.models.limits import ArgumentError, check_args
from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE, DEFAULT_MLDC, VARIANTS, RapidNet

__all__ = ["check_rapidnet_args", "create_model", "default_cfgs", "is_rapidnet", "list_variants"]

# ---- timm's entry points -------------------------------------------------------------------------------------------


def _cfg(filename: str, **kwargs: Any) -> dict[str, Any]:
    """timm pretrained config: the authors' published ImageNet-1K weights and their eval transform."""
    return {
        "hf_hub_id": "SLDGroup/RapidNet",
        "hf_hub_filename": filename,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0.conv",
        "classifier": ("head.fc", "head.fc_dist"),
        "license": "unknown (see the authors' repository)",
        "paper_ids": "arXiv:2412.10995",
        "paper_name": "RapidNet: Multi-Level Dilated Convolution Based Mobile Backbone",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "rapidnet_ti.in1k": _cfg("RapidNet_Ti.pth"),
        "rapidnet_s.in1k": _cfg("RapidNet_S.pth"),
        "rapidnet_m.in1k": _cfg("RapidNet_M.pth"),
        "rapidnet_b.in1k": _cfg("RapidNet_B.pth"),
    }
)


def _create_rapidnet(variant: str, pretrained: bool = False, **kwargs: Any) -> RapidNet:
    """Build a variant with timm's ``build_model_with_cfg``: the ``pretrained_cfg`` and its overlays, loading the
    weights (``load_pretrained``, through :func:`~rapidnet.models.checkpoint.checkpoint_filter_fn`: the fit check,
    the classifier, the stem for other input channels) and ``features_only`` (a ``FeatureListNet`` of the four
    stages, or any ``feature_cls``) are all timm's.

    Reading the weights is ours, into one :class:`~rapidnet.models.checkpoint.Checkpoint`: the ``checkpoint``
    keyword's record (``rapidnet.create_model`` and ``rapidnet.load`` pass the one they read), else weights in
    memory (the overlay's ``state_dict``), else the pretrained config's ``file`` or the authors' hub file
    (:func:`~rapidnet.models.checkpoint.read_pretrained`). timm 1.0.31's ``load_state_dict`` does read the authors'
    training checkpoints, but: its errors are bare or many lines where ours are one line; ``load_pretrained`` passes
    it no ``use_ema``; it tells safetensors by the suffix only and drops their metadata; it knows no ``module``/``net``
    wrappers; and it reads after the model is built, too late for a reparameterized file, whose model must be built
    folded (``inference_mode=True``), or for a file of an MLDC ablation, which builds that ablation. The record's
    class count and input channels go into the pretrained config (timm drops the classifier whenever the model's
    class count differs from the config's, and adapts the stem to other input channels).
    """
    record: Checkpoint | None = kwargs.pop("checkpoint", None)
    if record is not None and not isinstance(record, Checkpoint):
        raise TypeError(
            f"checkpoint= takes a rapidnet Checkpoint record, not a {type(record).__name__}: pass a file as "
            "pretrained_cfg_overlay=dict(file=PATH), or use rapidnet.create_model(checkpoint=PATH)"
        )
    use_ema = kwargs.pop("use_ema", True)
    kwargs.setdefault("drop_path_rate", DEFAULT_DROP_PATH_RATE)
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    in_memory = overlay.pop("state_dict", None)
    feature_cfg = {"flatten_sequential": True, "out_indices": (0, 1, 2, 3), **(kwargs.pop("feature_cfg", None) or {})}
    filter_fn = checkpoint_filter_fn
    if pretrained:
        cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
        if record is None and in_memory is not None:
            # the MLDC dilations are not in the weights' shapes, and weights in memory carry no metadata
            dilations = kwargs.get("mldc_dilations", DEFAULT_MLDC["mldc_dilations"])
            record = Checkpoint.from_state_dict(in_memory, mldc_dilations=dilations)
        elif record is None:
            record = read_pretrained(cfg, use_ema=use_ema)
        record = record.as_rapidnet()
        arch = record.arch
        assert arch is not None
        if record.path is not None:
            overlay["file"] = record.path
        for key, value in arch.mldc_args.items():  # a file of an ablation builds that ablation
            asked = kwargs.setdefault(key, value)
            if (tuple(asked) if key == "mldc_dilations" else asked) != value:
                raise ValueError(f"{overlay.get('file', 'the weights')} have {key} {value}, not {asked}")
        # timm deep-copies its pretrained config (``PretrainedCfg.to_dict`` is ``dataclasses.asdict``): a one-entry
        # stand-in takes ``load_pretrained`` down its in-memory path, and the filter, bound to the record, hands it
        # the record's weights fitted to the model
        overlay.update(
            state_dict={"checkpoint": record.name},
            num_classes=arch.num_classes,
            input_size=(arch.in_chans, *cfg["input_size"][1:]),
        )
        if arch.reparameterized:
            kwargs["inference_mode"] = True
        filter_fn = functools.partial(checkpoint_filter_fn, checkpoint=record)
    model = build_model_with_cfg(
        RapidNet,
        variant,
        pretrained,
        pretrained_cfg_overlay=overlay,
        pretrained_filter_fn=filter_fn,
        feature_cfg=feature_cfg,
        **dict(VARIANTS[variant], **kwargs),
    )
    model.pretrained_cfg.pop("state_dict", None)  # loaded: the config keeps the file's name, not the stand-in
    return model


@register_model
def rapidnet_ti(pretrained: bool = False, **kwargs: Any) -> RapidNet:
    """RapidNet-Ti: 76.3% ImageNet-1K top-1 at 0.9 ms on an iPhone 13 mini NPU (paper)."""
    return _create_rapidnet("rapidnet_ti", pretrained, **kwargs)


@register_model
def rapidnet_s(pretrained: bool = False, **kwargs: Any) -> RapidNet:
    """RapidNet-S: Ti's widths, deeper stages."""
    return _create_rapidnet("rapidnet_s", pretrained, **kwargs)


@register_model
def rapidnet_m(pretrained: bool = False, **kwargs: Any) -> RapidNet:
    """RapidNet-M: S's depths, wider stages 2 and 3."""
    return _create_rapidnet("rapidnet_m", pretrained, **kwargs)


@register_model
def rapidnet_b(pretrained: bool = False, **kwargs: Any) -> RapidNet:
    """RapidNet-B: the widest variant."""
    return _create_rapidnet("rapidnet_b", pretrained, **kwargs)


# ---- rapidnet.create_model -----------------------------------------------------------------------------------------


def list_variants() -> list[str]:
    return list(VARIANTS)


def is_rapidnet(name: str) -> bool:
    """Whether a model name (optionally with a timm pretrained tag, ``rapidnet_ti.in1k``) is a RapidNet variant."""
    return name.split(".")[0] in VARIANTS


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | Checkpoint | None = None,
    num_classes: int = 1000,
    distillation: bool = True,
    in_chans: int = 3,
    drop_path_rate: float = DEFAULT_DROP_PATH_RATE,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    **kwargs: Any,
) -> nn.Module:
    """Build a RapidNet variant, optionally with weights.

    ``checkpoint=PATH`` loads any supported file (the authors' formats, this project's safetensors/torch files,
    reparameterized or not), or a :class:`~rapidnet.models.checkpoint.Checkpoint` already read (``rapidnet.load``
    hands over its own); ``pretrained=True`` fetches the authors' ImageNet weights (online only). Extra keyword
    arguments (``depths``, ``widths``, ``head_dim``, ``drop_rate``, ``use_ema``, ...) reach :class:`RapidNet`.
    """
    if not is_rapidnet(name):
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(VARIANTS)}")
    check_rapidnet_args(name, dict(kwargs, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate))
    if isinstance(checkpoint, Checkpoint):
        kwargs["checkpoint"] = checkpoint  # read already: the build takes the record as it is
        pretrained = True
    elif checkpoint is not None:
        if not str(os.fspath(checkpoint)).strip():  # "" would mean "no file": the authors' weights from the hub
            raise ConfigError(f"checkpoint={checkpoint!r} names no file: pass a path, or None for no weights")
        overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {}, file=os.fspath(checkpoint))
        kwargs["pretrained_cfg_overlay"] = overlay
        pretrained = True
    if features_only:
        kwargs.update(features_only=True, out_indices=tuple(out_indices))
    return timm.create_model(
        name,
        pretrained=pretrained,
        num_classes=num_classes,
        distillation=distillation,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        **kwargs,
    )


#: keyword arguments that timm's builders (``timm.create_model``, ``build_model_with_cfg``) and the variant
#: factories take beside :class:`RapidNet`'s own
_BUILDER_ARGS = frozenset(
    {
        "cache_dir",
        "checkpoint_path",
        "exportable",
        "feature_cfg",
        "feature_cls",
        "flatten_sequential",
        "no_jit",
        "out_indices",
        "output_fmt",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "scriptable",
        "use_ema",
    }
)


def check_rapidnet_args(name: str, args: Mapping[str, Any]) -> None:
    """A one-line :class:`ConfigError` for a RapidNet argument of the wrong name, type or range.

    These arrive from YAML (``model.kwargs``, ``--set``) and stored ``build_args``; checked here, ``depths: bogus``
    names the key instead of failing deep inside a constructor, and no width asks for gigabytes.
    """
    own = [p for p in inspect.signature(RapidNet.__init__).parameters if p != "self"]
    unknown = sorted(k for k in args if k not in own and k not in _BUILDER_ARGS)
    if unknown:
        raise ConfigError(f"{name} takes no argument {unknown[0]!r}: RapidNet's are {', '.join(own)}")

    variant = VARIANTS[name.split(".")[0]]
    try:
        check_args(args, defaults={"depths": variant["depths"], "widths": variant["widths"]})
    except ArgumentError as e:
        raise ConfigError(f"{name}: {e}") from None
