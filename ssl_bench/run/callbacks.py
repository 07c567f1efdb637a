"""Lightning callbacks of a run: atomic checkpoints, preemption, progress lines, collapse diagnostics, online k-NN."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ssl_bench import dist, tracking
from ssl_bench.eval import collapse
from ssl_bench.methods.finite import FiniteWatch, NonFiniteError

# ---- preemption: a request flag a signal handler may set --------------------------------------------

_state = {"requested": False, "training": False}


class Preempted(Exception):
    """Training stopped on a preemption request; ``checkpoints/last.ckpt`` holds step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted: checkpoint saved at step {step}")
        self.step = step


def request_preemption_checkpoint() -> None:
    """Ask the training loop to checkpoint at the end of the current step and stop (safe in a signal handler)."""
    _state["requested"] = True


def preemption_requested() -> bool:
    return _state["requested"]


def clear_preemption_request() -> None:
    _state["requested"] = False


def training_active() -> bool:
    """True while the training loop runs, i.e. while a request is answered at the end of the current step."""
    return _state["training"]


def agreed_preemption(device: torch.device, also: bool = False) -> bool:
    """Whether any rank has a preemption request (or ``also``): all-reduce max, so every rank stops at the same step."""
    requested = preemption_requested() or also
    if not dist.is_distributed():
        return requested  # no device tensor, no synchronisation in one process
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    return bool(dist.all_reduce_max(flag).item() > 0)


# ---- divergence: a non-finite value ends the run with its step -------------------------------------------


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


def save_checkpoint_atomically(trainer: L.Trainer, directory: Path) -> None:
    """Write ``last.ckpt`` via a temp file + ``os.replace``, keeping the one it replaces as ``previous.ckpt``.

    Every rank calls this (Lightning gathers the state on all ranks and writes on rank 0). The
    old last.ckpt is hard-linked to previous.ckpt before the new one replaces it, so a crash at
    any point leaves a complete last.ckpt and, after the first save, a complete previous.ckpt.
    """
    directory = Path(directory)
    last, previous = directory / tracking.LAST_CHECKPOINT, directory / tracking.PREVIOUS_CHECKPOINT
    tmp = directory / f".{last.name}.tmp"
    trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimizer, loops, callbacks
    if not trainer.is_global_zero:
        return
    _fsync(tmp)
    if last.exists():
        _keep_as(last, previous)
    os.replace(tmp, last)
    _fsync(directory)


