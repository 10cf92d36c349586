"""Checkpoints: reading one into a :class:`Checkpoint` record, the authors' key names, checking, fitting, writing.

Every way of loading weights starts from :func:`read_checkpoint_file`, which reads a file once into a
:class:`Checkpoint`: its weights with wrappers and prefixes removed, its metadata (decoded and checked on first use).
A RapidNet's record is completed once by :meth:`Checkpoint.as_rapidnet` (the weights in this project's key names, the
architecture read off them within the constructor's limits) and handed as it is to the one build through timm
(``rapidnet.models.factory``), whose ``pretrained_filter_fn`` (:func:`checkpoint_filter_fn`) fits the record's
weights to the model. ``rapidnet.load`` (``rapidnet.models.loading``) dispatches on what a record holds.

Every file is read with ``torch.load(..., weights_only=True)`` (``argparse.Namespace`` is allow-listed because the
authors' training checkpoints store their arguments that way) or with safetensors, so a pickle that would run code is
refused (:func:`rapidnet.utils.read_checkpoint`). Problems surface as one-line :class:`~rapidnet.errors.CheckpointError`
messages.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

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
from rapidnet.errors import CheckpointError
from rapidnet.models.limits import RULES, ArgumentError, check_args
from rapidnet.models.rapidnet import RapidNet
from rapidnet.models.spec import ArchSpec, infer_arch, mldc_branch_count, model_arch
from rapidnet.utils import atomic_write, read_checkpoint, unwrap_model

__all__ = [
    "CROP_MODES",
    "INTERPOLATIONS",
    "MAX_CLASSES",
    "MAX_NAME_CHARS",
    "MAX_RESIZE",
    "MAX_SIDE",
    "MIN_CROP_PCT",
    "MIN_SIDE",
    "Checkpoint",
    "adapt_classifier",
    "check_class_names",
    "check_input_size",
    "check_metadata_value",
    "check_pretrained_cfg",
    "check_resize",
    "check_shapes",
    "check_tensor_dtypes",
    "check_tensor_values",
    "checkpoint_filter_fn",
    "convert_official",
    "decode_metadata",
    "fit_state_dict",
    "hub_weights_file",
    "is_features_model",
    "is_official_format",
    "load_state_dict_file",
    "load_timm_checkpoint",
    "load_timm_weights",
    "model_metadata",
    "read_checkpoint_file",
    "read_pretrained",
    "save_weights",
    "strip_prefix",
    "to_own_keys",
    "unwrap_state_dict",
]

_logger = logging.getLogger("rapidnet")

# Which nested entry of a checkpoint dict holds the weights, in order of preference.
_EMA_KEYS = ("state_dict_ema", "model_ema")
_RAW_KEYS = ("state_dict", "model", "module", "net")

# ---- the record: one read of a checkpoint --------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read once: what every way of loading weights works from, so that nothing is read, converted or
    worked out twice.

    ``rapidnet.load``, ``rapidnet.create_model(checkpoint=...)``, timm's ``pretrained=True`` (a pretrained config's
    ``file``, or the authors' file on the hub) and the readers of a timm model's weights all read files with
    :func:`read_checkpoint_file`. A RapidNet's record is completed by :meth:`as_rapidnet` and handed on, as it is, to
    the build (``rapidnet.create_model`` takes it as ``checkpoint``).
    """

    #: the file's path as given; ``None`` for weights handed over in memory
    path: str | None
    #: the weights, wrappers and ``module.``/``_orig_mod.`` prefixes removed: in this project's key names once
    #: :meth:`as_rapidnet` has converted them (a timm or dense model's keys stay as stored)
    state_dict: dict[str, torch.Tensor]
    #: the metadata as stored (strings: safetensors metadata, or the ``rapidnet`` entry of a torch file)
    stored: dict[str, str] = field(default_factory=dict, repr=False)
    #: the RapidNet architecture read off the weights (:meth:`as_rapidnet`), within the constructor's limits
    arch: ArchSpec | None = None
    #: :attr:`metadata` once decoded
    _metadata: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, Any], mldc_dilations: Any = None) -> Checkpoint:
        """Weights handed over in memory (timm's ``pretrained_cfg_overlay=dict(state_dict=...)``). They carry no
        metadata, so the MLDC dilations, which weights do not show, are the caller's."""
        metadata = {} if mldc_dilations is None else {"mldc_dilations": list(mldc_dilations)}
        return cls(None, strip_prefix(unwrap_state_dict(state_dict)), _metadata=metadata)

    @property
    def name(self) -> str:
        """What messages call it: the path, or "checkpoint" for weights in memory."""
        return self.path if self.path is not None else "checkpoint"

    @property
    def metadata(self) -> dict[str, Any]:
        """The stored metadata decoded and checked (:func:`decode_metadata`), once, on first use: a reader that never
        interprets it (a timm model's weights for fine-tuning) does not refuse a file for it."""
        decoded = self._metadata
        if decoded is None:
            decoded = decode_metadata(self.stored, self.name)
            object.__setattr__(self, "_metadata", decoded)  # a cache: the record's content does not change
        return decoded

    @property
    def kind(self) -> str:
        """What the file holds: ``classification`` unless its metadata names a ``task``."""
        return self.metadata.get("task") or "classification"

    def as_rapidnet(self) -> Checkpoint:
        """The record of a RapidNet: the weights in this project's key names and the architecture read off them
        (depths, widths, head, classes, MLDC settings), which must be one the constructor takes. Done once: a
        record that has its architecture is returned as it is."""
        if self.arch is not None:
            return self
        state_dict = to_own_keys(self.state_dict)
        arch = infer_arch(state_dict, self.metadata)
        try:
            check_args(arch.build_args)
        except ArgumentError as e:
            raise CheckpointError(f"{self.name} describes no buildable RapidNet ({e}): is the file damaged?") from None
        return replace(self, state_dict=state_dict, arch=arch, _metadata=self.metadata)


