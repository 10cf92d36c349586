"""Training configuration: YAML files (``configs/*.yaml``) with ``base:`` inheritance and command-line overrides.

A config is a tree of small dataclasses so that a typo is caught when the file is read, not three hours into a run:
an unknown key, a value of the wrong type or out of range is a one-line :class:`~rapidnet.errors.ConfigError` that
names the key (``optim.lrr``) and the file. Defaults are the paper's ImageNet recipe (SPEC.md, "Training recipes").

The engine (``rapidnet.engine``) reads ``train``, ``optim``, ``sched`` and ``ema``; the classification task reads
``model``, ``data``, ``aug`` and ``distill``. Other tasks keep their own settings under ``task:`` (a free mapping
that the task itself validates), or add a typed section here.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rapidnet.constants import (
    MAX_BATCH,
    MAX_EPOCHS,
    MAX_IMAGES,
    MAX_INTERVAL,
    MAX_SEED,
    MAX_TIME_BUDGET,
    MAX_WORKERS,
)
from rapidnet.errors import ConfigError, file_problem
from rapidnet.utils import atomic_write

__all__ = [
    "AugConfig",
    "Config",
    "DataConfig",
    "DistillConfig",
    "EmaConfig",
    "ModelConfig",
    "OptimConfig",
    "SchedConfig",
    "TrainConfig",
    "config_diff",
    "config_from_dict",
    "config_to_dict",
    "load_config",
    "parse_override",
    "save_config",
    "scaled_lr",
]


@dataclass
class ModelConfig:
    """Which network to train. ``num_classes`` and ``distillation`` default to what the data and teacher imply."""

    name: str = "rapidnet_ti"
    num_classes: int | None = None
    distillation: bool | None = None
    drop_path_rate: float = 0.1  # the one default (rapidnet.models.rapidnet.DEFAULT_DROP_PATH_RATE), every backbone
    drop_rate: float = 0.0
    checkpoint: str | None = None  # initial weights (fine-tuning): any checkpoint rapidnet.load_model reads
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra constructor arguments (depths, widths, head_dim)


@dataclass
class DataConfig:
    """Where the images come from and how they are fed; batch sizes are per process (global = x world size)."""

    path: str = "fashion-mnist"
    input_size: int = 224
    batch_size: int = 128
    eval_batch_size: int | None = None  # None: 2 x batch_size
    workers: int = 4
    pipeline: str = "timm"  # "timm": PIL + timm transforms; "tensor": in-memory batch augmentation (Fashion-MNIST)
    crop_pct: float | None = None  # eval transform; None: the model's pretrained_cfg (0.9)
    interpolation: str | None = None  # eval resize; None: the model's pretrained_cfg (bicubic)
    mean: list[float] | None = None
    std: list[float] | None = None
    limit_train: int | None = None  # a fixed random subset, for quick runs and tests
    limit_val: int | None = None
    skip_corrupt: bool = False
    pin_memory: bool = True


@dataclass
class AugConfig:
    """Training augmentation (DeiT recipe through timm); set a probability/alpha to 0 to switch a piece off."""

    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float = 0.4
    train_interpolation: str = "random"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    re_prob: float = 0.25
    re_mode: str = "pixel"
    re_count: int = 1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    repeated_aug: bool = True  # timm RepeatAugSampler, used when training on more than one process
    repeats: int = 3
    crop_padding: int = 4  # "tensor" pipeline only: random crop after zero padding (its geometric augmentation)
    # "tensor" pipeline only: per batch, resize the images to a side drawn from [min, max] pixels (aspect from
    # ``ratio``) and place each at random on a black canvas up to a quarter larger. Trained only at 32 pixels, a
    # network's deep stages see 1x1 and 2x2 maps, and dense models at larger sizes meet kernels it never trained.
    zoom: list[int] | None = None
    noise: float = 0.0  # "tensor" pipeline only: Gaussian pixel noise, std drawn per batch from [0, noise] (0-255)


@dataclass
class OptimConfig:
    """Optimizer (timm ``create_optimizer_v2``). ``lr`` None means ``base_lr * global_batch / lr_base_size``."""

    opt: str = "adamw"
    lr: float | None = None
    base_lr: float = 2e-3
    lr_base_size: int = 1024
    weight_decay: float = 0.05
    eps: float = 1e-8
    betas: list[float] | None = None
    momentum: float = 0.9
    clip_grad: float | None = None
    fused: bool = False  # torch's fused kernel (adam, adamw, sgd): one pass over the weights, ~4x faster steps on CPU


@dataclass
class SchedConfig:
    """Learning-rate schedule (timm ``create_scheduler_v2``); ``step_on_epochs: false`` updates it every step."""

    name: str = "cosine"
    warmup_epochs: float = 20  # fractions count updates where step_on_epochs is false (0.2: a fifth of an epoch)
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    step_on_epochs: bool = True
    decay_milestones: list[int] = field(default_factory=lambda: [90, 180, 270])  # multistep
    decay_rate: float = 0.1  # step/multistep factor; the power of "poly"


@dataclass
class EmaConfig:
    """Model EMA (timm ``ModelEmaV3``); ``evaluate`` also validates the EMA weights each epoch."""

    enabled: bool = True
    decay: float = 0.99996
    warmup: bool = False
    evaluate: bool = True


@dataclass
class DistillConfig:
    """DeiT-style distillation through the model's distillation head; ``type: none`` trains a single head."""

    type: str = "none"  # none | hard | soft
    alpha: float = 0.5
    tau: float = 1.0
    teacher: str | None = None  # timm model name (or a RapidNet variant); None with a checkpoint: read the file
    teacher_checkpoint: str | None = None


