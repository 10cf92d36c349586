"""The authors' key names: their checkpoints (``backbone.S.I.*``, ``stem.stem.*``, ``prediction.*``) in this
project's names, and the branch names of files written before MLDC became a parameter.

The conversion is pure renaming (plus the reshapes the two layouts differ by), so any file the authors published
loads into the training-form :class:`~rapidnet.models.rapidnet.RapidNet`; :func:`to_own_keys` is what
:mod:`rapidnet.models.checkpoint` calls on every state dict it reads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from rapidnet.errors import CheckpointError

__all__ = ["convert_official", "is_official_format", "to_own_keys"]


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