def read_checkpoint_file(path: str | os.PathLike, use_ema: bool = True) -> Checkpoint:
    """Read a checkpoint file into a :class:`Checkpoint`: the EMA weights of a training checkpoint first when asked
    and present, else the raw ones, else the bare dict; every tensor finite and unquantized; the metadata
    (safetensors metadata, or the ``rapidnet`` entry of a torch file) kept for :attr:`Checkpoint.metadata`."""
    obj, stored = read_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("rapidnet"), Mapping):
        stored = {**{k: str(v) for k, v in obj["rapidnet"].items()}, **stored}
    state_dict = strip_prefix(unwrap_state_dict(obj, use_ema=use_ema))
    check_tensor_values(state_dict, path)
    return Checkpoint(os.fspath(path), state_dict, stored)


def read_pretrained(pretrained_cfg: Mapping[str, Any], use_ema: bool = True) -> Checkpoint:
    """The checkpoint a timm pretrained config names: its ``file``, else the authors' file on the hub
    (:func:`hub_weights_file`)."""
    return read_checkpoint_file(pretrained_cfg.get("file") or hub_weights_file(pretrained_cfg), use_ema=use_ema)


def load_state_dict_file(
    path: str | os.PathLike, use_ema: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A checkpoint file's weights in this project's key names and its metadata as stored (strings).

    Kept for the callers of the public API from before :class:`Checkpoint`: it reads through
    :func:`read_checkpoint_file`.
    """
    record = read_checkpoint_file(path, use_ema=use_ema)
    return to_own_keys(record.state_dict), record.stored


# ---- unwrapping and checking tensors -------------------------------------------------------------------------------


def unwrap_state_dict(obj: Any, use_ema: bool = True) -> dict[str, torch.Tensor]:
    """Find the weights in a checkpoint: EMA weights first when asked and present, else the raw ones, else bare."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of weights")
    keys = (*_EMA_KEYS, *_RAW_KEYS) if use_ema else _RAW_KEYS
    for key in keys:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        found = ", ".join(sorted(map(str, obj.keys()))[:8])
        raise CheckpointError(f"no weights found in checkpoint (top-level keys: {found}): is it a model checkpoint?")
    return tensors


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = ("module.", "_orig_mod.")):
    """Remove DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    out = {}
    for k, v in state_dict.items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def check_tensor_values(state_dict: Mapping[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Every float tensor finite, every tensor a plain float, integer or bool one: a NaN or inf weight, or a quantized
    tensor, would otherwise load and give NaN or meaningless predictions with no error."""
    for key, value in state_dict.items():
        if value.is_floating_point() or value.is_complex():
            if value.numel() and not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise CheckpointError(
                    f"{source}: tensor {key} holds {bad} NaN or infinite value(s): the weights are corrupt (a "
                    "diverged run?); use an earlier checkpoint"
                )
        elif value.dtype not in _PLAIN_DTYPES:
            raise CheckpointError(
                f"{source}: tensor {key} is {value.dtype}, not a float, integer or bool tensor: a quantized or "
                "converted file; pass the float weights it was made from"
            )


