"""``rapidnet.load``: one way from a checkpoint file to a ready model, whatever the file holds.

The file is read once (:func:`rapidnet.models.checkpoint.read_weights`: safetensors, or ``torch.load`` with
``weights_only=True``) and what it holds decides what is built:

- a dense model (metadata ``task`` ``detection``/``segmentation``, written by ``rapidnet det|seg train``): Mask R-CNN
  or Semantic FPN from the stored ``build_args``;
- a timm classifier other than RapidNet (metadata ``format: timm``, or ``model=`` a timm name for a file without
  metadata): that timm model, its weights through :func:`~rapidnet.models.checkpoint.load_timm_weights`;
- anything else is a RapidNet classifier in any format (the authors' files in any wrapper, this project's
  safetensors/torch files, training states ``last.pt``/``best.pt`` with EMA or raw weights, reparameterized files):
  the architecture is read off the weights and the variant is built through timm (``rapidnet.create_model``), which
  loads the weights already read.

This module sits on top of ``rapidnet.models`` (it builds dense models, which build backbones through the factory),
which is why it is not part of ``factory.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import nn

from rapidnet.errors import CheckpointError, ConfigError
from rapidnet.models.checkpoint import (
    checkpoint_filter_fn,
    decode_metadata,
    infer_arch,
    load_timm_weights,
    read_weights,
)
from rapidnet.models.factory import create_model, is_rapidnet
from rapidnet.models.mask_rcnn import mask_rcnn
from rapidnet.models.rapidnet import VARIANTS
from rapidnet.models.semantic_fpn import semantic_fpn

__all__ = ["TASK_KINDS", "load", "load_model"]

#: what a checkpoint can hold, and the command that writes each kind
TASK_KINDS = {
    "classification": "rapidnet train",
    "detection": "rapidnet det train",
    "segmentation": "rapidnet seg train",
}
_DENSE_BUILDERS = {"detection": mask_rcnn, "segmentation": semantic_fpn}


def load(
    path: str | os.PathLike,
    *,
    model: str | None = None,
    use_ema: bool = True,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    task: str | None = None,
    **kwargs: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild and load the model a checkpoint file holds; returns ``(model in eval mode, metadata)``.

    Args:
        path: any checkpoint this project reads (see the module docstring).
        model: a model name to check the file against (``rapidnet_ti``: the file must be that variant), or the timm
            model a file without metadata holds (``resnet50``). Unknown names fail before the file is read.
        use_ema: the EMA weights of a training checkpoint when it has them (else the raw ones).
        features_only: the classifier's backbone (timm's ``features_only``: a list of stage outputs).
        out_indices: stages of a ``features_only`` backbone (RapidNet default ``(0, 1, 2, 3)``, strides 4..32).
        task: what the file must hold (``classification``, ``detection`` or ``segmentation``); another kind is a
            one-line error before anything is built.
        kwargs: reach the builder (``rapidnet.create_model``, ``timm.create_model``, or the dense builder over the
            stored ``build_args``), e.g. ``drop_path_rate`` for fine-tuning.

    The metadata comes back decoded (:func:`~rapidnet.models.checkpoint.decode_metadata`): ``class_names`` a list,
    ``pretrained_cfg``, ``build_args`` and ``eval_args`` dicts where stored, and always ``format`` (``rapidnet``,
    ``timm``, ``rapidnet-detection``, ...) and, for classifiers, ``arch``. A stored ``pretrained_cfg`` (the eval
    transform the model was trained with) is merged into ``model.pretrained_cfg`` here, and only here.
    """
    if task is not None and task not in TASK_KINDS:
        raise ConfigError(f"unknown task {task!r}: choose one of {', '.join(TASK_KINDS)}")
    if model is not None:
        _check_model_name(model)  # before reading what may be a large file
    state_dict, stored = read_weights(path, use_ema=use_ema)
    meta = decode_metadata(stored, path)
    kind = meta.get("task") or "classification"
    if task is not None and kind != task:
        raise CheckpointError(
            f"{path} holds a {kind} model, not {task}: pass a checkpoint written by '{TASK_KINDS[task]}'"
        )
    if kind in _DENSE_BUILDERS:
        if model is not None or features_only:
            raise ConfigError(f"{path} holds a whole {kind} model: model= and features_only= apply to classifiers")
        net = _load_dense(path, kind, state_dict, meta, kwargs)
    elif meta.get("format") == "timm" or (model is not None and not is_rapidnet(model)):
        net = _load_timm(path, state_dict, meta, model, features_only, out_indices, kwargs)
    else:
        net = _load_rapidnet(path, state_dict, meta, model, features_only, out_indices, kwargs)
    if "pretrained_cfg" in meta:
        stored_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["pretrained_cfg"].items()}
        net.pretrained_cfg = {**(getattr(net, "pretrained_cfg", None) or {}), **stored_cfg}
    return net.eval(), meta


