"""The precision losses are computed in: fp32 for half-precision inputs, float64 kept as it is."""

from __future__ import annotations

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when it is fp16/bf16 (autocast outputs), unchanged when it is fp32 or float64.

    DINO and DINOv2 compute their losses, centers and Sinkhorn-Knopp in fp32 under mixed precision.
    A float64 run (the golden trajectories against the official code) stays in float64 throughout.
    """
    return x if x.dtype == torch.float64 else x.float()
