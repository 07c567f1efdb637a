"""KoLeo regulariser: spread features by pushing each away from its nearest neighbour.

Sablayrolles et al. 2019 (Kozachenko-Leonenko entropy estimator), as used in DINOv2
(Oquab et al. 2023, Sec. 4; facebookresearch/dinov2 ``loss/koleo_loss.py``):
``-mean_i log(min_{j != i} ||x_i - x_j||)`` on L2-normalised features.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_bench.losses.precision import at_least_fp32

EPS = 1e-8


def koleo_loss(features: torch.Tensor) -> torch.Tensor:
    """Args: features: (B, D), B >= 2; normalised here in fp32. Returns a scalar."""
    if features.shape[0] < 2:
        raise ValueError(f"koleo_loss needs at least 2 samples, got {features.shape[0]}")
    x = F.normalize(at_least_fp32(features), p=2, dim=-1, eps=EPS)
    with torch.no_grad():  # the neighbour is chosen, not differentiated through
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)  # below any cosine, so a sample is never its own neighbour
        neighbour = dots.argmax(dim=1)
    distances = (x - x[neighbour]).norm(dim=-1)
    return -torch.log(distances + EPS).mean()
