"""The parts a self-distillation method is composed of: teacher targets and optional loss terms.

- Teacher targets turn the teacher's logits into the student's targets: ``probs(logits, temp)``
  during the step, ``update(logits)`` after the optimizer step. DINO's centering (Caron et al.
  2021, Eq. 4), its "no centering" ablation (Fig. 7), and Sinkhorn-Knopp (DINO Table 7 row 3;
  DINOv2, Oquab et al. 2023, Sec. 4, facebookresearch/dinov2 ``train.centering``).
- Loss terms add a weighted loss to DINO's: iBOT's masked-patch loss (Zhou et al. 2022, as
  DINOv2's ``ibot_patch_loss``), with its own patch targets, and KoLeo (Sablayrolles et al. 2019,
  DINOv2's ``koleo_loss``). Each is built from the method, computes ``loss(step)`` from this
  step's tensors and may ``update()`` its state after the optimizer step.

The losses themselves are the pure functions of ``ssl_bench.losses``; these objects only hold
their state and say which tensors of the step they read.
"""

from __future__ import annotations

from typing import Any, ClassVar, NamedTuple, Optional

import torch
from torch import nn

from ssl_bench.backbones import Features
from ssl_bench.config import MethodConfig
from ssl_bench.heads import DINOHead
from ssl_bench.losses import Centering, NoCentering, ibot_masked_patch_loss, koleo_loss, sinkhorn_knopp

NUM_GLOBAL_CROPS = 2


# ----- teacher targets ------------------------------------------------------------------
class CenteringTargets(Centering):
    """DINO's targets ``softmax((t - c) / tau_t)``; ``c`` is an EMA (``method.center_momentum``) of the
    all-reduced batch mean, updated after the loss (facebookresearch/dino ``DINOLoss``)."""

    @classmethod
    def build(cls, m: MethodConfig, dim: int) -> "CenteringTargets":
        """Args: dim: K, the prototypes of the head whose logits this part turns into targets."""
        return cls(dim, m.center_momentum)


class ZeroCenterTargets(CenteringTargets, NoCentering):
    """DINO Fig. 7 "no centering": ``softmax(t / tau_t)``; the center is kept, zero, as a buffer so the
    checkpoint keys stay those of DINO (``NoCentering.update`` does nothing)."""


class SinkhornKnoppTargets(nn.Module):
    """Balanced Sinkhorn-Knopp assignment of the teacher logits (``method.sinkhorn_iterations``); no state."""

    def __init__(self, n_iterations: int = 3) -> None:
        super().__init__()
        self.n_iterations = n_iterations

    @classmethod
    def build(cls, m: MethodConfig, dim: int) -> "SinkhornKnoppTargets":
        return cls(m.sinkhorn_iterations)

    def probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Args: teacher_logits: (N, K). Returns (N, K) fp32 targets (``losses.sinkhorn_knopp``)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.n_iterations)

    def update(self, teacher_logits: torch.Tensor) -> None:
        return None  # the targets are computed from this batch alone


