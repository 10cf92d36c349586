"""User-facing errors: one line that names the problem and the fix.

The CLI prints these without a traceback and exits non-zero; the Python API raises them so callers can catch
them (each also subclasses the builtin exception a caller would naturally expect).
"""

from __future__ import annotations

import os
import stat


class RapidNetError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class CheckpointError(RapidNetError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(RapidNetError, ValueError):
    """A data set that is missing, empty or malformed."""


class ConfigError(RapidNetError, ValueError):
    """A configuration or command-line option that cannot be honoured."""


_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


def clip(text: str, limit: int = 40) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut: a value quoted in a one-line message may be a
    list of a million numbers."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def file_kind(mode: int) -> str:
    """What a ``stat`` mode says an entry is, for a message: "a file", "a folder", "a FIFO (named pipe)", ..."""
    return "a file" if stat.S_ISREG(mode) else _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a file ("does not exist", "is a folder", "is a character device", ...), or
    None when it is a regular file: an input's error then says what the path is instead of a guess."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else "is a broken link"
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None if stat.S_ISREG(mode) else f"is {file_kind(mode)}, not a file"