def check_tensor_dtypes(
    state_dict: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """A float weight of the model must come from a float tensor: an int8 tensor would be cast, not dequantized."""
    for key, value in state_dict.items():
        mine = own.get(key)
        if mine is not None and mine.is_floating_point() and not value.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key} is {value.dtype} where the model holds {mine.dtype}: an int8 or other "
                "quantized file; pass the float weights it was made from"
            )


_PLAIN_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# ---- official -> rapidnet key names --------------------------------------------------------------------------------

_STEM = {
    "stem.stem.0.": "stem.0.conv.",
    "stem.stem.1.": "stem.0.bn.",
    "stem.stem.3.": "stem.1.conv.",
    "stem.stem.4.": "stem.1.bn.",
}
_INVERTED_RESIDUAL = {
    "dws.pw1.": "expand.conv.",
    "dws.norm1.": "expand.bn.",
    "dws.dw.": "dw.conv.",
    "dws.norm2.": "dw.bn.",
    "dws.pw2.": "project.conv.",
    "dws.norm3.": "project.bn.",
}
_DILATED = {
    "mixer.cpe.pe.": "mixer.cpe.pe.",
    "mixer.cpe.reparam_conv.": "mixer.cpe.pe.",  # identity subtracted below
    "mixer.fc1.0.": "mixer.fc1.conv.",
    "mixer.fc1.1.": "mixer.fc1.bn.",
    "mixer.graph_conv.nn.0.": "mixer.branches.0.conv.",  # dilation 2
    "mixer.graph_conv.nn.1.": "mixer.branches.0.bn.",
    "mixer.graph_conv.nn_2.0.": "mixer.branches.1.conv.",  # dilation 3
    "mixer.graph_conv.nn_2.1.": "mixer.branches.1.bn.",
    "mixer.fc2.0.": "mixer.fc2.conv.",
    "mixer.fc2.1.": "mixer.fc2.bn.",
    "ffn.conv.conv.": "ffn.dw.conv.",
    "ffn.norm1.": "ffn.dw.bn.",
    "ffn.fc1.": "ffn.fc1.conv.",
    "ffn.norm2.": "ffn.fc1.bn.",
    "ffn.fc2.": "ffn.fc2.conv.",
    "ffn.norm3.": "ffn.fc2.bn.",
    "layer_scale_1": "layer_scale1.gamma",
    "layer_scale_2": "layer_scale2.gamma",
}
_HEAD = {
    "prediction.1.": "head.conv.conv.",
    "prediction.2.": "head.conv.bn.",
    "head.": "head.fc.",
    "dist_head.": "head.fc_dist.",
}
_OFFICIAL_BLOCK = re.compile(r"^backbone\.(\d+)\.(\d+)\.(.*)$")


