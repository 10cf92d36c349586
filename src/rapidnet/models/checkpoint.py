"""Checkpoints: reading one into a :class:`Checkpoint` record, checking its tensors, fitting weights, writing.

Every way of loading weights starts from :func:`read_checkpoint_file`, which reads a file once into a
:class:`Checkpoint`: its weights with wrappers and prefixes removed, its metadata (decoded and checked on first use by
:mod:`rapidnet.models.metadata`). A RapidNet's record is completed once by :meth:`Checkpoint.as_rapidnet` (the
weights in this project's key names, :mod:`rapidnet.models.key_names`; the architecture read off them within the
constructor's limits) and handed as it is to the one build through timm
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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from rapidnet.errors import CheckpointError
from rapidnet.models.key_names import to_own_keys
from rapidnet.models.limits import ArgumentError, check_args
from rapidnet.models.metadata import decode_metadata
from rapidnet.models.rapidnet import RapidNet
from rapidnet.models.spec import ArchSpec, infer_arch, mldc_branch_count, model_arch
from rapidnet.utils import atomic_write, read_checkpoint, unwrap_model

__all__ = [
    "Checkpoint",
    "adapt_classifier",
    "check_shapes",
    "check_tensor_dtypes",
    "check_tensor_values",
    "checkpoint_filter_fn",
    "fit_state_dict",
    "hub_weights_file",
    "is_features_model",
    "load_state_dict_file",
    "load_timm_checkpoint",
    "load_timm_weights",
    "model_metadata",
    "read_checkpoint_file",
    "read_pretrained",
    "save_weights",
    "strip_prefix",
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
