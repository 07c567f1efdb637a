"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv 2104.14294), and its ablations.

Reference code: facebookresearch/dino ``main_dino.py`` (``train_one_epoch``, ``DINOLoss``).
Ablations that change control flow are registered names (DESIGN.md habit 3); each
overrides one hook of :class:`DINO` so the training step below stays the paper's.
Numbers (teacher temperature and its warmup, center momentum) stay config values.
"""

from __future__ import annotations

import torch

from ssl_bench.config import Config
from ssl_bench.losses import Centering, NoCentering, dino_cross_entropy, sinkhorn_knopp, teacher_targets
from ssl_bench.methods.base import METHODS, SSLMethod, ema_update

NUM_GLOBAL_CROPS = 2


@METHODS.register("dino", "DINO: EMA teacher, centering + sharpening, multi-crop cross-entropy")
class DINO(SSLMethod):
    """DINO as the paper defines it."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.centering = self.build_centering(cfg.method.out_dim)

    def training_step(self, batch: tuple[list[torch.Tensor], torch.Tensor], batch_idx: int) -> torch.Tensor:
        crops = batch[0]  # 2 global views first, then the local views
        step = self.global_step
        teacher_temp = self.teacher_temp_at(step)

        with torch.no_grad():
            teacher_cls = self.teacher.backbone_cls(crops[:NUM_GLOBAL_CROPS])
            teacher_logits = self.teacher.head(teacher_cls)
            targets = self.teacher_probs(teacher_logits, teacher_temp).chunk(NUM_GLOBAL_CROPS)
        student_logits = self.student(crops).chunk(len(crops))
        loss = dino_cross_entropy(targets, student_logits, self.cfg.method.student_temp)
        self.finite.observe(step, "teacher output", teacher_logits)  # the loss itself: in optimize

        schedule = self.optimize(loss, step)
        self.centering.update(teacher_logits)
        momentum = self.momentum_at(step)
        ema_update(self.teacher, self.student, momentum)

        self.offer_diagnostics(targets, student_logits, teacher_cls)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/lr": schedule["lr"], "train/wd": schedule["wd"],
                       "train/momentum": momentum, "train/teacher_temp": teacher_temp})
        return loss

    # ----- hooks the ablations override --------------------------------------------
    def build_centering(self, dim: int) -> Centering:
        return Centering(dim, self.cfg.method.center_momentum)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(2B, K) targets: centred and sharpened teacher outputs (DINO Eq. 3-4)."""
        return teacher_targets(teacher_logits, self.centering.center, teacher_temp)


@METHODS.register("dino_no_centering", "DINO ablation: the center stays zero (Fig. 7: entropy -> 0)")
class DINONoCentering(DINO):
    """DINO without centering; sharpening alone makes one prototype dominate."""

    def build_centering(self, dim: int) -> Centering:
        return NoCentering(dim, self.cfg.method.center_momentum)


@METHODS.register("dino_no_sharpening",
                  "DINO ablation: teacher temperature = student temperature (Fig. 7: entropy -> log K)")
class DINONoSharpening(DINO):
    """DINO without sharpening; centering alone pushes the targets to uniform."""

    def teacher_temp_at(self, step: int) -> float:
        return self.cfg.method.student_temp


@METHODS.register("dino_no_centering_no_sharpening",
                  "DINO ablation: neither centering nor sharpening (nothing prevents collapse)")
class DINONoCenteringNoSharpening(DINONoCentering, DINONoSharpening):
    """Both ablations at once: the teacher is a plain EMA softmax at the student's temperature."""


@METHODS.register("dino_sinkhorn", "DINO with Sinkhorn-Knopp targets instead of centering (Table 7 row 3)")
class DINOSinkhorn(DINO):
    """Teacher targets are a balanced Sinkhorn-Knopp assignment; no center is kept."""

    def build_centering(self, dim: int) -> Centering:
        return NoCentering(dim, self.cfg.method.center_momentum)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, self.cfg.method.sinkhorn_iterations)


@METHODS.register("dino_no_multicrop", "DINO with the 2 global views only (Table 7 row 4)")
class DINONoMultiCrop(DINO):
    """No local crops: the data pipeline delivers 2 global views; the loss has 2 pairs."""

    uses_local_crops = False


@METHODS.register("dino_no_momentum", "DINO with teacher = student at every step (Table 7 row 2: collapses)")
class DINONoMomentum(DINO):
    """Teacher momentum 0: the EMA copies the student after every step."""

    def momentum_at(self, step: int) -> float:
        return 0.0
