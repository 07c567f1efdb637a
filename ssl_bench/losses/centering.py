"""Teacher centering: an EMA of the teacher's batch-mean output (DINO, Caron et al. 2021, Eq. 4)."""

from __future__ import annotations

import torch
from torch import nn

from ssl_bench.dist import all_reduce_mean
from ssl_bench.losses.dino import teacher_targets
from ssl_bench.losses.precision import at_least_fp32


class Centering(nn.Module):
    """Holds the center ``c``; targets ``softmax((t - c) / tau_t)``, then ``c <- m c + (1 - m) mean(t)``.

    The batch mean is all-reduced across ranks, as in facebookresearch/dino
    ``DINOLoss.update_center``. The center is a buffer so checkpoints keep it.
    """

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Args: teacher_logits: (N, K). Returns (N, K) centred, sharpened targets (``teacher_targets``)."""
        return teacher_targets(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Args: teacher_logits: (N, K) teacher outputs of this rank's global views."""
        batch_center = at_least_fp32(teacher_logits).mean(dim=0, keepdim=True)
        batch_center = all_reduce_mean(batch_center)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)


class NoCentering(Centering):
    """Ablation: the center stays zero (DINO Fig. 7, 'no centering')."""

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        return None
