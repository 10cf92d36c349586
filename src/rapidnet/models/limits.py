"""The limits of a RapidNet's constructor arguments: one rule per argument, read by everything that takes one.

A RapidNet's arguments arrive from code (``RapidNet(...)``, ``timm.create_model``), from YAML and ``--set``
(:func:`rapidnet.create_model`), from a checkpoint's metadata, and from the architecture read off a checkpoint's
weights. Each limit is written once, here, so that all four accept the same networks: a width one of them takes, the
others take too. A checkpoint is untrusted input, so the bounds also keep a few bytes of it from asking for
gigabytes; they are far beyond every real model. The ones the command line shows (:data:`MAX_WIDTH`,
:data:`MAX_CHANS`, :data:`MAX_CLASSES`) live in :mod:`rapidnet.constants`.

This module imports no other part of :mod:`rapidnet.models`: the network (``rapidnet.py``) checks its own arguments
with it, and every module above the network reads the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rapidnet.constants import MAX_CHANS, MAX_CLASSES, MAX_WIDTH
from rapidnet.errors import clip

__all__ = [
    "ARCH_KEYS",
    "GLOBAL_POOLS",
    "MAX_BLOCKS",
    "MAX_BRANCHES",
    "MAX_CHANS",
    "MAX_CLASSES",
    "MAX_DILATION",
    "MAX_KERNEL",
    "MAX_STAGES",
    "MAX_WIDTH",
    "MIN_WIDTH",
    "RULES",
    "ArgumentError",
    "Rule",
    "check_args",
]

#: the narrowest stage: the stem's first conv has half the first stage's channels
MIN_WIDTH = 2
#: stages of a network, and blocks of one kind (Inverted Residual or Dilated Convolution) in one stage
MAX_STAGES, MAX_BLOCKS = 16, 1_000
#: parallel MLDC branches, and the dilation of one
MAX_BRANCHES, MAX_DILATION = 16, 64
#: the largest (odd) kernel of the large-kernel FFN's depthwise conv
MAX_KERNEL = 63
#: the head's pooling: by mean (the paper's), or none (an NCHW map comes out)
GLOBAL_POOLS = ("avg", "")


def _int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _seq(value: Any) -> bool:
    """A list-like (YAML and JSON give lists, code tuples), not a string."""
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _depths(value: Any) -> bool:
    return (
        _seq(value)
        and 1 <= len(value) <= MAX_STAGES
        and all(_seq(d) and len(d) == 2 and all(_int(n, 0, MAX_BLOCKS) for n in d) for d in value)
    )


def _dilations(value: Any) -> bool:
    return _seq(value) and 1 <= len(value) <= MAX_BRANCHES and all(_int(d, 1, MAX_DILATION) for d in value)


@dataclass(frozen=True)
class Rule:
    """One argument's limit: ``ok(value)``, and ``what`` the value must be (the text of every error about it)."""

    ok: Callable[[Any], bool]
    what: str


#: every constructor argument's rule, in the order arguments are checked (the first bad one is reported)
RULES: dict[str, Rule] = {
    "depths": Rule(_depths, f"a list of [IR, DC] block counts (1..{MAX_STAGES} stages, each count 0..{MAX_BLOCKS})"),
    "widths": Rule(
        lambda v: _seq(v) and 1 <= len(v) <= MAX_STAGES and all(_int(w, MIN_WIDTH, MAX_WIDTH) for w in v),
        f"a list of stage widths, each {MIN_WIDTH}..{MAX_WIDTH}",
    ),
    "head_dim": Rule(lambda v: _int(v, 1, MAX_WIDTH), f"an integer in 1..{MAX_WIDTH}"),
    "num_classes": Rule(lambda v: _int(v, 0, MAX_CLASSES), f"an integer in 0..{MAX_CLASSES}"),
    "in_chans": Rule(lambda v: _int(v, 1, MAX_CHANS), f"an integer in 1..{MAX_CHANS}"),
    "drop_rate": Rule(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "drop_path_rate": Rule(lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "mlp_ratio": Rule(lambda v: _number(v) and 0 < v <= 16, "a number in (0, 16]"),
    "layer_scale_init": Rule(lambda v: _number(v) and abs(v) <= 1e3, "a number"),
    "distillation": Rule(lambda v: isinstance(v, bool), "true or false"),
    "inference_mode": Rule(lambda v: isinstance(v, bool), "true or false"),
    "features_only": Rule(lambda v: isinstance(v, bool), "true or false"),
    "global_pool": Rule(lambda v: v in GLOBAL_POOLS, "'avg' (pooling by mean) or '' (no pooling)"),
    "mldc_dilations": Rule(
        _dilations, f"a non-empty list of dilations, each 1..{MAX_DILATION} (e.g. [2, 3]; 1: no dilation)"
    ),
    "mldc_groups": Rule(lambda v: v == "depthwise" or _int(v, 1, MAX_WIDTH), "a positive integer or 'depthwise'"),
    "ffn_kernel": Rule(
        lambda v: _int(v, 1, MAX_KERNEL) and v % 2 == 1, f"an odd kernel size 1..{MAX_KERNEL} (it pads to 'same')"
    ),
}

#: the arguments a checkpoint describes (in its metadata or its weights) and the head's pooling: the constructor
#: checks these itself, so no way of building a RapidNet skips them
ARCH_KEYS = (
    "depths",
    "widths",
    "head_dim",
    "num_classes",
    "in_chans",
    "global_pool",
    "mldc_dilations",
    "mldc_groups",
    "ffn_kernel",
)


class ArgumentError(ValueError):
    """A constructor argument outside its rule: one line, ``key must be what, got value``."""

    def __init__(self, key: str, what: str, value: Any) -> None:
        super().__init__(f"{key} must be {what}, got {clip(repr(value), 60)}")
        self.key, self.what, self.value = key, what, value


def check_args(args: Mapping[str, Any], defaults: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`ArgumentError` for the first argument in ``args`` outside its rule.

    Rules of several arguments use ``defaults`` for the ones ``args`` leaves out (a variant's depths and widths):
    one width per stage, and an MLDC group count that divides the widths of the stages with Dilated Convolution
    blocks. Keys without a rule are not checked here.
    """
    for key, rule in RULES.items():
        if key in args and not rule.ok(args[key]):
            raise ArgumentError(key, rule.what, args[key])
        if key == "widths" and ("depths" in args or "widths" in args):
            depths, widths = _pick(args, defaults, "depths"), _pick(args, defaults, "widths")
            if len(depths) != len(widths):
                what = f"one width per stage (depths and widths of equal length: {len(depths)} stages in depths)"
                raise ArgumentError("widths", what, widths)
        if key == "mldc_groups" and key in args and args[key] != "depthwise":
            depths, widths = _pick(args, defaults, "depths"), _pick(args, defaults, "widths")
            stages = [w for d, w in zip(depths, widths, strict=False) if _seq(d) and len(d) == 2 and d[1]]
            if any(w % args[key] for w in stages):
                raise ArgumentError(key, f"a divisor of the stage widths {stages}", args[key])


def _pick(args: Mapping[str, Any], defaults: Mapping[str, Any] | None, key: str) -> Sequence[Any]:
    return args[key] if key in args else (defaults or {}).get(key, ())
