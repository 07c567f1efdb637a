"""Sinkhorn-Knopp teacher targets (SwAV; DINO Table 7 row 3; DINOv2 Sec. 4).

Follows DINOv2 (Oquab et al. 2023), facebookresearch/dinov2
``loss/dino_clstoken_loss.py`` ``sinkhorn_knopp_teacher``: 3 iterations in fp32,
with every sum that crosses samples all-reduced so that B ranks of b samples give
the same targets as one process with the whole batch.
"""

from __future__ import annotations

import torch

from ssl_bench.dist import all_reduce_max, all_reduce_sum
from ssl_bench.losses.precision import at_least_fp32

TINY = torch.finfo(torch.float32).tiny


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Balanced soft assignment of samples to prototypes.

    Args:
        teacher_logits: (b, K) this rank's teacher outputs; the global batch is B = sum of b over ranks.
        teacher_temp: temperature applied before exponentiation.
        n_iterations: alternating prototype/sample normalisations.
    Returns:
        (b, K) fp32 target probabilities: each row sums to 1; over the global batch each
        column sums to B/K once the iterations have converged (approximately after 3).
    """
    scores = at_least_fp32(teacher_logits) / teacher_temp
    # One shared constant keeps exp() finite; any constant cancels in the normalisations,
    # but it must be the same on every rank, hence the all-reduced maximum.
    # An empty rank (e.g. no masked patch here) still joins every all-reduce.
    local_max = scores.max().reshape(1) if scores.numel() else scores.new_full((1,), float("-inf"))
    q = torch.exp(scores - all_reduce_max(local_max)).t()  # (K, b)
    num_samples = all_reduce_sum(torch.tensor([float(q.shape[1])], device=q.device))
    num_prototypes = q.shape[0]
    q /= all_reduce_sum(q.sum().reshape(1)).clamp_min(TINY)
    for _ in range(n_iterations):
        # A prototype whose every score underflowed to 0 stays 0 instead of turning into NaN.
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(TINY)  # each prototype gets mass 1/K ...
        q /= num_prototypes
        q /= q.sum(dim=0, keepdim=True).clamp_min(TINY)  # ... each sample mass 1/B (columns are rank-local)
        q /= num_samples
    q *= num_samples  # rows of the result are probability vectors
    return q.t()
