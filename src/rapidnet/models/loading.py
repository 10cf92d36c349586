"""``rapidnet.load``: one way from a checkpoint file to a ready model, whatever the file holds.

The file is read once, into a :class:`~rapidnet.models.checkpoint.Checkpoint`
(:func:`~rapidnet.models.checkpoint.read_checkpoint_file`: safetensors, or ``torch.load`` with ``weights_only=True``),
and what it holds decides what is built:

- a dense model (metadata ``task`` ``detection``/``segmentation``, written by ``rapidnet det|seg train``): Mask R-CNN
  or Semantic FPN from the stored ``build_args``;
- a timm classifier other than RapidNet (metadata ``format: timm``, or ``model=`` a timm name for a file without
  metadata): that timm model, its weights through :func:`~rapidnet.models.checkpoint.load_timm_weights`;
- anything else is a RapidNet classifier in any format (the authors' files in any wrapper, this project's
  safetensors/torch files, training states ``last.pt``/``best.pt`` with EMA or raw weights, reparameterized files):
  the record's weights are converted and its architecture read off them once
  (:meth:`~rapidnet.models.checkpoint.Checkpoint.as_rapidnet`), and ``rapidnet.create_model`` builds the variant
  through timm from that record.

This module sits on top of ``rapidnet.models`` (it builds dense models, which build backbones through the factory),
which is why it is not part of ``factory.py``.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm
import torch
from timm.models import get_pretrained_cfg_value
from torch import nn
from torch.overrides import TorchFunctionMode

from rapidnet.constants import MAX_SIDE, MIN_SIDE
from rapidnet.errors import CheckpointError, ConfigError, RapidNetError, clip
from rapidnet.models.checkpoint import Checkpoint, check_shapes, load_timm_weights, read_checkpoint_file
from rapidnet.models.detection import mask_rcnn
from rapidnet.models.factory import create_model, is_rapidnet
from rapidnet.models.metadata import check_class_names
from rapidnet.models.rapidnet import VARIANTS, RapidNet
from rapidnet.models.segmentation import semantic_fpn

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

    The metadata comes back decoded (:func:`~rapidnet.models.metadata.decode_metadata`): ``class_names`` a list,
    ``pretrained_cfg``, ``build_args`` and ``eval_args`` dicts where stored, and always ``format`` (``rapidnet``,
    ``timm``, ``rapidnet-detection``, ...) and, for classifiers, ``arch``. A stored ``pretrained_cfg`` (the eval
    transform the model was trained with) is merged into ``model.pretrained_cfg`` here, and only here.
    """
    if task is not None and task not in TASK_KINDS:
        raise ConfigError(f"unknown task {task!r}: choose one of {', '.join(TASK_KINDS)}")
    if model is not None:
        _check_model_name(model)  # before reading what may be a large file
    record = read_checkpoint_file(path, use_ema=use_ema)
    meta = dict(record.metadata)  # returned with what loading adds (format, arch)
    kind = record.kind
    if kind not in TASK_KINDS:
        raise CheckpointError(f"{path} holds a {kind!r} model, which no command reads: is it this project's file?")
    if task is not None and kind != task:
        raise CheckpointError(
            f"{path} holds a {kind} model, not {task}: pass a checkpoint written by '{TASK_KINDS[task]}'"
        )
    if kind in _DENSE_BUILDERS:
        if model is not None or features_only:
            raise ConfigError(f"{path} holds a whole {kind} model: model= and features_only= apply to classifiers")
        net = _load_dense(path, kind, record.state_dict, meta, kwargs)
    elif meta.get("format") == "timm" or (model is not None and not is_rapidnet(model)):
        net = _load_timm(path, record.state_dict, meta, model, features_only, out_indices, kwargs)
    else:
        net = _load_rapidnet(record.as_rapidnet(), meta, model, features_only, out_indices, kwargs)
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
    record: Checkpoint,
    meta: dict[str, Any],
    name: str | None,
    features_only: bool,
    out_indices: Sequence[int] | None,
    kwargs: dict[str, Any],
) -> nn.Module:
    arch, path = record.arch, record.name
    assert arch is not None  # as_rapidnet read it
    _check_names_fit(path, meta, arch.num_classes)
    _check_arch_fits(record)
    if name is not None and arch.variant != name.split(".")[0]:
        raise CheckpointError(
            f"{path} is {arch.describe()}, not {name}: give no model name to use the checkpoint's own "
            "architecture, or pass the checkpoint of that variant"
        )
    meta.setdefault("format", "rapidnet")
    meta.setdefault("arch", arch.variant or "custom")
    args: dict[str, Any] = dict(arch.build_args, features_only=features_only)
    if out_indices is not None:
        args["out_indices"] = tuple(out_indices)
    args.update(kwargs, checkpoint=record)  # the record read above: nothing is read or worked out again
    return create_model(arch.variant or "rapidnet_ti", **args)


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
    if not timm.is_model(name):
        raise CheckpointError(f"{path} names timm model {name!r}, which timm does not know: is the file damaged?")
    meta["format"] = "timm"
    meta.setdefault("arch", name)
    args = dict(kwargs)
    rows = None
    if features_only:
        args["features_only"] = True
        if out_indices is not None:
            args["out_indices"] = tuple(out_indices)
    else:
        rows = meta.get("num_classes") or _classifier_rows(name, state_dict)
        if rows is not None:
            _check_names_fit(path, meta, rows)
            args.setdefault("num_classes", rows)
    # the file's own class count for the dry build: a caller's num_classes (fine-tuning) is the caller's to pay for
    own = {"num_classes": rows} if rows is not None else {}
    build = functools.partial(timm.create_model, name)
    try:
        shapes = _dry_shapes(build, {**args, **own})
        if shapes is not None:
            _check_size(path, shapes, state_dict, name)
        net = build(**args)
    except RapidNetError:
        raise
    except (RuntimeError, TypeError, ValueError, KeyError) as e:  # unknown name, or kwargs the model does not take
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
    build_args = meta["build_args"]
    _check_build_args(path, build_args)
    _check_names_fit(path, meta, build_args.get("num_classes"))
    builder = _DENSE_BUILDERS[kind]
    try:
        shapes = _dry_shapes(builder, build_args)  # before anything is allocated: the weights must be the file's
    except _BUILD_ERRORS as e:
        raise _build_error(path, e) from None
    if shapes is not None:
        _check_fits(path, shapes, state_dict, f"the {kind} model its build_args describe")
    net = _build(path, builder, {**build_args, **kwargs})
    result = net.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not fit its own build_args: {len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys: is the file damaged?"
        )
    return net


