"""DINO self-distillation loss (Caron et al. 2021, facebookresearch/dino ``DINOLoss``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_bench.losses.precision import at_least_fp32


def teacher_targets(teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution ``softmax((t - c) / tau_t)``.

    Args:
        teacher_logits: (N, K) teacher head outputs.
        center: (K,) or (1, K) running center.
        teacher_temp: tau_t; small values sharpen.
    Returns:
        (N, K) probabilities, computed in fp32.
    """
    return F.softmax((at_least_fp32(teacher_logits) - at_least_fp32(center)) / teacher_temp, dim=-1)


def dino_cross_entropy(teacher_probs: list[torch.Tensor], student_logits: list[torch.Tensor],
                       student_temp: float) -> torch.Tensor:
    """Mean over (teacher view i, student view j != i) of the batch-mean ``-sum p_t log softmax(s / tau_s)``.

    Args:
        teacher_probs: targets for the 2 global views, each (B, K).
        student_logits: student head outputs for all V views, each (B, K);
            the first ``len(teacher_probs)`` are the same global views.
        student_temp: tau_s.
    Returns:
        Scalar loss.
    """
    log_probs = [F.log_softmax(at_least_fp32(s) / student_temp, dim=-1) for s in student_logits]
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for i, target in enumerate(teacher_probs):
        for j, log_p in enumerate(log_probs):
            if i == j:
                continue  # the same view seen by teacher and student carries no signal
            total = total + torch.sum(-target * log_p, dim=-1).mean()
            pairs += 1
    return total / pairs
