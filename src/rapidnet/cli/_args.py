"""argparse ``type=`` functions for numbers with a range: a value out of range is argparse's own one-line usage
error (exit status 2), before any model or data set is loaded."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in ``low..high`` (no upper bound when ``high`` is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bound = f"{low}..{high}" if high is not None else f"{low} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use {bound}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message
    return parse


def fraction(text: str) -> float:
    """A number in (0, 1], such as a crop fraction."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"{text} is out of range: use a number in (0, 1], e.g. 0.875")
    return value


def float_in(low: float, high: float, *, low_open: bool = True) -> Callable[[str], float]:
    """A finite number in ``(low, high]`` (``[low, high]`` with ``low_open=False``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        ok = (value > low if low_open else value >= low) and value <= high  # NaN fails too
        if not ok:
            bound = f"{'more than' if low_open else 'at least'} {low:g} and at most {high:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: use a number {bound}")
        return value

    parse.__name__ = "number"
    return parse
