"""Lightning callbacks of a run: progress lines, heartbeat, collapse diagnostics, initial and online k-NN.

Checkpoints are in ``run.checkpoints``, preemption in ``run.preemption``, the non-finite guard in ``run.guard``.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ssl_bench import dist, tracking
from ssl_bench.config import rank_batch_size
from ssl_bench.eval import collapse

class ProgressLines(Callback):
    """Plain progress lines (step, loss, img/s, ETA) for logs where a tqdm bar is unreadable, e.g. SLURM."""

    def __init__(self, every_n_steps: int) -> None:
        self.every = max(every_n_steps, 1)
        self.start = 0.0
        self.start_step = 0  # a resumed run measures its rate from the step it resumed at

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = time.time()
        self.start_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every or not trainer.is_global_zero:
            return
        total = trainer.estimated_stepping_batches
        elapsed = time.time() - self.start
        rate = (step - self.start_step) / max(elapsed, 1e-9)
        loss = trainer.callback_metrics.get("train/loss")
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        fp16 = (f" fp16 scale {scaler.get_scale():g}, {pl_module.finite.skipped_steps()} step(s) skipped"
                if scaler is not None else "")
        print(f"[ssl-bench] step {step}/{total} epoch {trainer.current_epoch} "
              f"loss {float(loss) if loss is not None else float('nan'):.4f} "
              f"{rate * trainer.world_size * rank_batch_size(pl_module.cfg):.1f} img/s "
              f"ETA {(total - step) / max(rate, 1e-9) / 60:.1f} min{fp16}", flush=True)


HEARTBEAT_EVERY_S = 60.0


class Heartbeat(Callback):
    """Rank 0 calls ``beat`` (rewrite result.json's owner.heartbeat_at) at a train-batch end, at most every ``every_s``.

    ``grid status`` calls a run whose heartbeat went silent lost; between beats a batch costs one clock read.
    """

    def __init__(self, beat: Callable[[], None], every_s: float = HEARTBEAT_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.beat, self.every_s, self.clock = beat, every_s, clock
        self.last = clock()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        now = self.clock()
        if now - self.last < self.every_s or not trainer.is_global_zero:
            return
        self.last = now
        try:
            self.beat()
        except OSError as exc:  # a full or flaky disk must not end a long run over a heartbeat
            print(f"[ssl-bench] heartbeat not written: {exc}", flush=True)


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
        values = agree(measure(inputs.targets, inputs.student_logits, inputs.teacher_cls,
                               pl_module.cfg.method.student_temp), pl_module.device)
        collapsed = self.monitor.update(self._step, values[tracking.TEACHER_ENTROPY],
                                        values[tracking.KL_TEACHER_STUDENT])
        values[tracking.COLLAPSED] = float(collapsed)
        self.last = {key.split("/")[-1]: round(v, 5) for key, v in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(values, self._step)
        if collapsed and self.stop_on_collapse and self.stopped_early is None:
            self.stopped_early = (f"stopped: collapsed at step {self.monitor.collapsed_step} "
                                  f"({self.monitor.reason}; train.stop_on_collapse), after step {self._step}")
            if trainer.is_global_zero:
                print(f"[ssl-bench] {self.stopped_early}", flush=True)
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        """The monitor's streaks and verdict, so a resumed run judges collapse as an uninterrupted one."""
        return {**self.monitor.state_dict(), "stopped_early": self.stopped_early, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
        self.stopped_early, self.last = state["stopped_early"], dict(state["last"])

    def summary(self) -> dict[str, Any]:
        """What result.json records: the flag, its step and reason, the last measured values."""
        return {**self.monitor.summary(), "stopped_early": self.stopped_early, "last": self.last}


def compute_saved(planned_steps: int, steps_run: int, steps_done: int, train_s: float, world_size: int,
                  stopped: bool) -> dict[str, float]:
    """``planned_steps``, and for a run ``stopped`` early (collapse), the device-hours its remaining steps would take.

    The remaining ``planned_steps - steps_done`` steps are priced at this attempt's measured seconds per step
    (``train_s / steps_run``, so a resumed attempt uses its own pace) on ``world_size`` devices.
    """
    out: dict[str, float] = {"planned_steps": planned_steps}
    left = planned_steps - steps_done
    if stopped and left > 0 and steps_run > 0:
        out["device_hours_saved"] = round(left * train_s / steps_run * world_size / 3600, 6)
    return out


def agree(values: dict[str, float], device: torch.device | str = "cpu") -> dict[str, float]:
    """The diagnostics averaged over the ranks, in one all-reduce, so every rank sees the same numbers.

    Each rank measures its own batch; without this, one rank could flag collapse (and, with
    ``train.stop_on_collapse``, stop) at a step where another does not. Identity in one process.
    ``device``: the module's, where the backend can reduce (NCCL: CUDA tensors only).
    """
    if not dist.is_distributed():
        return values
    keys = sorted(values)
    mean = dist.all_reduce_mean(torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device))
    return {key: float(v) for key, v in zip(keys, mean.tolist())}


def measure(targets: list[torch.Tensor], student_logits: list[torch.Tensor], teacher_cls: torch.Tensor,
            student_temp: float) -> dict[str, float]:
    """The four diagnostics of one step, keyed by their metrics.jsonl names (``tracking.TEACHER_ENTROPY``...)."""
    values = collapse.diagnostics(targets, student_logits, teacher_cls, student_temp)
    return {tracking.COLLAPSE_PREFIX + name: value for name, value in values.items()}


class InitialKNN(Callback):
    """k-NN of the initial teacher backbone on the training device and rank layout, before any step.

    It runs in Lightning's ``setup`` hook: the process group exists and the device is chosen, but a
    resumed run's checkpoint is not loaded yet, so the weights are still the seeded initial ones.
    ``wanted`` is False where an earlier attempt's values are reused; under DDP the ranks agree
    (any rank that wants it makes all of them compute, since the bank is sharded).
    """

    def __init__(self, wanted: bool, evaluate: Callable[[torch.nn.Module, torch.device], None]) -> None:
        self.wanted = wanted
        self.evaluate = evaluate

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        device = trainer.strategy.root_device
        wanted = self.wanted
        if dist.is_distributed():
            wanted = bool(dist.all_reduce_max(torch.tensor([float(wanted)], device=device)).item() > 0)
        if wanted:
            self.evaluate(pl_module.eval_backbone().to(device), device)


class OnlineKNN(Callback):
    """k-NN of the teacher backbone every N epochs during training (not after the last: the final eval does it),
    on the training device.

    ``evaluate(backbone) -> metrics`` is the run's k-NN protocol; every rank calls it (the bank is
    sharded under DDP). Values are logged as ``knn/top1``, ``knn/top5`` and ``knn/k{k}_top1`` at the
    current global step, so ``ssl-bench results curves --metric knn/top1`` draws accuracy over training.
    """

    def __init__(self, every_n_epochs: int,
                 evaluate: Callable[[torch.nn.Module, torch.device], dict[str, float]]) -> None:
        self.every = every_n_epochs
        self.evaluate = evaluate

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every or epoch >= trainer.max_epochs or trainer.should_stop:
            return
        metrics = self.evaluate(pl_module.eval_backbone(), pl_module.device)
        values = {tracking.ONLINE_KNN_PREFIX + key.removeprefix("knn_"): value for key, value in metrics.items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(values, trainer.global_step)
            print(f"[ssl-bench] online k-NN after epoch {epoch}: top-1 {metrics['knn_top1']:.2f}%", flush=True)
