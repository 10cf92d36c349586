"""Training configuration: YAML files (``configs/*.yaml``) with ``base:`` inheritance and command-line overrides.

A config is a tree of small dataclasses so that a typo is caught when the file is read, not three hours into a run:
an unknown key, a value of the wrong type or out of range is a one-line :class:`~rapidnet.errors.ConfigError` that
names the key (``optim.lrr``) and where the value came from: the file, or the ``--set KEY=VALUE`` override or flag
(``--epochs``) that set it. Defaults are the paper's ImageNet recipe (SPEC.md, "Training recipes").

Constraints are declared on the fields, beside their defaults: ``epochs: int = setting(300, ge=1, le=MAX_EPOCHS)``
puts a :class:`Constraint` in the field's metadata, which :func:`_build` checks and which words the message itself
("1..100000", "in [0, 1)", "one of none, hard, soft", "... or null"). Only checks that tie fields together stay in
:func:`_check_across`. Standard-library dataclass metadata rather than pydantic: no new dependency, one-line messages
(pydantic's span lines), and the same plain dataclasses are what checkpoints save (``config_to_dict``).

The engine (``rapidnet.engine``) reads ``train``, ``optim``, ``sched`` and ``ema``; the classification task reads
``model``, ``data``, ``aug`` and ``distill``. Other tasks keep their own settings under ``task:``, a free mapping in
the saved config (old checkpoints keep loading) that each task reads into its own dataclass with
:func:`build_section`, so its keys are checked by the same machinery (``rapidnet.tasks._dense.DenseOptions``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rapidnet.constants import (
    MAX_BATCH,
    MAX_CLASSES,
    MAX_EPOCHS,
    MAX_IMAGES,
    MAX_INTERVAL,
    MAX_SEED,
    MAX_SIDE,
    MAX_TIME_BUDGET,
    MAX_WORKERS,
    MIN_SIDE,
)
from rapidnet.errors import ConfigError, clip, file_problem
from rapidnet.utils import atomic_write

__all__ = [
    "AugConfig",
    "Config",
    "Constraint",
    "DataConfig",
    "DistillConfig",
    "EmaConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "build_section",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "constraint_of",
    "field_requirement",
    "load_config",
    "parse_override",
    "save_config",
    "scaled_lr",
    "setting",
    "type_name",
]

T = TypeVar("T")

# ---- the constraint vocabulary ------------------------------------------------------------------------------------


def _number(x: float) -> str:
    """A bound as a message shows it: ``1``, ``0.5``, ``100000`` (not ``1e+05``)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