def is_official_format(state_dict: Mapping[str, Any]) -> bool:
    return any(k.startswith(("backbone.", "stem.stem.", "prediction.")) for k in state_dict)


def _replace_prefix(key: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return None


def convert_official(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the authors' keys to this project's, reshape layer scales and 1x1-conv classifiers to timm's forms.

    An already reparameterized CPE (``mixer.cpe.reparam_conv``, identity folded in) is turned back into ``pe`` by
    subtracting the identity, so every official checkpoint loads into the training-form model.
    """
    dilated_blocks = {
        m.group(1, 2)
        for k in state_dict
        if (m := _OFFICIAL_BLOCK.match(k)) and m.group(3).startswith(("mixer.", "ffn."))
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new: str | None
        if (m := _OFFICIAL_BLOCK.match(key)) is not None:
            stage, index, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if stage > 0 and index == 0:
                new = _replace_prefix(rest, {"conv.0.": "conv.", "conv.1.": "bn."})
                new = f"stages.{stage}.downsample.{new}" if new else None
            else:
                table = (
                    _DILATED
                    if (m.group(1), m.group(2)) in dilated_blocks
                    else {**_INVERTED_RESIDUAL, "layer_scale_1": "layer_scale.gamma"}
                )
                new = _replace_prefix(rest, table)
                block = index - 1 if stage > 0 else index
                new = f"stages.{stage}.blocks.{block}.{new}" if new else None
            if new is not None and new.endswith("gamma"):
                value = value.reshape(-1)
            if "cpe.reparam_conv.weight" in key:
                value = value.clone()
                centre = value.shape[-1] // 2
                value[:, 0, centre, centre] -= 1.0
        else:
            new = _replace_prefix(key, _STEM) or _replace_prefix(key, _HEAD)
            if new is not None and new.startswith("head.fc") and value.ndim == 4:
                value = value.flatten(1)
        if new is None:
            raise CheckpointError(f"unexpected key {key!r} in an official RapidNet checkpoint: is it a RapidNet file?")
        out[new] = value
    return out


#: files written before MLDC became a parameter name its two branches by their dilation
_LEGACY_BRANCH = re.compile(r"^(.*\.mixer\.)conv_d([23])\.(.*)$")


def _rename_legacy_branches(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``mixer.conv_d2.`` / ``mixer.conv_d3.`` -> ``mixer.branches.0.`` / ``.1.``: this project's files from before
    MLDC was a parameter."""
    out = {}
    for key, value in state_dict.items():
        if (m := _LEGACY_BRANCH.match(key)) is not None:
            key = f"{m.group(1)}branches.{int(m.group(2)) - 2}.{m.group(3)}"
        out[key] = value
    return out


def to_own_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Weights (unwrapped, prefixes removed) in this project's key names: the authors' converted, this project's older
    MLDC branch names renamed, anything else as it is."""
    return convert_official(state_dict) if is_official_format(state_dict) else _rename_legacy_branches(state_dict)


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module | None = None, checkpoint: Checkpoint | None = None
) -> dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for RapidNet: unwrap, strip ``module.``, convert the authors' keys; and, given
    the model, check that the weights fit it and adapt the classifier (:func:`fit_state_dict`).

    Idempotent: weights already in this project's key names pass through unchanged. The factory binds
    ``checkpoint``, the record it builds from: the weights fitted are then that record's, already converted and with
    their architecture read, and ``state_dict`` is only the stand-in timm was handed for them (timm deep-copies a
    pretrained config, weights and all).
    """
    if checkpoint is not None:
        return fit_state_dict(checkpoint.state_dict, model, checkpoint.name, checkpoint.arch)
    sd = to_own_keys(strip_prefix(unwrap_state_dict(state_dict)))
    if isinstance(model, RapidNet):
        source = (getattr(model, "pretrained_cfg", None) or {}).get("file") or "checkpoint"
        sd = fit_state_dict(sd, model, str(source))
    return sd


# ---- metadata ------------------------------------------------------------------------------------------------------

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
    return text if len(text) <= 40 else text[:37] + "..."


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


def hub_weights_file(pretrained_cfg: Mapping[str, Any]) -> str:
    """The local path of the authors' weights named by a ``pretrained_cfg`` (downloaded once, then cached).

    Offline (``HF_HUB_OFFLINE=1``, read at call time) only the cache is consulted; a miss is a one-line error that
    says to pass ``checkpoint=PATH``.
    """
    repo, filename = pretrained_cfg.get("hf_hub_id"), pretrained_cfg.get("hf_hub_filename")
    if not repo or not filename:
        raise CheckpointError("no pretrained weights are known for this model: pass checkpoint=PATH")
    try:
        from huggingface_hub import hf_hub_download  # optional dependency (rapidnet[hub])

        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        return hf_hub_download(repo, filename, local_files_only=offline, etag_timeout=5)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0][:100]
        raise CheckpointError(
            f"could not fetch the authors' weights {repo}/{filename} ({type(e).__name__}: {reason}): "
            "offline, download them elsewhere and pass checkpoint=PATH"
        ) from None


# ---- fitting weights to a model ------------------------------------------------------------------------------------


def adapt_classifier(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Make the checkpoint's classifier(s) fit the model, saying what was done in one log line.

    - other class count: drop the classifier(s) (fine-tuning starts from a fresh head);
    - distilled checkpoint, single-head model: one head equal to the mean of both (same eval logits);
    - single-head checkpoint, distilled model: the distillation head starts as a copy of the head.
    """
    sd = dict(state_dict)
    ck_classes = sd["head.fc.weight"].shape[0] if "head.fc.weight" in sd else 0
    has_dist = "head.fc_dist.weight" in sd
    fc_keys = [k for k in sd if k.startswith(("head.fc.", "head.fc_dist."))]
    if model.num_classes != ck_classes:
        for k in fc_keys:
            del sd[k]
        if model.num_classes > 0:
            _logger.info(
                "%s: %d classes, model has %d: classifier dropped and initialised afresh",
                source,
                ck_classes,
                model.num_classes,
            )
        return sd
    if has_dist and not model.distillation:
        sd["head.fc.weight"] = (sd["head.fc.weight"] + sd.pop("head.fc_dist.weight")) / 2
        sd["head.fc.bias"] = (sd["head.fc.bias"] + sd.pop("head.fc_dist.bias")) / 2
        _logger.info("%s: distillation head merged into the classifier (mean of both, as in eval)", source)
    elif model.distillation and not has_dist and ck_classes > 0:
        sd["head.fc_dist.weight"] = sd["head.fc.weight"].clone()
        sd["head.fc_dist.bias"] = sd["head.fc.bias"].clone()
        _logger.info("%s: no distillation head in the checkpoint: it starts as a copy of the classifier", source)
    return sd


def fit_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, source: str, arch: ArchSpec | None = None
) -> dict[str, torch.Tensor]:
    """Check that a converted state dict is this RapidNet's, with one-line errors, and adapt its classifier.

    ``arch`` is the state dict's architecture when already read (a :class:`Checkpoint`'s); without it, it is read
    here, the model's dilations standing in for the ones weights cannot show. The result loads into ``model``
    strictly, except for a classifier dropped for another class count (timm's ``load_pretrained`` then loads
    non-strictly, as it does whenever the class count differs). Another input channel count is left to
    ``load_pretrained`` too, which adapts the stem conv (``adapt_input_conv``: a grey model sums the RGB filters).
    """
    want = model_arch(model)
    if arch is None:
        branches = mldc_branch_count(state_dict)
    else:
        branches = len(arch.mldc_dilations) if any(dilated for _, dilated in arch.depths) else None
    if branches is not None and branches != len(want.mldc_dilations):
        raise CheckpointError(
            f"{source} has {branches} MLDC branches per block, the model {len(want.mldc_dilations)} "
            f"(mldc_dilations {list(want.mldc_dilations)}): build it with the checkpoint's mldc_dilations"
        )
    have = arch if arch is not None else infer_arch(state_dict, {"mldc_dilations": list(want.mldc_dilations)})
    if (want.depths, want.widths, want.head_dim) != (have.depths, have.widths, have.head_dim):
        target = want.variant or "this custom RapidNet"
        fix = f"create '{have.variant}' instead" if have.variant else "create the model with the matching config"
        raise CheckpointError(f"{source} is {have.describe()}, not {target}: {fix}")
    for key in ("mldc_groups", "ffn_kernel"):
        if have.mldc_args[key] != want.mldc_args[key]:
            raise CheckpointError(
                f"{source} has {key} {have.mldc_args[key]}, the model {want.mldc_args[key]}: "
                f"build it with {key}={have.mldc_args[key]!r}"
            )
    if have.reparameterized != want.reparameterized:
        if have.reparameterized:
            raise CheckpointError(
                f"{source} is reparameterized (inference only): build the model with inference_mode=True "
                "(rapidnet.load and create_model(checkpoint=...) do so themselves)"
            )
        raise CheckpointError(
            f"{source} is the training form, the model the folded inference one: build it without inference_mode "
            "and reparameterize it after loading"
        )
    sd = adapt_classifier(dict(state_dict), model, source)
    own = model.state_dict()
    missing = [
        k
        for k in own
        if k not in sd and not k.startswith(("head.fc.", "head.fc_dist.")) and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"{source} does not fit the model: {'; '.join(parts)} keys")
    check_shapes(sd, {k: v.shape for k, v in own.items()}, source, in_chans_adapted=have.in_chans != want.in_chans)
    check_tensor_dtypes(sd, own, source)
    for key, value in own.items():  # BN step counters some writers leave out: keep the model's own
        if key.endswith("num_batches_tracked"):
            sd.setdefault(key, value)
    return sd


def check_shapes(
    state_dict: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    source: str | os.PathLike,
    in_chans_adapted: bool = False,
) -> None:
    """A one-line :class:`CheckpointError` naming the first weight whose shape is not the model's (``shapes``).

    With ``in_chans_adapted`` the stem conv may differ in its input channels only: timm's ``load_pretrained`` adapts
    it (``adapt_input_conv``).
    """
    for key, value in state_dict.items():
        want = shapes.get(key)
        if want is None or tuple(value.shape) == tuple(want):
            continue
        stem_adapted = key == "stem.0.conv.weight" and value.ndim == 4 and value.shape[::2] == want[::2]
        if in_chans_adapted and stem_adapted and value.shape[3] == want[3]:
            continue
        raise CheckpointError(
            f"{source} does not fit the model: {key} has shape {tuple(value.shape)}, the model {tuple(want)}: "
            "is the file damaged, or of another architecture?"
        )


def is_features_model(model: nn.Module) -> bool:
    """A ``features_only`` model (timm's wrappers, or a model's own feature class): stage outputs, no head."""
    return hasattr(model, "feature_info") and not hasattr(model, "forward_head")


def _classifier_names(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def load_timm_checkpoint(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Read a timm classifier's checkpoint file (:func:`read_checkpoint_file`) and load its weights with
    :func:`load_timm_weights`: fine-tuning a timm model, and timm backbones, which know no architecture metadata."""
    return load_timm_weights(model, read_checkpoint_file(path).state_dict, path, name)


def load_timm_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str | os.PathLike = "checkpoint",
    name: str | None = None,
) -> nn.Module:
    """Load a timm model's weights into it, or into its ``features_only`` body; every weight must be found.

    - ``features_only`` body: timm's wrappers keep the classifier's key names, flatten their first level
      (``stages.0`` -> ``stages_0``) or nest the model (``model.``); every spelling is tried, and weights outside the
      body (the classifier) are ignored;
    - classifier: a classifier of another class count is dropped (fine-tuning starts from a fresh head), in one
      log line; any other weight of another shape, any missing weight and any weight the model lacks is a one-line
      :class:`CheckpointError` (a partial load would silently train from random weights).
    """
    name = name or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
    features = is_features_model(model)
    target = f"backbone {name}" if features else name
    classifiers = () if features else _classifier_names(model)
    own = model.state_dict()
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    dropped: list[str] = []
    for key, value in strip_prefix(state_dict).items():
        spellings = (key, key.replace(".", "_", 1), f"model.{key}") if features else (key,)
        found = next((s for s in spellings if s in own), None)
        if found is None:
            unexpected.append(key)
        elif own[found].shape == value.shape:
            loaded[found] = value
        elif any(found.startswith(f"{c}.") for c in classifiers):
            dropped.append(found)
        else:
            raise CheckpointError(
                f"checkpoint {source} does not fit {target}: {key} has shape {tuple(value.shape)}, the "
                f"{'backbone' if features else 'model'} {tuple(own[found].shape)}: pass a checkpoint of {name}"
            )
    missing = [k for k in own if k not in loaded and k not in dropped and not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(
            f"checkpoint {source} does not fit {target}: {len(missing)} of its weights are missing "
            f"(e.g. {', '.join(missing[:3])}): pass a checkpoint of {name}"
        )
    if unexpected and not features:
        raise CheckpointError(
            f"checkpoint {source} does not fit {target}: {len(unexpected)} of its weights are not in the model "
            f"(e.g. {', '.join(unexpected[:3])}): pass a checkpoint of {name}"
        )
    if dropped:
        _logger.info("%s: another class count than the model's: classifier dropped and initialised afresh", source)
    check_tensor_dtypes(loaded, own, source)
    model.load_state_dict(loaded, strict=False)
    return model


# ---- writing -------------------------------------------------------------------------------------------------------


def model_metadata(model: nn.Module) -> dict[str, str]:
    """What rebuilds a classifier, as safetensors metadata (strings): a RapidNet's architecture, or a timm model's
    name and class count (``format: timm``). Exporters embed the same dict in their JSON metadata."""
    model = unwrap_model(model)
    if isinstance(model, RapidNet):
        arch = model_arch(model)
        return {
            "format": "rapidnet",
            "arch": arch.variant or "custom",
            "depths": json.dumps([list(d) for d in arch.depths]),
            "widths": json.dumps(list(arch.widths)),
            "head_dim": str(arch.head_dim),
            "num_classes": str(arch.num_classes),
            "distillation": str(arch.distillation).lower(),
            "in_chans": str(arch.in_chans),
            "reparameterized": str(arch.reparameterized).lower(),
            "mldc_dilations": json.dumps(list(arch.mldc_dilations)),
            "mldc_groups": str(arch.mldc_groups),
            "ffn_kernel": str(arch.ffn_kernel),
        }
    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if name is None or is_features_model(model):
        raise CheckpointError(
            f"cannot describe a {type(model).__name__} for its checkpoint: only RapidNet and timm classifiers are"
        )
    return {"format": "timm", "arch": str(name), "num_classes": str(getattr(model, "num_classes", 0))}


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Write a model's weights atomically: safetensors for ``.safetensors``, else ``torch.save`` of a dict.

    The metadata (:func:`model_metadata` plus ``metadata``) lets ``rapidnet.load`` rebuild the model from the file.
    """
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    meta = {**model_metadata(model), **(metadata or {})}
    if str(path).endswith(".safetensors"):
        return atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))
    return atomic_write(path, lambda tmp: torch.save({"model": state, "rapidnet": meta}, tmp))