def load_model(path: str | os.PathLike, use_ema: bool = True, **kwargs: Any) -> nn.Module:
    """:func:`load` without the metadata: ``rapidnet.load_model("RapidNet_Ti.pth")`` needs no variant name.

    ``kwargs`` are :func:`load`'s (``features_only=True`` gives the loaded backbone).
    """
    return load(path, use_ema=use_ema, **kwargs)[0]


# ---- the three kinds -----------------------------------------------------------------------------------------------


def _check_model_name(name: str) -> None:
    if not is_rapidnet(name) and not timm.is_model(name):
        raise ConfigError(
            f"unknown model {name!r}: use a RapidNet variant ({', '.join(VARIANTS)}) or a timm model name"
        )


def _load_rapidnet(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    name: str | None,
    features_only: bool,
    out_indices: Sequence[int] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    sd = checkpoint_filter_fn(state_dict)
    arch = infer_arch(sd)
    if name is not None and arch.variant != name.split(".")[0]:
        raise CheckpointError(
            f"{path} is {arch.describe()}, not {name}: give no model name to use the checkpoint's own "
            "architecture, or pass the checkpoint of that variant"
        )
    meta.setdefault("format", "rapidnet")
    meta.setdefault("arch", arch.variant or "custom")
    args: dict[str, Any] = dict(
        depths=arch.depths,
        widths=arch.widths,
        head_dim=arch.head_dim,
        num_classes=arch.num_classes,
        distillation=arch.distillation,
        in_chans=arch.in_chans,
        features_only=features_only,
    )
    if out_indices is not None:
        args["out_indices"] = tuple(out_indices)
    args.update(kwargs)
    overlay = dict(args.pop("pretrained_cfg_overlay", None) or {}, file=os.fspath(path), state_dict=sd)
    return create_model(arch.variant or "rapidnet_ti", pretrained=True, pretrained_cfg_overlay=overlay, **args)


def _load_timm(
    path: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    name: str | None,
    features_only: bool,
    out_indices: Sequence[int] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    fmt = meta.get("format")
    if fmt not in (None, "timm"):
        raise CheckpointError(f"{path} holds a {fmt} model ({meta.get('arch')}), not {name}: give no model name")
    stored = meta.get("arch") if fmt == "timm" else None
    if stored and name is not None and name.split(".")[0] != stored.split(".")[0]:
        raise CheckpointError(f"{path} holds timm model {stored}, not {name}: give no model name to use its own")
    name = name or stored
    if not name:
        raise CheckpointError(f"{path} names no timm model in its metadata: pass the model name (--model)")
    meta["format"] = "timm"
    meta.setdefault("arch", name)
    args = dict(kwargs)
    if features_only:
        args["features_only"] = True
        if out_indices is not None:
            args["out_indices"] = tuple(out_indices)
    else:
        rows = meta.get("num_classes") or _classifier_rows(name, state_dict)
        if rows is not None:
            args.setdefault("num_classes", rows)
    try:
        net = timm.create_model(name, **args)
    except RuntimeError as e:
        detail = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise ConfigError(f"cannot build timm model {name!r} for {path} ({detail})") from None
    return load_timm_weights(net, state_dict, path, name)


def _classifier_rows(name: str, state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a timm classifier checkpoint without metadata: rows of its classifier weight."""
    classifier = get_pretrained_cfg_value(name, "classifier") or ()
    for prefix in (classifier,) if isinstance(classifier, str) else classifier:
        weight = state_dict.get(f"{prefix}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _load_dense(
    path: str | os.PathLike,
    kind: str,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    kwargs: dict[str, Any],
) -> nn.Module:
    missing = [k for k in ("build_args", "class_names", "eval_args") if k not in meta]
    if missing:
        raise CheckpointError(f"{path} has incomplete dense metadata (no {', '.join(missing)}): re-export it")
    meta.setdefault("format", f"rapidnet-{kind}")
    net = _DENSE_BUILDERS[kind](**{**meta["build_args"], **kwargs})
    result = net.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit its own build_args: {len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys: is the file damaged?"
        )
    return net