def _literal(value: Any) -> str:
    """A choice as it is written in YAML (``true``, ``null``, ``hard``)."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Constraint:
    """What a setting's value must be beyond its type, declared on the field with :func:`setting`.

    Bounds and ``choices`` apply to a number or string, and to each element of a list; ``length`` and ``nonempty``
    to the value as a whole. None passes when the type allows it (the message then adds "or null"). The constraint
    words itself, so a message can never drift from the check.
    """

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    length: int | None = None
    nonempty: bool = False  # a string with more than blanks, a list with an element
    unit: str = ""  # said after a range: "pixels", "images"
    what: str | None = None  # the value's shape in words where the generated ones fall short ("3 numbers (...)")

    def item_text(self, integral: bool = False) -> str | None:
        """What a number or string (each element of a list) must be: ``1..1000``, ``in [0, 1)``, ``positive``."""
        unit = f" {self.unit}" if self.unit else ""
        if self.choices is not None:
            return "one of " + ", ".join(_literal(c) for c in self.choices)
        lo, hi = (self.ge if self.ge is not None else self.gt), (self.le if self.le is not None else self.lt)
        if lo is not None and hi is not None:
            closed = self.ge is not None and self.le is not None
            if integral and closed:
                return f"{_number(lo)}..{_number(hi)}{unit}"
            if hi <= 1:  # fractions and probabilities: the interval itself reads best
                left, right = "[" if self.ge is not None else "(", "]" if self.le is not None else ")"
                return f"in {left}{_number(lo)}, {_number(hi)}{right}{unit}"
            low = f"{'at least' if self.ge is not None else 'more than'} {_number(lo)}"
            return f"{low} and {'at most' if self.le is not None else 'less than'} {_number(hi)}{unit}"
        if lo is not None:
            if self.gt == 0:
                return f"positive{unit}"
            if self.ge == 0:
                return f"0 or more{unit}"
            return f"{'at least' if self.ge is not None else 'more than'} {_number(lo)}{unit}"
        if hi is not None:
            return f"{'at most' if self.le is not None else 'less than'} {_number(hi)}{unit}"
        return None

    def describe(self, nullable: bool = False, integral: bool = False) -> str:
        """The whole requirement for a message: ``a [min, max] pair, each 4..4096 pixels, or null``."""
        shape = self.what
        if shape is None and self.length is not None:
            shape = "a [min, max] pair" if self.length == 2 else f"a list of {self.length}"
        elif shape is None and self.nonempty:
            shape = "a non-empty string"
        item = self.item_text(integral)
        text = f"{shape}, each {item}" if shape and item else shape or item or "valid"
        if nullable:  # after a list of parts (brackets aside), a comma keeps "null" from reading as one of them
            parts = re.sub(r"[\[(][^\])]*[\])]", "", text)
            text += ", or null" if re.search(r",|\band\b|\bor\b", parts) else " or null"
        return text

    def _allows(self, item: Any) -> bool:
        if self.choices is not None:
            return item in self.choices
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return not (
                (self.ge is not None and not item >= self.ge)
                or (self.gt is not None and not item > self.gt)
                or (self.le is not None and not item <= self.le)
                or (self.lt is not None and not item < self.lt)
            )
        return True

    def problem(self, value: Any, key: str, nullable: bool, integral: bool) -> tuple[str, str, Any] | None:
        """``(key, what, value)`` of the first part of ``value`` (already of the field's type) that breaks this."""
        if value is None:
            return None
        whole = self.describe(nullable, integral)
        if isinstance(value, list):
            if (self.length is not None and len(value) != self.length) or (self.nonempty and not value):
                return key, whole, value
            for i, item in enumerate(value):
                if not self._allows(item):
                    return f"{key}[{i}]", self.item_text(integral) or whole, item
            return None
        if isinstance(value, str) and self.nonempty and not value.strip():
            return key, whole, value
        return None if self._allows(value) else (key, whole, value)


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[Any, ...] | None = None,
    length: int | None = None,
    nonempty: bool = False,
    unit: str = "",
    what: str | None = None,
) -> Any:
    """A dataclass field with its :class:`Constraint`: ``epochs: int = setting(300, ge=1, le=MAX_EPOCHS)``.

    A list or dict ``default`` is copied for each instance (dataclasses refuse a shared mutable default).
    """
    constraint = Constraint(
        ge, gt, le, lt, tuple(choices) if choices is not None else None, length, nonempty, unit, what
    )
    metadata = {Constraint: constraint}  # the class as the key: no other library's metadata can clash with it
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def constraint_of(f: dataclasses.Field[Any]) -> Constraint | None:
    """The :class:`Constraint` declared on a dataclass field, if any."""
    return f.metadata.get(Constraint)