@dataclass
class TrainConfig:
    """The run itself: length, seed, device and speed options, where results go."""

    epochs: int = 300
    seed: int = 0
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
    log_interval: int = 50  # steps between lines of steps.jsonl
    # evaluate after every N-th epoch and after the last (mmdetection's interval): a Mask R-CNN evaluation on CPU
    # costs a sixth of an epoch's time, which a short budget would rather spend on training
    eval_interval: int = 1
    # minutes of training and evaluation the run may take: after its first evaluation it measures an epoch and an
    # evaluation on this machine and runs as many of ``epochs`` as fit (the schedule follows); --epochs turns it off
    time_budget: float | None = None


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
    task: dict[str, Any] = field(default_factory=dict)  # settings of other tasks (detection...), checked by the task


# ---- reading ------------------------------------------------------------------------------------------------------

#: a config is a page of settings: more than this is not a config (and is not read into memory whole)
_MAX_CONFIG_BYTES = 1 << 20
#: nesting deeper than this is not a config either (and deep enough recursion would crash the reader)
_MAX_YAML_DEPTH = 32
#: the largest image side a config may train or evaluate at (as for a checkpoint's eval transform)
_MAX_SIDE = 4096


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


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Build a validated :class:`Config` from defaults, ``base`` (a dict, e.g. a checkpoint's), a YAML file, overrides.

    Later sources win. ``overrides`` are ``KEY=VALUE`` strings with dotted keys (``data.batch_size=64``), read as
    YAML; ``values`` maps dotted keys to already-typed values (what command-line flags give) and is applied last.
    """
    tree: dict[str, Any] = copy.deepcopy(base) if base else {}
    source = "command line"
    if path is not None:
        tree = _deep_merge(tree, _read_yaml(Path(path)))
        source = str(path)
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(tree, keys, value)
    for dotted, value in (values or {}).items():
        _set_path(tree, dotted.split("."), value)
    return config_from_dict(tree, source=source)


# ---- validation ---------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
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
                return _coerce(value, arg, key, source)
            except ConfigError:
                continue
        raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {_show(value)}")
    if origin is list:
        if isinstance(value, (list, tuple)):
            (inner,) = typing.get_args(tp)
            return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
        raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {_show(value)}")
    if origin is dict:
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{source}: {key} must be a mapping, got {_show(value)}")
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
    raise ConfigError(f"{source}: {key} must be {_type_name(tp)}, got {_show(value)}")


def _build(cls: type, values: Any, prefix: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix or 'the config'} must be a mapping, got {_show(values)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            known = ", ".join(fields)
            shown = _show(full)[1:-1] if isinstance(key, str) else _show(full)
            raise ConfigError(f"{source}: unknown config key '{shown}' (known {prefix or 'sections'}: {known})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, full, source)
        else:
            kwargs[key] = _coerce(value, tp, full, source)
    return cls(**kwargs)


_CHOICES: dict[str, tuple[Any, ...]] = {
    "data.pipeline": ("timm", "tensor"),
    "distill.type": ("none", "hard", "soft"),
    "aug.mixup_mode": ("batch", "pair", "elem"),
    "aug.re_mode": ("const", "rand", "pixel"),
}


def _validate(cfg: Config, source: str) -> None:
    """Range checks that types cannot express."""

    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            value = _get(cfg, key)
            raise ConfigError(f"{source}: {key} must be {what}, got {_show(value)}")

    for key, choices in _CHOICES.items():
        need(_get(cfg, key) in choices, key, "one of " + ", ".join(map(str, choices)))
    need(1 <= cfg.train.epochs <= MAX_EPOCHS, "train.epochs", f"1..{MAX_EPOCHS}")
    need(0 <= cfg.train.seed <= MAX_SEED, "train.seed", f"0..{MAX_SEED}")
    need(1 <= cfg.data.batch_size <= MAX_BATCH, "data.batch_size", f"1..{MAX_BATCH}")
    eval_batch = cfg.data.eval_batch_size
    need(eval_batch is None or 1 <= eval_batch <= MAX_BATCH, "data.eval_batch_size", f"1..{MAX_BATCH} or null")
    twice = sorted(k for k in cfg.model.kwargs if k in {f.name for f in dataclasses.fields(ModelConfig)})
    if twice:  # the task passes model.X itself: the same key in model.kwargs would reach the constructor twice
        raise ConfigError(f"{source}: set model.{twice[0]}, not model.kwargs.{twice[0]}")
    need(16 <= cfg.data.input_size <= _MAX_SIDE, "data.input_size", f"16..{_MAX_SIDE} pixels")
    for key in ("model.checkpoint", "distill.teacher_checkpoint", "distill.teacher"):
        need(_get(cfg, key) is None or _get(cfg, key).strip() != "", key, "a file (or model name), or null")
    need(0 <= cfg.model.drop_path_rate < 1, "model.drop_path_rate", "in [0, 1)")
    need(0 <= cfg.model.drop_rate < 1, "model.drop_rate", "in [0, 1)")
    need(cfg.model.num_classes is None or 1 <= cfg.model.num_classes <= 100_000, "model.num_classes", "1..100000")
    need(0 <= cfg.data.workers <= MAX_WORKERS, "data.workers", f"0..{MAX_WORKERS}")
    for key in ("data.limit_train", "data.limit_val"):
        need(_get(cfg, key) is None or 1 <= _get(cfg, key) <= MAX_IMAGES, key, f"1..{MAX_IMAGES} images or null")
    need(cfg.data.crop_pct is None or 0 < cfg.data.crop_pct <= 1, "data.crop_pct", "in (0, 1]")
    need(cfg.optim.lr is None or cfg.optim.lr > 0, "optim.lr", "positive")
    need(cfg.optim.base_lr > 0, "optim.base_lr", "positive")
    need(cfg.optim.lr_base_size >= 1, "optim.lr_base_size", "at least 1")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "0 or more")
    need(cfg.optim.clip_grad is None or cfg.optim.clip_grad > 0, "optim.clip_grad", "positive or null")
    need(cfg.sched.warmup_epochs >= 0, "sched.warmup_epochs", "0 or more")
    need(
        not cfg.sched.step_on_epochs or float(cfg.sched.warmup_epochs).is_integer(),
        "sched.warmup_epochs",
        "whole epochs where sched.step_on_epochs is true (a fraction needs step_on_epochs: false)",
    )
    need(0 <= cfg.ema.decay < 1, "ema.decay", "in [0, 1)")
    need(0 <= cfg.distill.alpha <= 1, "distill.alpha", "in [0, 1]")
    need(cfg.distill.tau > 0, "distill.tau", "positive")
    need(0 <= cfg.aug.smoothing < 1, "aug.smoothing", "in [0, 1)")
    need(cfg.aug.repeats >= 1, "aug.repeats", "at least 1")
    need(cfg.aug.repeats <= 64, "aug.repeats", "at most 64")
    need(0 <= cfg.aug.re_count <= 64, "aug.re_count", "0..64")
    need(0 <= cfg.aug.crop_padding <= _MAX_SIDE, "aug.crop_padding", f"0..{_MAX_SIDE}")
    zoom = cfg.aug.zoom
    zoom_ok = zoom is None or (len(zoom) == 2 and 4 <= zoom[0] <= zoom[1] <= _MAX_SIDE)
    need(zoom_ok, "aug.zoom", f"null or [min, max] with 4 <= min <= max <= {_MAX_SIDE}")
    need(cfg.aug.noise >= 0, "aug.noise", "0 or more")
    need(1 <= cfg.train.log_interval <= MAX_INTERVAL, "train.log_interval", f"1..{MAX_INTERVAL} steps")
    need(1 <= cfg.train.eval_interval <= MAX_INTERVAL, "train.eval_interval", f"1..{MAX_INTERVAL} epochs")
    budget = cfg.train.time_budget
    need(
        budget is None or 0 < budget <= MAX_TIME_BUDGET,
        "train.time_budget",
        f"more than 0 and at most {MAX_TIME_BUDGET} minutes, or null",
    )
    need(
        all(-cfg.train.epochs <= m for m in cfg.sched.decay_milestones),
        "sched.decay_milestones",
        "epochs (a negative one counts back from the last epoch, -1: the last) within train.epochs",
    )
    need(len(cfg.aug.scale) == 2, "aug.scale", "a [min, max] pair")
    need(len(cfg.aug.ratio) == 2, "aug.ratio", "a [min, max] pair")
    for key in ("data.mean", "data.std"):
        value = _get(cfg, key)
        need(value is None or len(value) == 3, key, "3 numbers (one per RGB channel) or null")
    need(cfg.optim.betas is None or len(cfg.optim.betas) == 2, "optim.betas", "a [beta1, beta2] pair or null")
    if cfg.distill.type != "none" and not (cfg.distill.teacher or cfg.distill.teacher_checkpoint):
        raise ConfigError(
            f"{source}: distill.type is {cfg.distill.type!r} but no teacher is given: "
            "set distill.teacher / --teacher (and --teacher-checkpoint), or distill.type none"
        )
    if cfg.distill.type != "none" and cfg.model.distillation is False:
        raise ConfigError(f"{source}: distill.type {cfg.distill.type!r} needs model.distillation true (or null)")


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, cut short (a key may hold a list of a million numbers)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 80 else text[:77] + "..."


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a nested dict (as read from YAML or a checkpoint) into a :class:`Config`."""
    cfg = _build(Config, tree, "", source)
    _validate(cfg, source)
    return cfg


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
