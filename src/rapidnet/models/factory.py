"""``rapidnet.create_model``: the variants through timm, with a local checkpoint as a first-class argument."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any

import timm
from torch import nn

from rapidnet.errors import ConfigError
from rapidnet.models.checkpoint import MAX_CHANS, MAX_CLASSES, MAX_WIDTH
from rapidnet.models.rapidnet import DEFAULT_DROP_PATH_RATE, VARIANTS, RapidNet


def list_variants() -> list[str]:
    return list(VARIANTS)


def is_rapidnet(name: str) -> bool:
    """Whether a model name (optionally with a timm pretrained tag, ``rapidnet_ti.in1k``) is a RapidNet variant."""
    return name.split(".")[0] in VARIANTS


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
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
    reparameterized or not); ``pretrained=True`` fetches the authors' ImageNet weights (online only). Extra keyword
    arguments (``depths``, ``widths``, ``head_dim``, ``drop_rate``, ``use_ema``, ...) reach :class:`RapidNet`.
    """
    if not is_rapidnet(name):
        raise ConfigError(f"unknown model {name!r}: choose one of {', '.join(VARIANTS)}")
    check_rapidnet_args(name, dict(kwargs, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate))
    if checkpoint is not None:
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

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            shown = repr(args[key])
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise ConfigError(f"{name}: {key} must be {what}, got {shown}")

    depths = args.get("depths", VARIANTS[name.split(".")[0]]["depths"])
    widths = args.get("widths", VARIANTS[name.split(".")[0]]["widths"])
    if "depths" in args:
        ok = _seq(depths) and 1 <= len(depths) <= 16 and all(_seq(d) and len(d) == 2 for d in depths)
        need(ok and all(_int(n, 0, 1000) for d in depths for n in d), "depths", "a list of [IR, DC] block counts")
    if "widths" in args:
        ok = _seq(widths) and 1 <= len(widths) <= 16 and all(_int(w, 2, MAX_WIDTH) for w in widths)
        need(ok, "widths", f"a list of stage widths, each 2..{MAX_WIDTH}")
    if "depths" in args or "widths" in args:
        need(len(depths) == len(widths), "widths", f"one width per stage ({len(depths)} stages in depths)")
    ints = {"head_dim": (1, MAX_WIDTH), "num_classes": (0, MAX_CLASSES), "in_chans": (1, MAX_CHANS)}
    for key, (low, high) in ints.items():
        if key in args:
            need(_int(args[key], low, high), key, f"an integer in {low}..{high}")
    for key in ("drop_rate", "drop_path_rate"):
        if key in args:
            need(_number(args[key]) and 0 <= args[key] < 1, key, "a number in [0, 1)")
    if "mlp_ratio" in args:
        need(_number(args["mlp_ratio"]) and 0 < args["mlp_ratio"] <= 16, "mlp_ratio", "a number in (0, 16]")
    if "layer_scale_init" in args:
        need(_number(args["layer_scale_init"]) and abs(args["layer_scale_init"]) <= 1e3, "layer_scale_init", "a number")
    for key in ("distillation", "inference_mode", "features_only"):
        if key in args:
            need(isinstance(args[key], bool), key, "true or false")
    if "global_pool" in args:
        need(args["global_pool"] in ("avg", ""), "global_pool", "'avg' or ''")
    if "mldc_dilations" in args:
        dilations = args["mldc_dilations"]
        ok = _seq(dilations) and 1 <= len(dilations) <= 16 and all(_int(d, 1, 64) for d in dilations)
        need(ok, "mldc_dilations", "a non-empty list of dilations, each 1..64 (e.g. [2, 3])")
    if "mldc_groups" in args:
        groups = args["mldc_groups"]
        need(groups == "depthwise" or _int(groups, 1, MAX_WIDTH), "mldc_groups", "a positive integer or 'depthwise'")
        if groups != "depthwise":
            stages = [w for d, w in zip(depths, widths, strict=False) if _seq(d) and len(d) == 2 and d[1]]
            need(all(w % groups == 0 for w in stages), "mldc_groups", f"a divisor of the stage widths {stages}")
    if "ffn_kernel" in args:
        kernel = args["ffn_kernel"]
        need(_int(kernel, 1, 63) and kernel % 2 == 1, "ffn_kernel", "an odd kernel size 1..63 (it pads to 'same')")


def _seq(value: Any) -> bool:
    return isinstance(value, (list, tuple))


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
