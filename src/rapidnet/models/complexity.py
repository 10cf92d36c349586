"""Parameter and multiply-accumulate counts, the figures of SPEC.md and the paper's tables."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _as_hw(resolution: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return resolution, resolution
    h, w = resolution
    return int(h), int(w)


@torch.no_grad()
def count_gmacs(model: nn.Module, resolution: int | Sequence[int] = 224, in_chans: int = 3) -> float:
    """GMACs of one image: ``torch.utils.flop_counter`` FLOPs / 2 (convolutions and matmuls; BN and pooling free)."""
    h, w = _as_hw(resolution)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, in_chans, h, w, device=device))
    model.train(was_training)
    return counter.get_total_flops() / 2e9