def _keep_as(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
        os.replace(tmp, target)
    except OSError:  # no hard links on this filesystem: a moment without last.ckpt, but previous.ckpt is whole
        os.replace(source, target)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicLastCheckpoint(Callback):
    """``checkpoints/last.ckpt`` at every epoch end and every N optimizer steps, and on preemption.

    Mid-epoch saves happen at ``on_train_batch_end``, like Lightning's ModelCheckpoint with
    ``every_n_train_steps``, so Lightning's loops restart after that batch and the
    ResumableLoader's position skips the batches already trained on. A preemption request
    (agreed across ranks every step) saves at once and sets ``trainer.should_stop``;
    ``stopped_at`` then holds the step and ``train.run`` raises :class:`Preempted` when fit returns.
    This callback must come last, after the callbacks whose state or log lines the checkpoint covers.

    Args:
        directory: the run's checkpoints/ folder.
        every_n_steps: mid-epoch cadence in optimizer steps; 0 = epoch ends only.
        guard: checked before every write, so non-finite weights never replace a finite last.ckpt.
    """

    def __init__(self, directory: Path, every_n_steps: int = 0, guard: Optional[NonFiniteGuard] = None) -> None:
        self.directory = Path(directory)
        self.every = every_n_steps
        self.guard = guard
        self.stopped_at: Optional[int] = None
        self.save_seconds: list[float] = []

    @property
    def path(self) -> Path:
        return self.directory / tracking.LAST_CHECKPOINT

    def save(self, trainer: L.Trainer) -> None:
        """Write the checkpoint; with a guard, only state that is finite (else the guard raises first)."""
        if self.guard is not None:
            self.guard.check(trainer, trainer.lightning_module, weights=True)
        start = time.perf_counter()
        save_checkpoint_atomically(trainer, self.directory)
        self.save_seconds.append(time.perf_counter() - start)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _state["training"] = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _state["training"] = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        _state["training"] = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        # A SIGTERM (scancel, SLURM preemption) makes Lightning raise SIGTERMException after this hook:
        # checkpoint this step first, so no finished step is lost (train.run turns it into Preempted).
        if agreed_preemption(pl_module.device, also=trainer.received_sigterm):
            self.save(trainer)
            self.stopped_at = step
            trainer.should_stop = True
            if trainer.is_global_zero:
                print(f"[ssl-bench] preemption: checkpoint of step {step} saved in {self.path}; stopping", flush=True)
            return
        ends_epoch = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        ends_run = 0 < trainer.max_steps <= step
        if self.every and step % self.every == 0 and not (ends_epoch or ends_run):  # the epoch end saves those
            self.save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stopped_at is None:  # a preempted epoch is not finished: its mid-epoch checkpoint stays
            self.save(trainer)


@dataclass
class ResumePoint:
    """A loadable checkpoint of this run and where in training it was taken."""

    path: Path
    name: str  # "last" or "previous"
    step: int  # optimizer steps done
    epoch: int
    batch: int  # batches of ``epoch`` done
    batches_per_epoch: int
    problems: list[str] = field(default_factory=list)  # why earlier candidates were passed over


def find_resume_checkpoint(directory: Path, run_id: str, log: Callable[[str], None] = print) -> ResumePoint | None:
    """``checkpoints/last.ckpt`` if it loads and belongs to ``run_id``, else ``previous.ckpt``, else None.

    Every problem is passed to ``log`` as one line naming the file and the reason.
    """
    problems: list[str] = []
    names = (tracking.LAST_CHECKPOINT, tracking.PREVIOUS_CHECKPOINT)
    for i, name in enumerate(names):
        path = Path(directory) / tracking.CHECKPOINT_DIR / name
        try:
            return describe_checkpoint(path, run_id, problems)
        except Exception as exc:  # truncated zip, unpickling error, missing file or key: all mean "not usable"
            reason = "missing" if isinstance(exc, FileNotFoundError) else f"{type(exc).__name__}: {exc}"
            problems.append(f"{tracking.CHECKPOINT_DIR}/{name}: {reason}")
            then = f"falling back to {tracking.CHECKPOINT_DIR}/{names[i + 1]}" if i + 1 < len(names) else "none left"
            log(f"[ssl-bench] cannot resume from {path}: {reason.splitlines()[0][:300]}; {then}")
    return None


def describe_checkpoint(path: Path, run_id: str, problems: list[str] = ()) -> ResumePoint:
    """Load ``path`` as this run's training checkpoint (raises if it is unreadable or another run's)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    owner = checkpoint.get("ssl_bench", {}).get("run_id")
    if owner != run_id:
        raise ValueError(f"checkpoint of run {owner!r}, not {run_id!r}")
    for key in ("state_dict", "optimizer_states", "loops"):
        if key not in checkpoint:
            raise KeyError(f"no {key!r}: not a full training checkpoint")
    loaders = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader") or [{}]
    position = loaders[0]
    return ResumePoint(Path(path), Path(path).stem, int(checkpoint["global_step"]),
                       int(position.get("epoch", checkpoint.get("epoch", 0))), int(position.get("batches", 0)),
                       int(position.get("batches_per_epoch", 0)), list(problems))


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
              f"{rate * trainer.world_size * pl_module.cfg.data.batch_size:.1f} img/s "
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

    def state_dict(self) -> dict[str, Any]:
        """The monitor's streaks and verdict, so a resumed run judges collapse as an uninterrupted one."""
        return {**self.monitor.state_dict(), "stopped_early": self.stopped_early, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
        self.stopped_early, self.last = state["stopped_early"], dict(state["last"])

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
