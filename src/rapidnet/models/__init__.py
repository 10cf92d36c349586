"""RapidNet models: the network (``rapidnet.py``), checkpoints and reparameterization."""

from rapidnet.models.checkpoint import checkpoint_filter_fn, load_model, load_state_dict_file, save_weights
from rapidnet.models.factory import create_model, list_variants
from rapidnet.models.rapidnet import VARIANTS, RapidNet
from rapidnet.models.reparam import reparameterize, reparameterize_

__all__ = [
    "VARIANTS",
    "RapidNet",
    "checkpoint_filter_fn",
    "create_model",
    "list_variants",
    "load_model",
    "load_state_dict_file",
    "reparameterize",
    "reparameterize_",
    "save_weights",
]
