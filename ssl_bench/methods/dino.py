"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv 2104.14294).

Reference code: facebookresearch/dino ``main_dino.py`` (``train_one_epoch``, ``DINOLoss``).
Ablations of DINO Fig. 7 are registered as their own names because they change
control flow, not a number (DESIGN.md habit 3).
"""

from __future__ import annotations

import torch

from ssl_bench.config import Config
from ssl_bench.losses import Centering, NoCentering, dino_cross_entropy, teacher_targets
from ssl_bench.methods.base import METHODS, SSLMethod, ema_update

NUM_GLOBAL_CROPS = 2


@METHODS.register("dino", "DINO: EMA teacher, centering + sharpening, multi-crop cross-entropy")
class DINO(SSLMethod):
    """DINO as the paper defines it."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.centering = self.build_centering()

    def build_centering(self) -> Centering:
        return Centering(self.cfg.method.out_dim, self.cfg.method.center_momentum)

    def training_step(self, batch: tuple[list[torch.Tensor], torch.Tensor], batch_idx: int) -> torch.Tensor:
        crops, _ = batch  # 2 global views first, then the local views
        step = self.global_step
        teacher_temp = self.teacher_temp_at(step)

        with torch.no_grad():
            teacher_logits = self.teacher(crops[:NUM_GLOBAL_CROPS])
            targets = teacher_targets(teacher_logits, self.centering.center, teacher_temp)
        student_logits = self.student(crops)
        loss = dino_cross_entropy(targets.chunk(NUM_GLOBAL_CROPS), student_logits.chunk(len(crops)),
                                  self.cfg.method.student_temp)

        schedule = self.optimize(loss, step)
        self.centering.update(teacher_logits)
        momentum = self.momentum_at(step)
        ema_update(self.teacher, self.student, momentum)

        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({"train/lr": schedule["lr"], "train/wd": schedule["wd"],
                       "train/momentum": momentum, "train/teacher_temp": teacher_temp})
        return loss


@METHODS.register("dino_no_centering", "DINO ablation: the center stays zero (Fig. 7: entropy -> 0)")
class DINONoCentering(DINO):
    """DINO without centering; sharpening alone makes one prototype dominate."""

    def build_centering(self) -> Centering:
        return NoCentering(self.cfg.method.out_dim, self.cfg.method.center_momentum)


@METHODS.register("dino_no_sharpening",
                  "DINO ablation: teacher temperature = student temperature (Fig. 7: entropy -> log K)")
class DINONoSharpening(DINO):
    """DINO without sharpening; centering alone pushes the targets to uniform."""

    def teacher_temp_at(self, step: int) -> float:
        return self.cfg.method.student_temp
