"""Lightning callbacks of a run: atomic checkpoints, plain progress lines, collapse diagnostics, online k-NN."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ssl_bench import tracking
from ssl_bench.eval import collapse


class AtomicLastCheckpoint(Callback):
    """Writes checkpoints/last.ckpt at every epoch end via temp file + rename."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / tracking.LAST_CHECKPOINT

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.path)


class ProgressLines(Callback):
    """Plain progress lines (step, loss, img/s, ETA) for logs where a tqdm bar is unreadable, e.g. SLURM."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = max(every_n_steps, 1)
        self.start = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        elapsed = time.time() - self.start
        rate = step / max(elapsed, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        print(f"[ssl-bench] step {step}/{total} epoch {trainer.current_epoch} "
              f"loss {float(loss) if loss is not None else float('nan'):.4f} "
              f"{rate * trainer.world_size * pl_module.cfg.data.batch_size:.1f} img/s "
              f"ETA {(total - step) / max(rate, 1e-9) / 60:.1f} min", flush=True)


class CollapseDiagnostics(Callback):
    """Every N steps: teacher entropy, KL(teacher || student), RankMe, feature std, collapse flag.

    The method offers the tensors of the sampled steps (``SSLMethod.offer_diagnostics``); this
    callback measures them, logs them straight to the run's loggers (so they keep their own
    cadence), feeds a :class:`~ssl_bench.eval.collapse.CollapseMonitor` and, with
    ``train.stop_on_collapse``, ends a collapsed run early.
    """

    def __init__(self, every_n_steps: int, monitor: collapse.CollapseMonitor, stop_on_collapse: bool) -> None:
        self.every = every_n_steps
        self.monitor = monitor
        self.stop_on_collapse = stop_on_collapse
        self.stopped_early: str | None = None
        self.last: dict[str, float] = {}
        self._step = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = trainer.global_step
        pl_module.diagnostics_wanted = self.every > 0 and self._step % self.every == 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        inputs = pl_module.diagnostic_inputs
        pl_module.diagnostic_inputs, pl_module.diagnostics_wanted = None, False
        if inputs is None:
            return
        values = measure(inputs.targets, inputs.student_logits, inputs.teacher_cls, pl_module.cfg.method.student_temp)
        collapsed = self.monitor.update(self._step, values[tracking.TEACHER_ENTROPY],
                                        values[tracking.KL_TEACHER_STUDENT])
        values[tracking.COLLAPSED] = float(collapsed)
        self.last = {key.split("/")[-1]: round(v, 5) for key, v in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, self._step)
        if collapsed and self.stop_on_collapse and self.stopped_early is None:
            self.stopped_early = (f"train.stop_on_collapse: collapsed at step {self.monitor.collapsed_step} "
                                  f"({self.monitor.reason}); stopped after step {self._step}")
            if trainer.is_global_zero:
                print(f"[ssl-bench] {self.stopped_early}", flush=True)
            trainer.should_stop = True

    def summary(self) -> dict[str, Any]:
        """What result.json records: the flag, its step and reason, the last measured values."""
        return {**self.monitor.summary(), "stopped_early": self.stopped_early, "last": self.last}


def measure(targets: list[torch.Tensor], student_logits: list[torch.Tensor], teacher_cls: torch.Tensor,
            student_temp: float) -> dict[str, float]:
    """The four diagnostics of one step, keyed by their metrics.jsonl names."""
    return {tracking.TEACHER_ENTROPY: collapse.target_entropy(torch.cat(targets)),
            tracking.KL_TEACHER_STUDENT: collapse.kl_teacher_student(targets, student_logits, student_temp),
            tracking.RANKME: collapse.rankme(teacher_cls),
            tracking.FEATURE_STD: collapse.feature_std(teacher_cls)}


class OnlineKNN(Callback):
    """k-NN of the teacher backbone every N epochs during training (not after the last: the final eval does it).

    ``evaluate(backbone) -> metrics`` is the run's k-NN protocol; every rank calls it (the bank is
    sharded under DDP). Values are logged as ``knn/top1``, ``knn/top5`` and ``knn/k{k}_top1`` at the
    current global step, so ``ssl-bench results curves --metric knn/top1`` draws accuracy over training.
    """

    def __init__(self, every_n_epochs: int, evaluate: Callable[[torch.nn.Module], dict[str, float]]) -> None:
        self.every = every_n_epochs
        self.evaluate = evaluate

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every or epoch >= trainer.max_epochs or trainer.should_stop:
            return
        metrics = self.evaluate(pl_module.eval_backbone())
        values = {tracking.ONLINE_KNN_PREFIX + key.removeprefix("knn_"): value for key, value in metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, trainer.global_step)
            print(f"[ssl-bench] online k-NN after epoch {epoch}: top-1 {metrics['knn_top1']:.2f}%", flush=True)
