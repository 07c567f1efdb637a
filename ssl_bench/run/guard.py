"""The non-finite guard: a run whose loss, gradients or weights stop being finite fails with its step.

DESIGN.md habit 11: a number is reported only if it was computed from finite values. The method
observes values on the device without a sync (``methods.finite.FiniteWatch``); this callback reads
the verdict at log steps, before every checkpoint write and at the end, agreed across ranks.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from ssl_bench import dist, tracking
from ssl_bench.methods.finite import FiniteWatch, NonFiniteError

class NonFiniteGuard(Callback):
    """Fail the run at the first non-finite loss term, gradient norm, teacher output or weight (habit 11).

    The method records those on the device (``SSLMethod.finite``, :class:`~ssl_bench.methods.finite.FiniteWatch`);
    this callback reads the record back, which syncs with the device, only at log steps, at the steps
    the collapse diagnostics sample (they sync anyway), before every checkpoint write and at the end;
    in one CPU process, where a read costs nothing, after every step. Under DDP every rank reads at the
    same steps and the record is all-reduced, so all ranks raise at the same step. It must come before
    the callbacks that measure the step (diagnostics) and before the checkpoint callback.

    Raises :class:`~ssl_bench.methods.finite.NonFiniteError` ("non-finite <what> at step N").
    """

    def __init__(self, every_n_steps: int) -> None:
        self.every = max(every_n_steps, 1)
        self._skipped_logged = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        every_step = pl_module.device.type == "cpu" and not dist.is_distributed()
        if every_step or step % self.every == 0 or pl_module.diagnostics_wanted:
            self.check(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check(trainer, pl_module)

    def check(self, trainer: L.Trainer, pl_module: L.LightningModule, weights: bool = False) -> None:
        """Raise if anything recorded so far (with ``weights``: or any parameter now) is non-finite."""
        watch = pl_module.finite
        if weights:
            watch.observe_weights(trainer.global_step, [pl_module.student, pl_module.teacher])
        verdict = watch.verdict()
        self._log_skips(trainer, watch)
        if verdict is None:
            return
        detail = ""
        if verdict.what.startswith("gradient norm (fp16"):
            detail = f"train.fp16_max_consecutive_skips={watch.max_consecutive_skips}"
        error = NonFiniteError(verdict.what, verdict.step, detail)
        if trainer.is_global_zero:
            print(f"[ssl-bench] {error}: stopping; checkpoints/ keeps the last finite checkpoint", flush=True)
        raise error

    def _log_skips(self, trainer: L.Trainer, watch: FiniteWatch) -> None:
        """Log the fp16 skipped-step count when it changed (only where a GradScaler is active)."""
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            return
        skipped = watch.skipped_steps()
        if skipped != self._skipped_logged and trainer.is_global_zero:  # progress lines print it
            for logger in trainer.loggers:
                logger.log_metrics({tracking.FP16_SKIPPED_STEPS: float(skipped)}, trainer.global_step)
        self._skipped_logged = skipped


# ---- atomic checkpoints with a fallback ----------------------------------------------------------------