def drop_obsolete_centers(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: forget the unused zero centers of checkpoints written before the parts.

    Sinkhorn-Knopp methods (``dino_sinkhorn``, the ``dinov2`` family) then kept a ``NoCentering``
    center for CLS and patch targets that nothing read; it is all zeros. A non-zero center is a real
    one (a checkpoint of another method) and is left in place, so a strict load still fails on it.
    """
    expected = set(module.state_dict(prefix=prefix))
    for key in (f"{prefix}centering.center", f"{prefix}patch_centering.center"):
        if key in state_dict and key not in expected and not state_dict[key].any():
            del state_dict[key]


# ----- optional loss terms ------------------------------------------------------------------
class StepTensors(NamedTuple):
    """What a loss term may read from one step (detached where the teacher produced it)."""

    teacher: Features  # teacher backbone of the 2 global views: cls (2B, D), patches (2B, N, D)
    student: Features  # student backbone of the same views, masked where ``masks``: (2B, D), (2B, N, D)
    masks: Optional[torch.Tensor]  # (2B, N) bool iBOT masks, or None
    teacher_temp: float


class LossTerm:
    """An optional term ``weight * loss`` added to DINO's loss; logged as ``train/loss_<name>``.

    Not an ``nn.Module``: the state a term keeps is registered on the method under the names of
    ``modules()``, so checkpoint keys do not depend on the term's position in the recipe.
    """

    name: ClassVar[str]  # log key suffix
    what: ClassVar[str]  # the kind ``FiniteWatch`` reports when the term goes non-finite
    uses_masks: ClassVar[bool] = False  # True: the batches must carry iBOT masks, the student a mask token

    def __init__(self, m: MethodConfig, student: nn.Module, teacher: nn.Module) -> None:
        self.m = m

    def weight(self) -> float:
        raise NotImplementedError

    def loss(self, step: StepTensors) -> torch.Tensor:
        raise NotImplementedError

    def modules(self) -> dict[str, nn.Module]:
        return {}

    def update(self) -> None:
        """After the optimizer step (fp16-skipped or not), as the teacher targets."""

    def logs(self) -> dict[str, float]:
        return {}


class KoLeo(LossTerm):
    """KoLeo on each global view's student CLS features, summed over the views (DINOv2 ``forward_backward``);
    weight ``method.koleo_weight``."""

    name, what = "koleo", "KoLeo loss"

    def weight(self) -> float:
        return self.m.koleo_weight

    def loss(self, step: StepTensors) -> torch.Tensor:
        return sum(koleo_loss(c) for c in step.student.cls.chunk(NUM_GLOBAL_CROPS))


class IBOT(LossTerm):
    """iBOT masked-patch distillation with its own patch center (iBOT; DINOv2 ``train.centering centering``);
    weight ``method.ibot_weight``. Only the masked patches go through the heads.

    With ``method.ibot_separate_head`` both nets get an ``ibot_head`` (state keys ``student.ibot_head.*``,
    which checkpoint export reads), else the DINO head is shared; the patch targets live on the method as
    ``patch_centering``.
    """

    name, what, uses_masks = "ibot", "iBOT loss", True
    patch_targets: ClassVar[type] = CenteringTargets

    def __init__(self, m: MethodConfig, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(m, student, teacher)
        dim = m.ibot_out_dim or m.out_dim
        if m.ibot_separate_head:
            for net in (student, teacher):
                net.ibot_head = DINOHead(net.backbone.embed_dim, dim, m.head_hidden_dim, m.head_bottleneck_dim,
                                         m.head_nlayers, m.norm_last_layer)
            teacher.ibot_head.load_state_dict(student.ibot_head.state_dict())
            teacher.ibot_head.requires_grad_(False)
        elif dim != m.out_dim:
            raise ValueError(f"method.ibot_out_dim={m.ibot_out_dim} differs from method.out_dim={m.out_dim}: "
                             "a shared patch head has the DINO head's prototypes; set method.ibot_separate_head=true")
        self.student_head = getattr(student, "ibot_head", student.head)
        self.teacher_head = getattr(teacher, "ibot_head", teacher.head)
        self.targets = self.patch_targets.build(m, dim)
        # this step's teacher patch logits, one tensor per micro-batch (optim.accumulate_grad_batches), until update()
        self._pending: list[torch.Tensor] = []
        self._masked = 0

    def weight(self) -> float:
        return self.m.ibot_weight

    def modules(self) -> dict[str, nn.Module]:
        return {"patch_centering": self.targets}

    def loss(self, step: StepTensors) -> torch.Tensor:
        """Cross-entropy of the (M, K_p) masked patches, averaged per image (``losses.ibot_masked_patch_loss``)."""
        masks = step.masks.bool()
        with torch.no_grad():
            teacher_logits = self.teacher_head(step.teacher.patches[masks])  # (M, K_p)
            targets = self.targets.probs(teacher_logits, step.teacher_temp)
        self._pending.append(teacher_logits)
        student_logits = self.student_head(step.student.patches[masks])
        return ibot_masked_patch_loss(student_logits, targets, masks, self.m.student_temp)

    def update(self) -> None:
        """The patch targets' update with every masked patch of the step, all micro-batches together."""
        pending, self._pending = self._pending, []
        teacher_logits = pending[0] if len(pending) == 1 else torch.cat(pending)
        self._masked = teacher_logits.shape[0]
        if teacher_logits.shape[0]:  # a batch without masked patches leaves the center where it is
            self.targets.update(teacher_logits)

    def logs(self) -> dict[str, float]:
        return {"train/masked_patches": float(self._masked)}


class IBOTSinkhorn(IBOT):
    """iBOT with Sinkhorn-Knopp patch targets over all masked patches (DINOv2 ``train.centering sinkhorn_knopp``)."""

    patch_targets = SinkhornKnoppTargets
