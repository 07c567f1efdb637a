"""iBOT masked-patch self-distillation loss (Zhou et al. 2022; DINOv2, Oquab et al. 2023).

Follows facebookresearch/dinov2 ``loss/ibot_patch_loss.py`` (``forward`` and
``forward_masked``): the student sees masked global views, the teacher the same
views unmasked; the cross-entropy of each masked patch is averaged per image, then
over all images of the batch (an image without a mask contributes 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_bench.losses.precision import at_least_fp32


def ibot_patch_loss(student_patch_logits: torch.Tensor, teacher_patch_probs: torch.Tensor,
                    masks: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Dense form: every patch has logits, only the masked ones count.

    Args:
        student_patch_logits: (B, N, K) student head outputs for the patch tokens.
        teacher_patch_probs: (B, N, K) teacher target probabilities.
        masks: (B, N) bool, True where the student's patch was replaced by the mask token.
        student_temp: tau_s.
    Returns:
        Scalar loss.
    """
    masks = masks.bool()
    return ibot_masked_patch_loss(student_patch_logits[masks], teacher_patch_probs[masks], masks, student_temp)


def ibot_masked_patch_loss(student_masked_logits: torch.Tensor, teacher_masked_probs: torch.Tensor,
                           masks: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Same loss computed on the masked patches only, as training does (no head on visible patches).

    Args:
        student_masked_logits: (M, K) logits of the masked patches, in ``masks.nonzero()`` order.
        teacher_masked_probs: (M, K) targets of the same patches.
        masks: (B, N) bool; M = masks.sum().
        student_temp: tau_s.
    """
    masks = masks.bool()
    per_patch = torch.sum(-at_least_fp32(teacher_masked_probs)
                          * F.log_softmax(at_least_fp32(student_masked_logits) / student_temp, dim=-1), dim=-1)
    masked_per_image = masks.sum(dim=-1).clamp(min=1).float()  # (B,)
    weights = (1.0 / masked_per_image).unsqueeze(-1).expand_as(masks)[masks]  # (M,)
    return torch.sum(per_patch * weights) / masks.shape[0]
