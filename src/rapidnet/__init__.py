"""RapidNet: Multi-Level Dilated Convolution mobile backbones (WACV 2025), exact to the authors' model.

Importing this package registers ``rapidnet_ti``, ``rapidnet_s``, ``rapidnet_m`` and ``rapidnet_b`` with timm.
``rapidnet.load(path)`` rebuilds whatever model a checkpoint file holds and returns it with its metadata.
"""

from rapidnet.errors import CheckpointError, ConfigError, DataError, RapidNetError
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
