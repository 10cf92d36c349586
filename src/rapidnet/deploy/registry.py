"""The runtimes by name and by file suffix: one name per runtime, one module per runtime, imported on first use.

``export``, ``quantize``, ``bench``, ``predict`` and ``eval`` find a runtime here (:func:`get` by name,
:func:`for_path` by a file's suffix) and call its :class:`~rapidnet.deploy.common.Runtime` methods; none of them
branches on a runtime's name. Runtime modules import only :mod:`rapidnet.deploy.common`, so an optional package
(OpenVINO, ExecuTorch, LiteRT, ...) is imported only when its runtime is used.

The table and what follows from names alone (:func:`file_runtimes`, :func:`unalias`, ...) are in
:mod:`rapidnet.runtimes`, which imports nothing, so the command line's parsers list them without loading torch;
they are re-exported here.
"""

from __future__ import annotations

import importlib
import os
import zipfile
from functools import cache
from pathlib import Path

from rapidnet.deploy.common import ExportedModel, Runtime
from rapidnet.errors import ConfigError
from rapidnet.runtimes import ALIASES, INT8, backend_names, file_runtimes, names, quantizing, suffixes, unalias
from rapidnet.runtimes import RUNTIMES as _RUNTIMES

__all__ = [
    "ALIASES",
    "INT8",
    "TASK_COMMANDS",
    "backend_name",
    "backend_names",
    "canonical",
    "file_runtimes",
    "for_path",
    "get",
    "is_exported_file",
    "load_exported",
    "names",
    "parse_backend",
    "quantizing",
    "suffixes",
    "unalias",
]


def canonical(name: str) -> str:
    """The one name of a runtime (an old alias mapped); an unknown name is a one-line error listing the known."""
    name = ALIASES.get(name, name)
    if name not in _RUNTIMES:
        raise ConfigError(f"unknown runtime {name!r}: choose one of {', '.join(_RUNTIMES)}")
    return name


def get(name: str) -> Runtime:
    """The runtime called ``name`` (or an alias of it): one instance per runtime."""
    return _instance(canonical(name))


@cache
def _instance(name: str) -> Runtime:
    module, cls, _ = _RUNTIMES[name]
    return getattr(importlib.import_module(module), cls)()


def for_path(path: str | os.PathLike) -> Runtime:
    """The runtime that runs a model file, from its suffix (one-line error for anything else)."""
    suffix = Path(path).suffix.lower()
    table = suffixes()
    if suffix not in table:
        known = ", ".join(f"{s} ({r})" for s, r in table.items())
        raise ConfigError(f"cannot tell which runtime runs {path}: give one of {known}")
    return get(table[suffix])


def is_exported_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a file one of the runtimes runs rather than a checkpoint of weights. A ``.pt`` is
    either: TorchScript archives hold a ``code/`` folder, ``torch.save`` archives none."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix != ".pt":
        return suffix in suffixes()
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name for name in archive.namelist()[:10_000])
    except (OSError, zipfile.BadZipFile):
        return False


TASK_COMMANDS = {"segmentation": "rapidnet seg", "detection": "rapidnet det"}


def load_exported(
    path: str | os.PathLike, threads: int | None = None, task: str | None = None
) -> tuple[ExportedModel, dict]:
    """An exported file as a module (:class:`~rapidnet.deploy.common.ExportedModel`) and the metadata it carries;
    with ``task``, a file of another task (a Semantic FPN given to ``predict``) is a one-line error naming its
    command."""
    runtime = for_path(path)
    runtime.require(f"running {Path(path).name}")
    if not runtime.runs_here:
        raise ConfigError(f"{runtime.title} files cannot be run on this machine: run {path} on its platform")
    runner = runtime.load(path, threads)
    kind = runner.metadata.get("task") or "classification"
    if task is not None and kind != task:
        command = TASK_COMMANDS.get(kind, "its own command")
        raise ConfigError(f"{path} holds a {kind} model, not {task}: run it with '{command}'")
    return ExportedModel(runner, runtime.input_shape(path)), runner.metadata


# ---- the benchmark's backends: each runtime, and "<runtime>-int8" where it has a quantizer ------------------------


_BACKEND_ALIASES = {"ort-fp32": "onnx", "ort-int8": "onnx-int8"}


def parse_backend(backend: str) -> tuple[Runtime, bool]:
    """``"openvino-int8"`` -> (the OpenVINO runtime, True); unknown names are a one-line error."""
    backend = _BACKEND_ALIASES.get(backend, backend)
    if backend not in backend_names():
        raise ConfigError(f"unknown backend {backend!r}: choose from {', '.join(backend_names())}")
    int8 = backend.endswith(INT8)
    return get(backend.removesuffix(INT8) if int8 else backend), int8


def backend_name(backend: str) -> str:
    """The one name of a backend (``ort-fp32`` -> ``onnx``)."""
    parse_backend(backend)
    return _BACKEND_ALIASES.get(backend, backend)