# ---- checks before building: what a file asks for must fit the file ------------------------------------------------


def _check_names_fit(path: str | os.PathLike, meta: Mapping[str, Any], count: Any) -> None:
    """A class name per output of the classifier the weights hold (``predict`` indexes the names by output)."""
    if "class_names" in meta and isinstance(count, int):
        try:
            check_class_names(meta["class_names"], count)
        except ValueError as e:
            raise CheckpointError(f"{path} has invalid 'class_names' metadata ({e}): re-export it") from None


#: dense ``build_args`` that would make loading read another file or download weights: the file holds the weights
_FILE_ARGS = ("backbone_checkpoint", "checkpoint", "checkpoint_path", "pretrained", "pretrained_cfg_overlay")
#: dense ``build_args`` that set the size images are resized to (torchvision's transform)
_SIZE_ARGS = ("min_size", "max_size")


def _check_build_args(path: str | os.PathLike, build_args: Mapping[str, Any]) -> None:
    """Stored dense builder arguments: no file or download to reach, image sizes within the eval bounds."""
    backbone = build_args.get("backbone")
    if not isinstance(backbone, str) or not (is_rapidnet(backbone) or timm.is_model(backbone)):
        shown = clip(repr(backbone))
        raise CheckpointError(
            f"{path} has invalid 'build_args' metadata (backbone {shown}: expected a RapidNet variant or a timm "
            "model name): re-export it"
        )
    nested = build_args.get("backbone_kwargs") or {}
    if not isinstance(nested, Mapping):
        raise CheckpointError(f"{path} has invalid 'build_args' metadata (backbone_kwargs is not a dict): re-export it")
    for key in _FILE_ARGS:  # present at all (even "", which would mean the authors' weights from the hub)
        if any(args.get(key) is not None and args.get(key) is not False for args in (build_args, nested)):
            raise CheckpointError(
                f"{path} has build_args that name other weights ({key}): a checkpoint must hold its own; re-export it"
            )
    for key in _SIZE_ARGS:
        value = build_args.get(key)
        sides = value if isinstance(value, (list, tuple)) else [value]
        if value is not None and not all(
            isinstance(v, int) and not isinstance(v, bool) and MIN_SIDE <= v <= MAX_SIDE for v in sides
        ):
            raise CheckpointError(
                f"{path} has invalid 'build_args' metadata ({key} {value!r}: expected sides of "
                f"{MIN_SIDE}..{MAX_SIDE} pixels): re-export it"
            )


