"""DINOv2-style training: DINO + iBOT masked-patch loss + KoLeo + Sinkhorn-Knopp targets.

Oquab et al. 2023 (arXiv 2304.07193), Sec. 4; reference code facebookresearch/dinov2
``train/ssl_meta_arch.py`` (``forward_backward``). iBOT: Zhou et al. 2022. Each
addition is one hook, so every "minus one" ablation is a registered two-line
subclass (DESIGN.md habit 3) and the weights stay config values
(``method.ibot_weight``, ``method.koleo_weight``; 0 switches a term off as well).
"""

from __future__ import annotations

import torch

from ssl_bench.config import Config
from ssl_bench.heads import DINOHead
from ssl_bench.losses import Centering, dino_cross_entropy, ibot_masked_patch_loss, koleo_loss, sinkhorn_knopp
from ssl_bench.losses import teacher_targets
from ssl_bench.methods.base import METHODS, StudentTeacherNet, ema_update
from ssl_bench.methods.dino import NUM_GLOBAL_CROPS, DINOSinkhorn


@METHODS.register("dinov2", "DINOv2-style: DINO + iBOT masked-patch loss + KoLeo, Sinkhorn-Knopp targets")
class DINOv2(DINOSinkhorn):
    """The student sees masked global views; its patch head predicts the teacher's tokens there."""

    uses_masks = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        m = cfg.method
        self.patch_dim = m.ibot_out_dim or m.out_dim
        if m.ibot_separate_head and self.uses_masks:  # without masks no patch is predicted: no head to add
            for net in (self.student, self.teacher):
                net.ibot_head = DINOHead(net.backbone.embed_dim, self.patch_dim, m.head_hidden_dim,
                                         m.head_bottleneck_dim, m.head_nlayers, m.norm_last_layer)
            self.teacher.ibot_head.load_state_dict(self.student.ibot_head.state_dict())
            self.teacher.ibot_head.requires_grad_(False)
        elif self.patch_dim != m.out_dim:
            raise ValueError(f"method.ibot_out_dim={m.ibot_out_dim} differs from method.out_dim={m.out_dim}: "
                             "a shared patch head has the DINO head's prototypes; set method.ibot_separate_head=true")
        self.patch_centering = self.build_centering(self.patch_dim)  # iBOT's own center (unused with SK)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        crops, masks = batch[0], self.masks_of(batch)  # masks: (2B, N) for torch.cat(global views)
        step, m = self.global_step, self.cfg.method
        teacher_temp = self.teacher_temp_at(step)
        global_views = torch.cat(crops[:NUM_GLOBAL_CROPS])

        with torch.no_grad():
            teacher = self.teacher.backbone(global_views)
            teacher_logits = self.teacher.head(teacher.cls)
            targets = self.teacher_probs(teacher_logits, teacher_temp).chunk(NUM_GLOBAL_CROPS)
        student = self.student.backbone(global_views, masks=masks)
        local_cls = [self.student.backbone_cls(crops[NUM_GLOBAL_CROPS:])] if len(crops) > NUM_GLOBAL_CROPS else []
        student_logits = self.student.head(torch.cat([student.cls, *local_cls])).chunk(len(crops))

        loss_dino = dino_cross_entropy(targets, student_logits, m.student_temp)
        loss_ibot = self.ibot_loss(teacher.patches, student.patches, masks, teacher_temp)
        loss_koleo = self.koleo_loss(student.cls)
        loss = loss_dino + m.ibot_weight * loss_ibot + m.koleo_weight * loss_koleo
        self.finite.observe(step, "teacher output", teacher_logits, teacher.patches)
        for what, term in (("DINO loss", loss_dino), ("iBOT loss", loss_ibot), ("KoLeo loss", loss_koleo)):
            self.finite.observe(step, what, term)

        schedule = self.optimize(loss, step)
        self.centering.update(teacher_logits)
        momentum = self.momentum_at(step)
        ema_update(self.teacher, self.student, momentum)

        self.offer_diagnostics(targets, student_logits, teacher.cls)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/loss_dino": loss_dino, "train/loss_ibot": loss_ibot, "train/loss_koleo": loss_koleo,
                       "train/lr": schedule["lr"], "train/wd": schedule["wd"], "train/momentum": momentum,
                       "train/teacher_temp": teacher_temp,
                       "train/masked_patches": float(masks.sum()) if masks is not None else 0.0})
        return loss

    # ----- hooks the ablations override --------------------------------------------
    def masks_of(self, batch: tuple) -> torch.Tensor | None:
        return batch[2].bool()

    def patch_probs(self, teacher_patch_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(M, K_p) targets of the masked patches: Sinkhorn-Knopp over all masked patches."""
        return sinkhorn_knopp(teacher_patch_logits, teacher_temp, self.cfg.method.sinkhorn_iterations)

    def ibot_loss(self, teacher_patches: torch.Tensor, student_patches: torch.Tensor, masks: torch.Tensor,
                  teacher_temp: float) -> torch.Tensor:
        """Masked-patch distillation; only the masked patches go through the heads.

        Args: teacher_patches, student_patches: (2B, N, D) backbone patch tokens of the global views
        (the student's with mask tokens); masks: (2B, N) bool. The patch center is updated once this
        step's targets exist, which is equivalent to updating it after the loss (it is not used again).
        """
        with torch.no_grad():
            teacher_patch_logits = patch_head(self.teacher)(teacher_patches[masks])  # (M, K_p)
            patch_targets = self.patch_probs(teacher_patch_logits, teacher_temp)
            if teacher_patch_logits.shape[0]:
                self.patch_centering.update(teacher_patch_logits)
        student_patch_logits = patch_head(self.student)(student_patches[masks])
        return ibot_masked_patch_loss(student_patch_logits, patch_targets, masks, self.cfg.method.student_temp)

    def koleo_loss(self, student_global_cls: torch.Tensor) -> torch.Tensor:
        """KoLeo on each global view's student CLS features, summed over the views (as DINOv2)."""
        return sum(koleo_loss(c) for c in student_global_cls.chunk(NUM_GLOBAL_CROPS))


def patch_head(net: StudentTeacherNet) -> torch.nn.Module:
    """The separate iBOT head when there is one, else the shared DINO head."""
    return getattr(net, "ibot_head", net.head)


@METHODS.register("dinov2_no_koleo", "DINOv2-style minus KoLeo (same as method.koleo_weight=0)")
class DINOv2NoKoLeo(DINOv2):
    def koleo_loss(self, student_global_cls: torch.Tensor) -> torch.Tensor:
        return student_global_cls.new_zeros(())


@METHODS.register("dinov2_no_ibot", "DINOv2-style minus the iBOT masked-patch loss (no masks, no mask token)")
class DINOv2NoIBOT(DINOv2):
    uses_masks = False

    def masks_of(self, batch: tuple) -> None:
        return None  # the student sees the global views unmasked

    def ibot_loss(self, teacher_patches: torch.Tensor, student_patches: torch.Tensor, masks: None,
                  teacher_temp: float) -> torch.Tensor:
        return student_patches.new_zeros(())


@METHODS.register("dinov2_no_sinkhorn", "DINOv2-style minus Sinkhorn-Knopp: centering for CLS and patch targets")
class DINOv2NoSinkhorn(DINOv2):
    def build_centering(self, dim: int) -> Centering:
        return Centering(dim, self.cfg.method.center_momentum)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return teacher_targets(teacher_logits, self.centering.center, teacher_temp)

    def patch_probs(self, teacher_patch_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return teacher_targets(teacher_patch_logits, self.patch_centering.center, teacher_temp)


@METHODS.register("ibot", "iBOT-style: DINO + masked-patch loss with its own patch center (no KoLeo, no SK)")
class IBOT(DINOv2NoSinkhorn, DINOv2NoKoLeo):
    """iBOT (Zhou et al. 2022) as DINOv2 runs it: centering for both heads, no KoLeo."""