def _allows_none(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _integral(tp: Any) -> bool:
    """Whether a type holds whole numbers (``int``, ``int | None``, ``list[int]``, ``int | list[int]``)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return bool(args) and all(_integral(a) for a in args)
    if typing.get_origin(tp) is list:
        return _integral(typing.get_args(tp)[0])
    return tp is int


def field_requirement(cls: type, name: str) -> str | None:
    """How the message words the constraint of ``cls.name`` (None: it has none), with "or null" where it applies."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    constraint = constraint_of(f)
    if constraint is None:
        return None
    tp = typing.get_type_hints(cls)[name]
    return constraint.describe(_allows_none(tp), _integral(tp))


# ---- the settings -------------------------------------------------------------------------------------------------

#: what a checkpoint or teacher setting must be when it is not null
_A_FILE = "a file (or model name)"


@dataclass
class ModelConfig:
    """Which network to train. ``num_classes`` and ``distillation`` default to what the data and teacher imply."""

    name: str = "rapidnet_ti"
    num_classes: int | None = setting(None, ge=1, le=MAX_CLASSES)
    distillation: bool | None = None
    # the one default (rapidnet.models.rapidnet.DEFAULT_DROP_PATH_RATE), every backbone
    drop_path_rate: float = setting(0.1, ge=0.0, lt=1.0)
    drop_rate: float = setting(0.0, ge=0.0, lt=1.0)
    # initial weights (fine-tuning): any checkpoint rapidnet.load_model reads
    checkpoint: str | None = setting(None, nonempty=True, what=_A_FILE)
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments (depths, widths, head_dim)


@dataclass
class DataConfig:
    """Where the images come from and how they are fed; batch sizes are per process (global = x world size)."""

    path: str = "fashion-mnist"
    input_size: int = setting(224, ge=MIN_SIDE, le=MAX_SIDE, unit="pixels")
    batch_size: int = setting(128, ge=1, le=MAX_BATCH)
    eval_batch_size: int | None = setting(None, ge=1, le=MAX_BATCH)  # None: 2 x batch_size
    workers: int = setting(4, ge=0, le=MAX_WORKERS)
    # "timm": PIL + timm transforms; "tensor": in-memory batch augmentation (Fashion-MNIST)
    pipeline: str = setting("timm", choices=("timm", "tensor"))
    crop_pct: float | None = setting(None, gt=0.0, le=1.0)  # eval transform; None: the model's pretrained_cfg (0.9)
    interpolation: str | None = None  # eval resize; None: the model's pretrained_cfg (bicubic)
    mean: list[float] | None = setting(None, length=3, what="3 numbers (one per RGB channel)")
    # a channel is divided by its std: 0 would make every pixel infinite
    std: list[float] | None = setting(None, length=3, gt=0.0, what="3 numbers (one per RGB channel)")
    # a fixed random subset, for quick runs and tests
    limit_train: int | None = setting(None, ge=1, le=MAX_IMAGES, unit="images")
    limit_val: int | None = setting(None, ge=1, le=MAX_IMAGES, unit="images")
    skip_corrupt: bool = False
    pin_memory: bool = True


@dataclass
class AugConfig:
    """Training augmentation (DeiT recipe through timm); set a probability/alpha to 0 to switch a piece off."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = setting(0.4, ge=0.0)
    train_interpolation: str = "random"
    # RandomResizedCrop's area fraction and aspect ratio (a ratio is taken the log of: it must be positive)
    scale: list[float] = setting([0.08, 1.0], length=2, gt=0.0, le=1.0)
    ratio: list[float] = setting([3 / 4, 4 / 3], length=2, gt=0.0)
    hflip: float = setting(0.5, ge=0.0, le=1.0)
    re_prob: float = setting(0.25, ge=0.0, le=1.0)
    re_mode: str = setting("pixel", choices=("const", "rand", "pixel"))
    re_count: int = setting(1, ge=0, le=64)
    mixup: float = setting(0.8, ge=0.0)  # Beta(alpha, alpha) parameters; 0 switches the piece off
    cutmix: float = setting(1.0, ge=0.0)
    mixup_prob: float = setting(1.0, ge=0.0, le=1.0)
    mixup_switch_prob: float = setting(0.5, ge=0.0, le=1.0)
    mixup_mode: str = setting("batch", choices=("batch", "pair", "elem"))
    smoothing: float = setting(0.1, ge=0.0, lt=1.0)
    repeated_aug: bool = True  # timm RepeatAugSampler, used when training on more than one process
    repeats: int = setting(3, ge=1, le=64)
    # "tensor" pipeline only: random crop after zero padding (its geometric augmentation)
    crop_padding: int = setting(4, ge=0, le=MAX_SIDE)
    # "tensor" pipeline only: per batch, resize the images to a side drawn from [min, max] pixels (aspect from
    # ``ratio``) and place each at random on a black canvas up to a quarter larger. Trained only at 32 pixels, a
    # network's deep stages see 1x1 and 2x2 maps, and dense models at larger sizes meet kernels it never trained.
    zoom: list[int] | None = setting(None, length=2, ge=4, le=MAX_SIDE, unit="pixels")
    # "tensor" pipeline only: Gaussian pixel noise, std drawn per batch from [0, noise] (0-255)
    noise: float = setting(0.0, ge=0.0)


@dataclass
class OptimConfig:
    """Optimizer (timm ``create_optimizer_v2``). ``lr`` None means ``base_lr * global_batch / lr_base_size``."""

    opt: str = "adamw"
    lr: float | None = setting(None, gt=0.0)
    base_lr: float = setting(2e-3, gt=0.0)
    lr_base_size: int = setting(1024, ge=1)
    weight_decay: float = setting(0.05, ge=0.0)
    eps: float = setting(1e-8, gt=0.0)
    # torch's Adam refuses a beta outside [0, 1), but only once the data is loaded and the model built
    betas: list[float] | None = setting(None, length=2, ge=0.0, lt=1.0, what="a [beta1, beta2] pair")
    momentum: float = setting(0.9, ge=0.0, lt=1.0)
    clip_grad: float | None = setting(None, gt=0.0)
    fused: bool = False  # torch's fused kernel (adam, adamw, sgd): one pass over the weights, ~4x faster steps on CPU


@dataclass
class SchedConfig:
    """Learning-rate schedule (timm ``create_scheduler_v2``); ``step_on_epochs: false`` updates it every step."""

    name: str = "cosine"
    # fractions count updates where step_on_epochs is false (0.2: a fifth of an epoch)
    warmup_epochs: float = setting(20, ge=0)
    warmup_lr: float = setting(1e-6, ge=0.0)
    min_lr: float = setting(1e-5, ge=0.0)
    cooldown_epochs: int = setting(0, ge=0, le=MAX_EPOCHS)
    step_on_epochs: bool = True
    decay_milestones: list[int] = field(default_factory=lambda: [90, 180, 270])  # multistep
    decay_rate: float = setting(0.1, gt=0.0)  # step/multistep factor; the power of "poly"


@dataclass
class EmaConfig:
    """Model EMA (timm ``ModelEmaV3``); ``evaluate`` also validates the EMA weights each epoch."""

    enabled: bool = True
    decay: float = setting(0.99996, ge=0.0, lt=1.0)
    warmup: bool = False
    evaluate: bool = True


@dataclass
class DistillConfig:
    """DeiT-style distillation through the model's distillation head; ``type: none`` trains a single head."""

    type: str = setting("none", choices=("none", "hard", "soft"))
    alpha: float = setting(0.5, ge=0.0, le=1.0)
    tau: float = setting(1.0, gt=0.0)
    # timm model name (or a RapidNet variant); None with a checkpoint: read the file
    teacher: str | None = setting(None, nonempty=True, what=_A_FILE)
    teacher_checkpoint: str | None = setting(None, nonempty=True, what=_A_FILE)


@dataclass
class TrainConfig:
    """The run itself: length, seed, device and speed options, where results go."""

    epochs: int = setting(300, ge=1, le=MAX_EPOCHS)
    seed: int = setting(0, ge=0, le=MAX_SEED)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = False  # bfloat16 autocast on CPU (fp32 where it has no bf16 kernels), float16 + GradScaler on CUDA
    channels_last: bool = False
    compile: bool = False
    # eager CPU: convs skip the kernel taps that only multiply zero padding (exact; see rapidnet.engine.conv_taps)
    trim_padding_taps: bool = True
    # CPU: start on the cores other processes leave free, kept for the run and by --resume (see engine/cpu_share)
    adapt_threads: bool = True
    sync_bn: bool = True  # SyncBatchNorm when training on several CUDA processes
    output: str = "runs/train"
    log_interval: int = setting(50, ge=1, le=MAX_INTERVAL, unit="steps")  # steps between lines of steps.jsonl
    # evaluate after every N-th epoch and after the last (mmdetection's interval): a Mask R-CNN evaluation on CPU
    # costs a sixth of an epoch's time, which a short budget would rather spend on training
    eval_interval: int = setting(1, ge=1, le=MAX_INTERVAL, unit="epochs")
    # minutes of training and evaluation the run may take: after its first evaluation it measures an epoch and an
    # evaluation on this machine and runs as many of ``epochs`` as fit (the schedule follows); --epochs turns it off
    time_budget: float | None = setting(None, gt=0, le=MAX_TIME_BUDGET, unit="minutes")


@dataclass
class Config:
    """A whole training configuration."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # settings of other tasks (detection...): kept as given, so old checkpoints load; each task checks its own keys
    # with build_section (rapidnet.tasks._dense.DenseOptions)
    task: dict[str, Any] = field(default_factory=dict)

    def source_of(self, key: str) -> str:
        """Where the value at dotted ``key`` came from, for messages: the config file, or the ``--set`` override or
        flag that set it (load_config records them); ``config`` for a Config built in code."""
        where = self.__dict__.get("_where")
        return where(key) if where is not None else "config"


# ---- reading ------------------------------------------------------------------------------------------------------

#: a config is a page of settings: more than this is not a config (and is not read into memory whole)
_MAX_CONFIG_BYTES = 1 << 20
#: nesting deeper than this is not a config either (and deep enough recursion would crash the reader)
_MAX_YAML_DEPTH = 32


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.safe_load`` without aliases, explicit tags or deep nesting.

    An alias (``*name``) repeats a whole subtree: nine nested levels of nine aliases in 500 bytes ("billion laughs")
    expand to a billion nodes and exhaust memory. No config needs them, so the first alias is a one-line error at its
    line; anchors alone (``&name``) are harmless and allowed. Explicit tags (``!!timestamp``, ``!!python/...``) are
    refused the same way: a config holds plain numbers, strings, lists and mappings.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in configs: write the value out", mark
            )
        tag = getattr(self.peek_event(), "tag", None)
        if tag not in (None, "!"):  # an explicit tag skips the safe resolver's checks (!!timestamp 2001 crashes it)
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(
                None, None, f"YAML tags ({tag}) are not allowed in configs: write a plain value", mark
            )
        if self._depth >= _MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, f"nested more than {_MAX_YAML_DEPTH} levels deep", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _safe_yaml(text: str) -> Any:
    """Parse YAML text with :class:`_ConfigLoader` (safe types only, no aliases, bounded depth)."""
    loader = _ConfigLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _read_text(path: Path) -> str:
    """A config file's text, refused when larger than :data:`_MAX_CONFIG_BYTES` or not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path} ({e.strerror or e})") from None
    if len(raw) > _MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {_MAX_CONFIG_BYTES >> 20} MB: is it a config?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}): is it a config?") from None


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one file and, recursively, its ``base:`` files (relative to it), later values winning."""
    path = path.expanduser()
    problem = file_problem(path)
    if problem is not None:
        raise ConfigError(f"config file {path} {problem}: pass a file such as configs/fashion_mnist_rapidnet_ti.yaml")
    resolved = path.resolve()
    if resolved in seen:
        raise ConfigError(f"config file {path} inherits from itself through 'base:': break the cycle")
    text = _read_text(path)
    try:
        data = _safe_yaml(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or type(e).__name__).split())
        raise ConfigError(f"config file {path}{where} is not valid YAML ({problem})") from None
    except ValueError as e:  # the YAML is well formed but a value is not (an integer of 5000 digits)
        detail = " ".join(str(e).split())[:100]
        raise ConfigError(f"config file {path} holds a value that cannot be read ({detail})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not a {type(data).__name__}")
    bases = data.pop("base", None)
    if bases is None:
        return data
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str) or not base or "\0" in base:
            raise ConfigError(f"config file {path}: 'base' must be a file name or a list of them")
        problem = file_problem(path.parent / base)
        if problem is not None:
            raise ConfigError(
                f"config file {path}: its base {base!r} ({path.parent / base}) {problem}: name a YAML file, relative "
                "to this one"
            )
        merged = _deep_merge(merged, _read_yaml(path.parent / base, (*seen, resolved)))
    return _deep_merge(merged, data)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(a)
    for key, value in b.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=1e-3"`` -> (["optim", "lr"], 0.001); the value is read as YAML (``null``, ``[1, 2]``, ``true``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} is not KEY=VALUE with a dotted key, e.g. optim.lr=1e-3")
    try:
        value = _safe_yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, ValueError):  # not YAML (or an alias): the text itself, which the schema then checks
        value = raw
    return key.split("."), value


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


# ---- where values came from ---------------------------------------------------------------------------------------

#: the longest override a message repeats (an override may hold a list of a million numbers)
_MAX_SHOWN = 80


@dataclass(frozen=True)
class _Origins:
    """Names where each value came from: ``default`` (the file), except for keys an override or flag set."""

    default: str
    keys: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, key: str) -> str:
        key = re.sub(r"\[\d+\]", "", key)  # aug.zoom[0] came from where aug.zoom did
        parts = key.split(".")
        for n in range(len(parts), 0, -1):  # the key itself, then the sections that hold it
            named = self.keys.get(".".join(parts[:n]))
            if named is not None:
                return named
        inside = [name for k, name in self.keys.items() if k.startswith(key + ".")]  # --set train.epochs.x=1
        return inside[-1] if inside else self.default


def _claim(origins: dict[str, str], dotted: str, name: str) -> None:
    """Record that ``name`` set ``dotted``, replacing what set it or anything below it before."""
    for key in [k for k in origins if k == dotted or k.startswith(dotted + ".")]:
        del origins[key]
    origins[dotted] = name


def _override_name(text: str) -> str:
    """``--set KEY=VALUE`` as the message names it: on one line, cut short."""
    text = " ".join(text.split())
    return f"--set {clip(text, _MAX_SHOWN)}"


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
    sources: Mapping[str, str] | None = None,
) -> Config:
    """Build a validated :class:`Config` from defaults, ``base`` (a dict, e.g. a checkpoint's), a YAML file, overrides.

    Later sources win. ``overrides`` are ``KEY=VALUE`` strings with dotted keys (``data.batch_size=64``), read as
    YAML; ``values`` maps dotted keys to already-typed values (what command-line flags give) and is applied last.
    A bad value is reported with where it came from: its ``--set`` override, the name ``sources`` gives its key in
    ``values`` (the flag, e.g. ``--epochs``; "command line" where it gives none), else the file.
    """
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    default = "command line"
    if path is not None:
        tree = _deep_merge(tree, _read_yaml(Path(path)))
        default = str(path)
    origins: dict[str, str] = {}
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(tree, keys, value)
        _claim(origins, ".".join(keys), _override_name(text))
    for dotted, value in (values or {}).items():
        _set_path(tree, dotted.split("."), value)
        _claim(origins, dotted, (sources or {}).get(dotted, "command line"))
    return _config_from_tree(tree, _Origins(default, origins))


# ---- validation ---------------------------------------------------------------------------------------------------

#: where a value came from, by its dotted key (an :class:`_Origins`, or any such function)
Where = Callable[[str], str]


def type_name(tp: Any) -> str:
    """A type annotation in words, for messages and the config reference: ``int or null``, ``list of float``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, where: Where) -> Any:
    """Check ``value`` against the annotation ``tp``, converting only where YAML is ambiguous (``1e-3`` is a str)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where(key)}: {key} must be {type_name(tp)}, got {_show(value)}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, f"{key}[{i}]", where) for i, v in enumerate(value)]
        raise ConfigError(f"{where(key)}: {key} must be {type_name(tp)}, got {_show(value)}")
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{where(key)}: {key} must be a mapping, got {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an integer of hundreds of digits
                number = None
        elif isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value)
        if number is not None and math.isfinite(number):
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is Any:
        return value
    raise ConfigError(f"{where(key)}: {key} must be {type_name(tp)}, got {_show(value)}")


def _build(cls: type[T], values: Any, prefix: str, where: Where) -> T:
    """``cls`` from a mapping: each key known, of the field's type and within the field's :class:`Constraint`."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where(prefix)}: {prefix or 'the config'} must be a mapping, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(fields)
            shown = _show(full)[1:-1] if isinstance(key, str) else _show(full)
            raise ConfigError(f"{where(full)}: unknown config key '{shown}' (known {prefix or 'sections'}: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, full, where)
            continue
        kwargs[key] = _coerce(value, tp, full, where)
        constraint = constraint_of(fields[key])
        problem = constraint and constraint.problem(kwargs[key], full, _allows_none(tp), _integral(tp))
        if problem:
            bad_key, what, bad = problem
            raise ConfigError(f"{where(bad_key)}: {bad_key} must be {what}, got {_show(bad)}")
    return cls(**kwargs)


def build_section(cls: type[T], mapping: Any, prefix: str = "task", source: str | Where = "config") -> T:
    """A settings dataclass (``cls``, fields declared with :func:`setting`) from ``mapping``, checked as the main
    config is: an unknown key, a wrong type or a value out of range is a one-line :class:`ConfigError` that names
    ``prefix.KEY`` and ``source`` (a name, or a function of the dotted key such as :meth:`Config.source_of`)."""
    where = source if callable(source) else _Origins(source)
    return _build(cls, {} if mapping is None else mapping, prefix, where)


def _check_across(cfg: Config, where: Where) -> None:
    """The checks that tie fields together; each field's own range is declared on it (see :class:`Constraint`)."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{where(key)}: {key} must be {what}, got {_show(_get(cfg, key))}")

    twice = sorted(k for k in cfg.model.kwargs if k in {f.name for f in dataclasses.fields(ModelConfig)})
    if twice:  # the task passes model.X itself: the same key in model.kwargs would reach the constructor twice
        raise ConfigError(f"{where('model.kwargs')}: set model.{twice[0]}, not model.kwargs.{twice[0]}")
    need(
        not cfg.sched.step_on_epochs or float(cfg.sched.warmup_epochs).is_integer(),
        "sched.warmup_epochs",
        "whole epochs where sched.step_on_epochs is true (a fraction needs step_on_epochs: false)",
    )
    zoom = cfg.aug.zoom
    need(zoom is None or zoom[0] <= zoom[1], "aug.zoom", "[min, max] with min <= max")
    need(
        all(-cfg.train.epochs <= m for m in cfg.sched.decay_milestones),
        "sched.decay_milestones",
        "epochs (a negative one counts back from the last epoch, -1: the last) within train.epochs",
    )
    kind = cfg.distill.type
    if kind != "none" and not (cfg.distill.teacher or cfg.distill.teacher_checkpoint):
        raise ConfigError(
            f"{where('distill.type')}: distill.type is {kind!r} but no teacher is given: "
            "set distill.teacher / --teacher (and --teacher-checkpoint), or distill.type none"
        )
    if kind != "none" and cfg.model.distillation is False:
        raise ConfigError(f"{where('distill.type')}: distill.type {kind!r} needs model.distillation true (or null)")


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, cut short (a key may hold a list of a million numbers)."""
    text = " ".join(repr(value).split())
    return clip(text, _MAX_SHOWN)


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _config_from_tree(tree: dict[str, Any], where: Where) -> Config:
    cfg = _build(Config, tree, "", where)
    _check_across(cfg, where)
    cfg.__dict__["_where"] = where  # not a field: never saved, but the tasks name the source of their task: keys
    return cfg


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict (as read from YAML or a checkpoint) into a :class:`Config`; messages name ``source``."""
    return _config_from_tree(tree, _Origins(source))


def scaled_lr(optim: OptimConfig, global_batch: int) -> float:
    """The learning rate: ``optim.lr`` when set, else the linear scaling rule ``base_lr * global_batch / lr_base_size``.

    The paper's recipe is 2e-3 at a global batch of 1024, so 8 processes x 128 or 4 x 256 both give 2e-3.
    """
    return optim.lr if optim.lr is not None else optim.base_lr * global_batch / optim.lr_base_size


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (YAML/JSON/``torch.load(weights_only=True)`` friendly)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | os.PathLike[str]) -> None:
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def config_diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Keys whose values differ between two config dicts, as ``(dotted_key, value_in_a, value_in_b)``."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(a) | set(b)):
        full = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict) and key != "kwargs":
            out += config_diff(va, vb, full)
        elif va != vb:
            out.append((full, va, vb))
    return out
