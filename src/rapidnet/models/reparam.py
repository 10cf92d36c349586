"""Inference-time reparameterization: fold everything that is linear at eval into the convolutions.

- the conditional positional encoding's identity into its 7x7 kernel centre;
- every BatchNorm into the convolution before it;
- every layer scale into the (BN-folded) convolution before it;
- the distillation classifier and the classifier into one (eval returns their mean).

Outputs are unchanged (to float rounding); the network gets cheaper. The result is the *plain* folded graph:
ordinary ``nn.Conv2d`` with their own padding, contiguous weights, ``nn.GELU``, nothing device-specific. It is what
every exporter takes, and its state dict loads strictly into ``RapidNet(inference_mode=True)``. The fast form for
CPU inference in PyTorch is that graph compiled by Inductor: :func:`rapidnet.deploy.compile_for_cpu`.
"""

import copy

from torch import nn


def reparameterize_(model: nn.Module) -> nn.Module:
    """Fold ``model`` in place (eval mode); works on classifiers and ``features_only`` wrappers alike."""
    model.eval()
    for module in list(model.modules()):
        if module is not model and hasattr(module, "reparameterize"):
            module.reparameterize()
    return model


def reparameterize(model: nn.Module) -> nn.Module:
    """Return a folded copy of ``model`` for inference, leaving the original trainable model untouched."""
    return reparameterize_(copy.deepcopy(model))
