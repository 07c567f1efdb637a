"""DINO projection head (Caron et al. 2021, facebookresearch/dino ``vision_transformer.DINOHead``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` per output row.

    With ``norm_last_layer`` the scale ``g`` is fixed at 1, which the paper
    found stabilises training.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_scale: bool) -> None:
        super().__init__()
        self.direction = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.direction, std=0.02)
        self.scale = nn.Parameter(torch.ones(out_dim, 1), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.direction, dim=1) * self.scale)


class DINOHead(nn.Module):
    """MLP -> bottleneck -> L2-normalise -> weight-normed prototypes.

    Args (forward): x: (N, in_dim) backbone features. Returns (N, out_dim) logits.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, learn_scale=not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-12)
        return self.last_layer(x)
