"""Checkpoint metadata: the strings a safetensors file stores, decoded into values and checked before use.

A checkpoint is untrusted input. Every value this project interprets (class names, the eval transform in
``pretrained_cfg``, dense ``eval_args``, RapidNet constructor arguments) is bounded here: JSON trees in depth and
size, sizes and resizes within :mod:`rapidnet.constants`' limits, constructor arguments by the constructor's own rules
(:mod:`rapidnet.models.limits`). A value that does not pass is a one-line
:class:`~rapidnet.errors.CheckpointError` naming the file and the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from rapidnet.constants import (
    CROP_MODES,
    INTERPOLATIONS,
    MAX_CLASSES,
    MAX_NAME_CHARS,
    MAX_RESIZE,
    MAX_SIDE,
    MIN_CROP_PCT,
    MIN_SIDE,
)
from rapidnet.errors import CheckpointError, clip
from rapidnet.models.limits import RULES

__all__ = [
    "check_class_names",
    "check_input_size",
    "check_metadata_value",
    "check_pretrained_cfg",
    "check_resize",
    "decode_metadata",
]


#: metadata values stored as JSON, as integers and as booleans (``"true"``/``"false"``); the rest are plain strings
_JSON_METADATA = {
    "class_names": list,
    "pretrained_cfg": dict,
    "build_args": dict,
    "eval_args": dict,
    "depths": list,
    "widths": list,
    "mldc_dilations": list,
}
_INT_METADATA = ("num_classes", "head_dim", "in_chans", "ffn_kernel")
_BOOL_METADATA = ("distillation", "reparameterized")

#: metadata that stores a RapidNet constructor argument: checked by that argument's rule (rapidnet.models.limits)
_ARG_METADATA = frozenset(
    ("depths", "widths", "num_classes", "head_dim", "in_chans", "mldc_dilations", "mldc_groups", "ffn_kernel")
)

# ---- bounds on what a file may ask for ------------------------------------------------------------------------------
# A checkpoint is untrusted input: the bounds on architectures are the constructor's (rapidnet.models.limits); those
# on eval transforms (MIN_SIDE/MAX_SIDE, MAX_RESIZE, ...) live in rapidnet.constants, where the command line's parsers
# read them without importing torch.

#: JSON metadata: how deep, how long a list and how large a number may be
_MAX_DEPTH, _MAX_ITEMS, _MAX_NUMBER = 8, MAX_CLASSES, 1e9


def decode_metadata(metadata: Mapping[str, Any], source: str | os.PathLike = "checkpoint") -> dict[str, Any]:
    """Stored metadata (strings) as Python values: ``class_names`` a list, ``pretrained_cfg``/``build_args``/
    ``eval_args`` dicts, counts ints, flags bools; anything else stays a string.

    Every value this project interprets is also checked (types, ranges, sizes: :func:`check_metadata_value`), so a
    file cannot make a command resize to 40000 pixels or print a class that does not exist. A value that does not
    decode or does not pass is a one-line :class:`CheckpointError` naming the file and the key.
    """
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if not isinstance(value, str):
            out[key] = value
            continue
        try:
            if key in _JSON_METADATA:
                decoded = json.loads(value)
                kind = _JSON_METADATA[key]
                if not isinstance(decoded, kind):
                    raise ValueError(f"a JSON {type(decoded).__name__}, expected a {kind.__name__}")
            elif key in _INT_METADATA or (key == "mldc_groups" and value != "depthwise"):
                decoded = int(value)
            elif key in _BOOL_METADATA:
                if value not in ("true", "false"):
                    raise ValueError(f"{value[:20]!r}, expected true or false")
                decoded = value == "true"
            else:
                decoded = value
        except (ValueError, RecursionError) as e:  # RecursionError: JSON nested thousands deep
            detail = " ".join(str(e).split())[:80] or type(e).__name__
            raise CheckpointError(f"{source} has unreadable {key!r} metadata ({detail}): re-export it") from None
        try:
            check_metadata_value(key, decoded)
        except ValueError as e:
            detail = " ".join(str(e).split())[:120]
            raise CheckpointError(f"{source} has invalid {key!r} metadata ({detail}): re-export it") from None
        out[key] = decoded
    return out


def check_metadata_value(key: str, value: Any) -> None:
    """Raise ``ValueError`` (a short reason) unless a decoded metadata value is one this project can use safely.

    JSON values are first bounded as trees (depth, list length, string length, finite numbers); then the keys this
    project interprets get their own checks. ``build_args`` of dense models are checked where they are built
    (``rapidnet.models.loading``), against the file's own weights.
    """
    if key in _JSON_METADATA:
        _check_json_tree(value)
    if key == "class_names":
        check_class_names(value)
    elif key == "pretrained_cfg":
        check_pretrained_cfg(value)
    elif key == "eval_args":
        _check_eval_args(value)
    elif key in _ARG_METADATA:  # the constructor's own rules: a file describes only what the constructor takes
        rule = RULES[key]
        _need(rule.ok(value), f"{_short(value)}, expected {rule.what}")
    elif key in ("format", "arch", "task"):
        _need(_is_name(value), f"{value[:40]!r}: expected a name of at most {MAX_NAME_CHARS} printable characters")


def check_class_names(names: Any, count: int | None = None) -> None:
    """Class names: a list of at most :data:`MAX_CLASSES` printable strings of at most :data:`MAX_NAME_CHARS`
    characters, ``count`` of them when given (a name per output of the classifier)."""
    _need(isinstance(names, list) and len(names) <= MAX_CLASSES, f"expected a list of at most {MAX_CLASSES} names")
    bad = next((n for n in names if not _is_name(n, empty=True)), None)
    if bad is not None or any(not isinstance(n, str) for n in names):
        shown = bad[:40] if isinstance(bad, str) else bad
        raise ValueError(f"class name {shown!r}: expected strings of at most {MAX_NAME_CHARS} printable characters")
    if count is not None and count > 0 and len(names) != count:
        raise ValueError(f"{len(names)} class names for the {count} classes of its weights")


def check_pretrained_cfg(cfg: Any) -> None:
    """An eval transform (timm's ``pretrained_cfg`` keys): input sizes of 3 ints with sides in
    :data:`MIN_SIDE`..:data:`MAX_SIDE`, ``mean``/``std`` one number per channel (``std`` positive), ``crop_pct`` in
    [:data:`MIN_CROP_PCT`, 1] (the resize before the crop, ``side / crop_pct``, within :func:`check_resize`),
    ``interpolation`` one of :data:`INTERPOLATIONS`, ``crop_mode`` one of :data:`CROP_MODES`; any other key a short
    scalar or a short list of them (timm's descriptive keys)."""
    _need(isinstance(cfg, dict), f"a {type(cfg).__name__}, expected a dict")
    sizes = ("input_size", "test_input_size", "min_input_size")
    for key in sizes:
        if key in cfg:
            check_input_size(cfg[key], key)
    chans = cfg["input_size"][0] if "input_size" in cfg else 3
    for key, value in cfg.items():
        if key in sizes:
            continue
        if key in ("mean", "std"):
            ok = _is_list(value) and len(value) in (1, chans) and all(_is_number(v, -1e3, 1e3) for v in value)
            _need(ok, f"{key} {_short(value)}: expected {chans} numbers (one per channel)")
            _need(key == "mean" or all(v > 0 for v in value), f"std {_short(value)}: expected positive numbers")
        elif key in ("crop_pct", "test_crop_pct"):
            ok = _is_number(value, MIN_CROP_PCT, 1)
            _need(ok, f"{key} {_short(value)}: expected a number in [{MIN_CROP_PCT}, 1]")
            if "input_size" in cfg:
                check_resize(max(cfg["input_size"][1:]), value)
        elif key == "interpolation":
            names = ", ".join(INTERPOLATIONS)
            _need(value in INTERPOLATIONS, f"interpolation {_short(value)}: expected one of {names}")
        elif key == "crop_mode":
            _need(value in CROP_MODES, f"crop_mode {_short(value)}: expected one of {', '.join(CROP_MODES)}")
        elif key == "num_classes":
            _need(RULES["num_classes"].ok(value), f"num_classes {_short(value)}: expected {RULES['num_classes'].what}")
        elif not (_is_scalar(value) or (_is_list(value) and len(value) <= 16 and all(map(_is_scalar, value)))):
            raise ValueError(f"{key} {_short(value)}: expected a short value")


def check_resize(side: int, crop_pct: float) -> None:
    """The eval transform resizes to ``side / crop_pct`` before its centre crop: at most :data:`MAX_RESIZE` pixels
    (a crop_pct of 0.001 would resize a 224-pixel input to 224000 pixels, 150 GB)."""
    _need(side / crop_pct <= MAX_RESIZE, f"crop_pct {crop_pct} resizes {side} pixels to more than {MAX_RESIZE}")


def check_input_size(value: Any, key: str = "input_size") -> None:
    """``[channels, height, width]``: as many channels as a model's ``in_chans`` may be, sides
    :data:`MIN_SIDE`..:data:`MAX_SIDE`."""
    ok = (
        _is_list(value, 3) and RULES["in_chans"].ok(value[0]) and all(_is_int(v, MIN_SIDE, MAX_SIDE) for v in value[1:])
    )
    _need(ok, f"{key} {_short(value)}: expected [channels, height, width] with sides {MIN_SIDE}..{MAX_SIDE} pixels")


def _check_eval_args(args: dict[str, Any]) -> None:
    """What the dense commands read: ``scale`` (the eval resize) and ``num_classes``."""
    scale = args.get("scale")
    ok = scale is None or (_is_list(scale, 2) and all(_is_int(v, 1, MAX_SIDE) for v in scale))
    _need(ok, f"scale {_short(scale)}: expected null or [long side, short side] of 1..{MAX_SIDE} pixels")
    n = args.get("num_classes")
    _need(n is None or _is_int(n, 1, MAX_CLASSES), f"num_classes {_short(n)}: expected 1..{MAX_CLASSES}")
    for key in ("val_split",):
        _need(args.get(key) is None or _is_name(args[key]), f"{key} {_short(args.get(key))}: expected a name")


def _check_json_tree(value: Any, depth: int = 0) -> None:
    """Bound a decoded JSON value: nesting, list and dict sizes, string lengths, finite numbers of sane size."""
    _need(depth <= _MAX_DEPTH, f"nested more than {_MAX_DEPTH} levels")
    if isinstance(value, (list, dict)):
        _need(len(value) <= _MAX_ITEMS, f"more than {_MAX_ITEMS} entries")
        for item in value.values() if isinstance(value, dict) else value:
            _check_json_tree(item, depth + 1)
        if isinstance(value, dict):
            _need(all(len(k) <= MAX_NAME_CHARS for k in value), f"a key longer than {MAX_NAME_CHARS} characters")
    elif isinstance(value, str):
        _need(len(value) <= 4 * MAX_NAME_CHARS, f"a string longer than {4 * MAX_NAME_CHARS} characters")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        _need(_is_number(value, -_MAX_NUMBER, _MAX_NUMBER), f"the number {_short(value)}")


def _need(ok: bool, reason: str) -> None:
    if not ok:
        raise ValueError(reason)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict, int, float, str, bool, type(None))) else repr(value)
    return clip(text)


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_number(value: Any, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high  # NaN fails


def _is_list(value: Any, length: int | None = None) -> bool:
    return isinstance(value, (list, tuple)) and (length is None or len(value) == length)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 1024)


def _is_name(value: Any, empty: bool = False) -> bool:
    return isinstance(value, str) and (empty or value != "") and len(value) <= MAX_NAME_CHARS and value.isprintable()
