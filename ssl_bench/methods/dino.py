"""DINO: self-distillation with no labels (Caron et al. 2021, arXiv 2104.14294), composed from parts.

Reference code: facebookresearch/dino ``main_dino.py`` (``train_one_epoch``, ``DINOLoss``).
:class:`DINO` is the one training step of every registered method: the paper's algorithm box,
with the teacher targets as a part (``targets``: centering, no centering, Sinkhorn-Knopp) and
optional loss terms added to DINO's loss (``terms``: iBOT, KoLeo; ``methods/parts.py``). A method
is a registration that names its parts; control-flow ablations are registered names (DESIGN.md
habit 3), numbers (temperatures, center momentum, term weights) stay config values.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ssl_bench.backbones import has_batchnorm
from ssl_bench.config import Config, rank_batch_size
from ssl_bench.data.batch import Batch, as_batch, split_batch
from ssl_bench.losses import dino_cross_entropy
from ssl_bench.methods.base import METHODS, DiagnosticInputs, MicroStep, SSLMethod, ema_update, merge_diagnostics
from ssl_bench.methods.parts import (NUM_GLOBAL_CROPS, CenteringTargets, KoLeo, LossTerm, SinkhornKnoppTargets,
                                     StepTensors, ZeroCenterTargets, drop_obsolete_centers)

__all__ = ["DINO", "NUM_GLOBAL_CROPS"]


@METHODS.register("dino", "DINO: EMA teacher, centering + sharpening, multi-crop cross-entropy")
class DINO(SSLMethod):
    """DINO as the paper defines it; subclasses only name other parts.

    State keys: ``centering`` holds the CLS teacher targets whatever their kind (DINOv2 calls the
    choice ``train.centering`` too), so DINO's checkpoints keep ``centering.center``.
    """

    targets: ClassVar[type] = CenteringTargets  # .build(method cfg, K) -> probs() / update()
    terms: ClassVar[tuple[type[LossTerm], ...]] = ()  # optional terms, added to the loss in this order

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.uses_masks = any(term.uses_masks for term in cls.terms)  # read by run/train.py before building

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.centering = self.targets.build(cfg.method, cfg.method.out_dim)
        self.loss_terms = [term(cfg.method, self.student, self.teacher) for term in self.terms]
        for term in self.loss_terms:
            for name, module in term.modules().items():
                self.add_module(name, module)
        self.register_load_state_dict_pre_hook(drop_obsolete_centers)

    def teacher_probs(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """(2B, K) targets of the teacher's global-view logits (also read by ``run/evaluate.py``)."""
        return self.centering.probs(teacher_logits, teacher_temp)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        """One iteration of DINO's Algorithm 1, plus the recipe's optional terms.

        With ``optim.accumulate_grad_batches`` = A the loader's batch is A micro-batches of
        ``data.batch_size``: each is forwarded and back-propagated with its loss / A, and the
        optimizer, the targets (the center sees all A micro-batches' teacher outputs), the EMA and
        the schedules step once after the last, as one step of the whole batch.

        Args: batch: crops V tensors (B, 3, H_v, W_v), 2 global views first; masks (2B, N) or None.
        """
        step = self.global_step
        teacher_temp = self.teacher_temp_at(step)
        parts = split_batch(as_batch(batch), self.cfg.optim.accumulate_grad_batches)
        done: list[MicroStep] = []
        for i, part in enumerate(parts):
            micro = self.forward_losses(part, step, teacher_temp)
            loss = self.weighed_loss(step, micro.losses) / len(parts)
            if i < len(parts) - 1:  # accumulate: the gradients sum over the micro-batches
                self.finite.observe(step, "loss", loss)
                with self.gradient_sync_paused():
                    self.manual_backward(loss)
            else:
                schedule = self.optimize(loss, step)
            done.append(micro._replace(loss=loss.detach()))
        return self.end_step(step, done, schedule, {"train/teacher_temp": teacher_temp})

    def forward_losses(self, batch: Batch, step: int, teacher_temp: float) -> MicroStep:
        """The teacher's targets and the student's losses of one (micro-)batch; nothing is updated.

        Args: batch: crops V tensors (b, 3, H_v, W_v); masks (2b, N) or None.
        """
        with torch.no_grad():  # the teacher sees the global views only
            teacher, teacher_logits = self.teacher.forward_views(batch.crops[:NUM_GLOBAL_CROPS])
            targets = self.teacher_probs(teacher_logits, teacher_temp).chunk(NUM_GLOBAL_CROPS)
        student, student_logits = self.student.forward_views(batch.crops, batch.masks)
        student_logits = student_logits.chunk(len(batch.crops))
        losses = {"dino": dino_cross_entropy(targets, student_logits, self.cfg.method.student_temp)}
        tensors = StepTensors(teacher, student, batch.masks, teacher_temp)
        losses.update((term.name, term.loss(tensors)) for term in self.loss_terms)
        self.finite.observe(step, "teacher output", teacher_logits)
        diagnostics = DiagnosticInputs(targets, student_logits, teacher.cls) if self.diagnostics_wanted else None
        return MicroStep(losses, teacher_logits.detach(), diagnostics)

    def weighed_loss(self, step: int, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """DINO's loss plus each term's weighted loss; each watched for non-finite values.

        Args: losses: scalar losses, ``"dino"`` first, then each term's by name.
        """
        loss = losses["dino"]
        for term in self.loss_terms:
            loss = loss + term.weight() * losses[term.name]
        if self.loss_terms:  # which term went non-finite; with DINO's loss alone, "loss" (in optimize) says it
            self.finite.observe(step, "DINO loss", losses["dino"])
            for term in self.loss_terms:
                self.finite.observe(step, term.what, losses[term.name])
        return loss

    def end_step(self, step: int, done: list[MicroStep], schedule: dict[str, float],
                 logs: dict[str, float]) -> torch.Tensor:
        """The shared end of every step, after the optimizer's: update the targets and the terms, EMA, log.

        Args: done: every micro-batch of the step; their (2b, K) teacher outputs update the targets
        together, after the loss (DINO's center), as the teacher outputs of the whole batch.
        """
        self.centering.update(done[0].teacher_logits if len(done) == 1 else
                              torch.cat([micro.teacher_logits for micro in done]))
        for term in self.loss_terms:
            term.update()
        momentum = self.momentum_at(step)
        ema_update(self.teacher, self.student, momentum)
        if self.diagnostics_wanted:
            self.offer_diagnostics(*merge_diagnostics([micro.diagnostics for micro in done]))
        losses, loss = done[0].losses, done[0].loss
        if len(done) > 1:  # the step's losses: means over its micro-batches (each is a batch mean), as one batch's
            losses = {name: torch.stack([micro.losses[name].detach() for micro in done]).mean() for name in losses}
            loss = torch.stack([micro.loss for micro in done]).sum()
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({**self.term_logs(losses), "train/lr": schedule["lr"], "train/wd": schedule["wd"],
                       "train/momentum": momentum, **logs})
        return loss

    def accumulation_note(self) -> str | None:
        """What a run with ``optim.accumulate_grad_batches`` > 1 prints when parts see micro-batches only."""
        accumulate, parts = self.cfg.optim.accumulate_grad_batches, self.micro_batch_parts()
        if accumulate == 1 or not parts:
            return None
        return (f"optim.accumulate_grad_batches={accumulate}: {', '.join(parts)} see micro-batches of "
                f"data.batch_size={self.cfg.data.batch_size} per rank, not the whole batch of "
                f"{rank_batch_size(self.cfg)}: the step differs from one large-batch step")

    def micro_batch_parts(self) -> list[str]:
        """The parts that read a whole batch at once, so that under ``optim.accumulate_grad_batches`` they see
        one micro-batch (all ranks'), not the whole step's batch: the step then differs from the large batch's."""
        parts = []
        if isinstance(self.centering, SinkhornKnoppTargets):
            parts.append("Sinkhorn-Knopp targets")
        for term in self.loss_terms:
            if isinstance(term, KoLeo):
                parts.append("KoLeo's nearest neighbours")
            elif isinstance(getattr(term, "targets", None), SinkhornKnoppTargets):
                parts.append("iBOT's Sinkhorn-Knopp patch targets")
        if has_batchnorm(self.student):
            parts.append("BatchNorm statistics (synchronised over the ranks with backbone.sync_batchnorm)"
                         if self.cfg.backbone.sync_batchnorm else "BatchNorm statistics")
        return parts

    def term_logs(self, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | float]:
        """``train/loss_<name>`` of DINO's loss and each term (only with terms: alone it is train/loss)."""
        if not self.loss_terms:
            return {}
        extra = {key: value for term in self.loss_terms for key, value in term.logs().items()}
        return {**{f"train/loss_{name}": value for name, value in losses.items()}, **extra}


@METHODS.register("dino_no_centering", "DINO ablation: the center stays zero (Fig. 7: entropy -> 0)")
class DINONoCentering(DINO):
    """DINO without centering; sharpening alone makes one prototype dominate."""

    targets = ZeroCenterTargets


@METHODS.register("dino_no_sharpening",
                  "DINO ablation: teacher temperature = student temperature (Fig. 7: entropy -> log K)")
class DINONoSharpening(DINO):
    """DINO without sharpening; centering alone pushes the targets to uniform."""

    sharpening = False


@METHODS.register("dino_no_centering_no_sharpening",
                  "DINO ablation: neither centering nor sharpening (nothing prevents collapse)")
class DINONoCenteringNoSharpening(DINO):
    """Both ablations at once: the teacher is a plain EMA softmax at the student's temperature."""

    targets, sharpening = ZeroCenterTargets, False


@METHODS.register("dino_sinkhorn", "DINO with Sinkhorn-Knopp targets instead of centering (Table 7 row 3)")
class DINOSinkhorn(DINO):
    """Teacher targets are a balanced Sinkhorn-Knopp assignment; no center is kept."""

    targets = SinkhornKnoppTargets


@METHODS.register("dino_no_multicrop", "DINO with the 2 global views only (Table 7 row 4)")
class DINONoMultiCrop(DINO):
    """No local crops: the data pipeline delivers 2 global views; the loss has 2 pairs."""

    uses_local_crops = False


@METHODS.register("dino_no_momentum", "DINO with teacher = student at every step (Table 7 row 2: collapses)")
class DINONoMomentum(DINO):
    """Teacher momentum 0: the EMA copies the student after every step."""

    teacher_momentum = False


@METHODS.register("dino_koleo", "DINO + KoLeo on the student's global CLS features (weight method.koleo_weight)")
class DINOKoLeo(DINO):
    """DINO with DINOv2's KoLeo regulariser (Oquab et al. 2023, Table 1 row "+ KoLeo")."""

    terms = (KoLeo,)
