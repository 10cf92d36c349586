"""RapidNet: Multi-Level Dilated Convolution mobile backbones (WACV 2025), exact to the authors' model.

Importing this package registers ``rapidnet_ti``, ``rapidnet_s``, ``rapidnet_m`` and ``rapidnet_b`` with timm.
``rapidnet.load(path)`` rebuilds whatever model a checkpoint file holds and returns it with its metadata.

How the package imports, and why: the ``rapidnet`` command imports this package before it parses a flag, and torch
and timm take seconds and most of a gigabyte to import, which ``rapidnet --version`` and ``--help`` have no use for.
So ``import rapidnet`` loads neither: the names below (``rapidnet.create_model``, ``rapidnet.load``, ...) are looked
up in :mod:`rapidnet.models` on first use (PEP 562 module ``__getattr__``). timm finds the variants in its own
registry, which importing :mod:`rapidnet.models` fills; to keep ``import rapidnet`` followed by
``timm.create_model("rapidnet_ti")`` working in either import order, the models are imported as soon as timm is:
at once when timm is already imported, otherwise right after timm finishes importing (a one-shot import hook that
then removes itself). A process that never imports timm never pays for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import TYPE_CHECKING, Any

from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError

if TYPE_CHECKING:
    from rapidnet.models import (
        VARIANTS,
        RapidNet,
        create_model,
        list_variants,
        load,
        load_model,
        reparameterize,
        save_weights,
    )

__version__ = "0.1.0"

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "RapidNet",
    "RapidNetError",
    "__version__",
    "create_model",
    "list_variants",
    "load",
    "load_model",
    "reparameterize",
    "save_weights",
]

#: the names above that live in rapidnet.models (torch and timm), imported on first use
_MODEL_NAMES = frozenset(
    ("VARIANTS", "RapidNet", "create_model", "list_variants", "load", "load_model", "reparameterize", "save_weights")
)
_MODELS = "rapidnet.models"


def __getattr__(name: str) -> Any:
    """``rapidnet.create_model`` and the rest of the model API, and the subpackages, on first use."""
    if name in _MODEL_NAMES:
        value = getattr(importlib.import_module(_MODELS), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    if not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")  # ``rapidnet.models`` without importing it first
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def _register_models() -> None:
    """Import :mod:`rapidnet.models` (which registers the variants with timm), without failing the import of timm
    that triggered it: a broken model module shows as a warning here and as its error on first use."""
    if _MODELS in sys.modules:  # imported, or being imported (it is what imported timm)
        return
    try:
        importlib.import_module(_MODELS)
    except Exception as e:
        warnings.warn(f"rapidnet: the models were not registered with timm: {e}", RuntimeWarning, stacklevel=2)


class _AfterTimm:
    """A ``sys.meta_path`` finder: finds timm through the other finders and has its loader import
    :mod:`rapidnet.models` once timm is executed; removes itself on that first find. (No ``importlib.abc`` base
    classes: that module imports ``importlib.resources`` and more, at every start of the command.)"""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != "timm":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the other finders (timm is not in sys.modules yet)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister:
    """timm's own loader, then the models; timm's ``__loader__`` is set back to its own loader afterwards."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        module.__loader__ = self.loader
        if module.__spec__ is not None:
            module.__spec__.loader = self.loader
        _register_models()


if "timm" in sys.modules:
    _register_models()
elif not any(isinstance(finder, _AfterTimm) for finder in sys.meta_path):
    sys.meta_path.insert(0, _AfterTimm())