class _MetaTensors(TorchFunctionMode):
    """Tensor factories called without a device make meta tensors (shapes, no storage).

    Building a model under this mode allocates no weights, so the architecture a file's metadata or weight names
    describe can be compared with the weights the file really holds before a single byte is allocated: a small file
    cannot ask for a model of gigabytes. (``torch.device("meta")`` as a whole would also move the ``linspace`` of the
    drop-path rates, which the constructors read back as numbers.) Initialising a meta tensor in place changes
    nothing, so those calls return at once: torch runs them on meta tensors through its Python reference
    implementations, the larger part of such a build's time.
    """

    _FACTORIES = frozenset({torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn})
    _INITS = frozenset({torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_})

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        if func in self._INITS and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _dry_shapes(builder: Callable[..., nn.Module], args: Mapping[str, Any]) -> dict[str, torch.Size] | None:
    """The state-dict shapes ``builder(**args)`` would have, from a build on meta tensors (the builder's own errors
    propagate).

    ``None`` when the builder cannot run on meta tensors (a constructor that reads a weight back): the real build
    then goes ahead, its stored arguments already bounded by :func:`~rapidnet.models.metadata.decode_metadata`.
    """
    try:
        with _MetaTensors():
            net = builder(**args)
    except RuntimeError:  # NotImplementedError too: a meta tensor read back; the real build will tell
        return None
    return {k: v.shape for k, v in net.state_dict().items()}


def _check_size(
    path: str | os.PathLike, shapes: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor], name: str
) -> None:
    """A model may not need more weights than the file holds: every weight must come from the file, so a small file
    naming a large model (``arch: vit_giant_patch14_clip_224``) is refused before the model is built."""
    need = sum(math.prod(shape) for shape in shapes.values())
    have = sum(v.numel() for v in state_dict.values())
    if need > have:
        missing = [k for k in shapes if k not in state_dict and not k.endswith("num_batches_tracked")]
        what = f"{len(missing)} of its weights are missing" if missing else "its weights are larger than the file's"
        raise CheckpointError(
            f"checkpoint {path} does not fit {name}: {what} (the file holds {have:,} numbers, the model needs "
            f"{need:,}): pass a checkpoint of {name}"
        )


#: what a builder raises for arguments it cannot honour
_BUILD_ERRORS = (RapidNetError, TypeError, ValueError, KeyError, AssertionError, IndexError)


def _build(path: str | os.PathLike, builder: Callable[..., nn.Module], args: Mapping[str, Any]) -> nn.Module:
    """``builder(**args)`` with stored arguments: a builder that refuses them is a one-line :class:`CheckpointError`."""
    try:
        return builder(**args)
    except (*_BUILD_ERRORS, RuntimeError) as e:  # RuntimeError: torch refusing a size (or out of memory)
        raise _build_error(path, e) from None


def _build_error(path: str | os.PathLike, e: BaseException) -> CheckpointError:
    detail = " ".join(f"{type(e).__name__}: {e}".split())[:120]
    return CheckpointError(f"{path} has build_args that build no model ({detail}): re-export it")


def _check_arch_fits(record: Checkpoint) -> None:
    """The RapidNet read off the weights' names, built on meta tensors, has exactly the weights' shapes: the guard
    that keeps a file of kilobytes from building a model of gigabytes, before anything is allocated."""
    arch = record.arch
    assert arch is not None
    try:
        with _MetaTensors():
            net = RapidNet(**arch.build_args, inference_mode=arch.reparameterized)
    except (ValueError, TypeError, IndexError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:100] or type(e).__name__
        raise CheckpointError(
            f"{record.name} describes no buildable RapidNet ({detail}): is the file damaged?"
        ) from None
    _check_fits(record.name, {k: v.shape for k, v in net.state_dict().items()}, record.state_dict, arch.describe())


def _check_fits(
    path: str | os.PathLike, shapes: Mapping[str, torch.Size], state_dict: Mapping[str, torch.Tensor], what: str
) -> None:
    """Every weight of the model is in the file with its shape, and the file has no others (BN step counters may
    be absent)."""
    missing = [k for k in shapes if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in shapes]
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {', '.join(missing[:2])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:2])})"] if unexpected else []
        raise CheckpointError(f"{path} does not fit {what}: {'; '.join(parts)} weights: is the file damaged?")
    check_shapes(state_dict, shapes, path)
