"""Which command trains which task: a config for another task is refused in one line naming the right command."""

from __future__ import annotations

from typing import Any

from rapidnet.errors import ConfigError
from rapidnet.models.factory import check_rapidnet_args, is_rapidnet
from rapidnet.models.loading import TASK_KINDS

__all__ = ["TRAIN_COMMANDS", "check_task_name"]

#: ``task.name`` -> the command that trains it (one table with the loader's, which names them in its errors)
TRAIN_COMMANDS = TASK_KINDS


def check_task_name(name: Any, expected: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``name`` (a config's ``task.name``) is ``expected``."""
    if name == expected:
        return
    if name in TRAIN_COMMANDS:
        raise ConfigError(f"the config is for task {name!r}, not {expected}: train it with '{TRAIN_COMMANDS[name]}'")
    known = ", ".join(TRAIN_COMMANDS)
    raise ConfigError(f"task.name {name!r} is not a task: use one of {known} (with its own command)")


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Check a RapidNet's ``model.kwargs`` (MLDC settings, depths...) before any data is read: a typo costs nothing."""
    if is_rapidnet(name):
        check_rapidnet_args(name, kwargs)
