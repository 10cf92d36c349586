"""Training losses of the classification task: DeiT's distillation loss for RapidNet's two heads.

Kept apart from the task so that a loss can be built and tested from a base criterion and a teacher alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillationLoss"]


class DistillationLoss(nn.Module):
    """DeiT's loss for a model with a distillation head: ``(1 - alpha) * base(cls) + alpha * distill(dist)``.

    ``hard``: cross-entropy of the distillation logits against the teacher's arg-max; ``soft``: KL divergence at
    temperature ``tau`` (scaled by ``tau**2``), as in the authors' training code.
    """

    def __init__(self, base: nn.Module, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        super().__init__()
        self.base = base
        self.teacher = teacher
        self.kind = kind
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: torch.Tensor, outputs: Any, targets: torch.Tensor) -> torch.Tensor:
        return self.parts(inputs, outputs, targets)[0]

    def parts(
        self, inputs: torch.Tensor, outputs: Any, targets: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and, for two heads, its unweighted terms: ``loss_cls`` (base loss of the class head) and
        ``loss_distill`` (of the distillation head against the teacher); a single output has no terms."""
        if not isinstance(outputs, (tuple, list)):
            return self.base(outputs.float(), targets), {}
        logits, logits_dist = (o.float() for o in outputs)
        base_loss = self.base(logits, targets)
        with torch.no_grad():
            teacher_logits = self.teacher(inputs).float()
        if self.kind == "soft":
            t = self.tau
            distill = (
                F.kl_div(
                    F.log_softmax(logits_dist / t, dim=1),
                    F.log_softmax(teacher_logits / t, dim=1),
                    reduction="sum",
                    log_target=True,
                )
                * (t * t)
                / logits_dist.numel()
            )
        else:
            distill = F.cross_entropy(logits_dist, teacher_logits.argmax(dim=1))
        total = base_loss * (1 - self.alpha) + distill * self.alpha
        return total, {"loss_cls": base_loss.detach(), "loss_distill": distill.detach()}
