"""Every network: RapidNet (``rapidnet.py``, its argument limits in ``limits.py``, its architecture as data in
``spec.py``), Mask R-CNN (``detection.py``) and Semantic FPN (``segmentation.py``) on its FPN backbone
(``backbone.py``); checkpoints (``checkpoint.py``: one read of a file into a ``Checkpoint`` record; ``key_names.py``:
the authors' key names; ``metadata.py``: stored metadata decoded and bounded), the variants and their timm entry
points (``factory.py``), loading any of them from a file (``loading.py``) and reparameterization.

The modules import one way: limits <- rapidnet <- spec, key_names, metadata <- checkpoint <- factory <- backbone <-
detection / segmentation <- loading. No module shares its name with a function the package exports (``mask_rcnn``,
``semantic_fpn``), so ``import rapidnet.models.detection as m`` gives the module."""

from rapidnet.models.checkpoint import (
    Checkpoint,
    checkpoint_filter_fn,
    load_state_dict_file,
    model_metadata,
    read_checkpoint_file,
    save_weights,
)
from rapidnet.models.detection import mask_rcnn
from rapidnet.models.factory import create_model, is_rapidnet, list_variants
from rapidnet.models.loading import load, load_model
from rapidnet.models.rapidnet import VARIANTS, RapidNet
from rapidnet.models.reparam import reparameterize, reparameterize_
from rapidnet.models.segmentation import semantic_fpn

__all__ = [
    "VARIANTS",
    "Checkpoint",
    "RapidNet",
    "checkpoint_filter_fn",
    "create_model",
    "is_rapidnet",
    "list_variants",
    "load",
    "load_model",
    "load_state_dict_file",
    "mask_rcnn",
    "model_metadata",
    "read_checkpoint_file",
    "reparameterize",
    "reparameterize_",
    "save_weights",
    "semantic_fpn",
]
