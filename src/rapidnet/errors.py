"""User-facing errors: one line that names the problem and the fix.

The CLI prints these without a traceback and exits non-zero; the Python API raises them so callers can catch
them (each also subclasses the builtin exception a caller would naturally expect).
"""

from __future__ import annotations


class RapidNetError(Exception):
    """Base class for errors caused by bad input rather than by a bug."""


class CheckpointError(RapidNetError, ValueError):
    """A checkpoint that is missing, unreadable, or does not fit the model."""


class DataError(RapidNetError, ValueError):
    """A data set that is missing, empty or malformed."""


class ConfigError(RapidNetError, ValueError):
    """A configuration or command-line option that cannot be honoured."""
