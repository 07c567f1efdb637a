"""Checkpoints a run writes and resumes from: atomic last.ckpt with previous.ckpt, the resume point.

Every file name comes from ``tracking.layout``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ssl_bench import tracking
from ssl_bench.methods import sharding
from ssl_bench.run.guard import NonFiniteGuard
from ssl_bench.run.preemption import agreed_preemption, set_training_active

SHARDED_META = "meta.pt"  # Lightning's ModelParallelStrategy: everything but the model and optimizer state
SHARDED_INDEX = ".metadata"  # torch.distributed.checkpoint's index, written last by the coordinator


def save_checkpoint_atomically(trainer: L.Trainer, directory: Path) -> None:
    """Write ``last.ckpt`` via a temp file + ``os.replace``, keeping the one it replaces as ``previous.ckpt``.

    Every rank calls this (Lightning gathers the state on all ranks and writes on rank 0). The
    old last.ckpt is hard-linked to previous.ckpt before the new one replaces it, so a crash at
    any point leaves a complete last.ckpt and, after the first save, a complete previous.ckpt.
    Under FSDP (``trainer.strategy=fsdp``) every rank writes its shard into a checkpoint directory
    (see :func:`save_sharded`).
    """
    directory = Path(directory)
    last, previous = directory / tracking.LAST_CHECKPOINT, directory / tracking.PREVIOUS_CHECKPOINT
    tmp = directory / f".{last.name}.tmp"
    if is_sharding(trainer):
        return save_sharded(trainer, tmp, last, previous)
    trainer.save_checkpoint(tmp, weights_only=False)  # the full state: optimizer, loops, callbacks
    if not trainer.is_global_zero:
        return
    _fsync(tmp)
    if last.exists():
        _keep_as(last, previous)
    os.replace(tmp, last)
    _fsync(directory)


def is_sharding(trainer: L.Trainer) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(getattr(trainer, "strategy", None), ModelParallelStrategy)


def save_sharded(trainer: L.Trainer, tmp: Path, last: Path, previous: Path) -> None:
    """A sharded checkpoint: a directory of one ``torch.distributed.checkpoint`` file per rank (weights,
    optimizer state) and Lightning's ``meta.pt`` (loops, callbacks, RNG states), written to ``tmp``
    and then renamed: last -> previous, tmp -> last. A crash between the renames leaves previous.ckpt
    whole, and resuming falls back to it. It resumes at the same world size only."""
    if trainer.is_global_zero and tmp.exists():  # a save that a crash interrupted: never mix its shards in
        shutil.rmtree(tmp)
    for optimizer in trainer.optimizers:
        sharding.complete_optimizer_state(optimizer)
    trainer.strategy.barrier()
    trainer.save_checkpoint(tmp, weights_only=False)  # every rank's shard; rank 0 adds meta.pt
    if trainer.is_global_zero:
        _fsync(tmp)
        if last.exists():
            if previous.exists():
                shutil.rmtree(previous) if previous.is_dir() else previous.unlink()
            os.replace(last, previous)
        os.replace(tmp, last)
        _fsync(last.parent)
    trainer.strategy.barrier()


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
        set_training_active(True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_training_active(False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        set_training_active(False)

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
    sharded = Path(path).is_dir()  # trainer.strategy=fsdp: shards + meta.pt (save_sharded)
    checkpoint = torch.load(Path(path) / SHARDED_META if sharded else path, map_location="cpu", weights_only=True)
    owner = checkpoint.get("ssl_bench", {}).get("run_id")
    if owner != run_id:
        raise ValueError(f"checkpoint of run {owner!r}, not {run_id!r}")
    if sharded and not (Path(path) / SHARDED_INDEX).is_file():
        raise FileNotFoundError(f"no {SHARDED_INDEX}: the sharded checkpoint was not completed")
    for key in ("loops",) if sharded else ("state_dict", "optimizer_states", "loops"):
        if key not in checkpoint:
            raise KeyError(f"no {key!r}: not a full training checkpoint")
    loaders = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader") or [{}]
    position = loaders[0]
    return ResumePoint(Path(path), Path(path).stem, int(checkpoint["global_step"]),
                       int(position.get("epoch", checkpoint.get("epoch", 0))), int(position.get("batches", 0)),
                       int(position.get("batches_per_epoch", 0)), list(problems))


def load_run_backbone(path: str | Path, backbone: Any = None, key: str = "teacher", strict: bool = True,
                      num_heads: Optional[int] = None, weights_only: bool = True,
                      log: Callable[[str], None] = print) -> tuple[Any, Any]:
    """``backbones.load_backbone`` for a run directory, one of its checkpoints, or an official ``.pth``.

    A run directory reads ``checkpoints/last.ckpt``, falling back to ``previous.ckpt`` when it cannot;
    the run's config.yaml gives the backbone. Arguments as ``load_backbone``'s.
    """
    from ssl_bench.backbones.checkpoints import CheckpointError, load_backbone, supported_formats  # lazy: timm

    files = tracking.checkpoint_files(path)
    if files is None:
        last = f"{tracking.CHECKPOINT_DIR}/{tracking.LAST_CHECKPOINT}"
        raise CheckpointError(f"{path} is a directory without {last}; expected an ssl-bench run directory. "
                              f"Supported: {supported_formats()}")
    primary, fallback = files.checkpoint, files.fallback
    if primary.is_dir() or (fallback is not None and fallback.is_dir()):  # sharded (trainer.strategy=fsdp)
        primary, fallback = first_consolidated([p for p in (primary, fallback) if p is not None], log), None
    return load_backbone(primary, backbone, key=key, strict=strict, num_heads=num_heads,
                         weights_only=weights_only, log=log, fallback=fallback, run_config=files.config)


def first_consolidated(paths: list[Path], log: Callable[[str], None] = print) -> Path:
    """The first of ``paths`` (last.ckpt, previous.ckpt) that consolidates, as a file; each failure is logged."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    from ssl_bench.backbones.checkpoints import CheckpointError

    problems = []
    for i, path in enumerate(paths):
        try:
            return consolidated(path, log)
        except (Exception, CheckpointException) as exc:  # a sharded checkpoint cut short: the next one
            problems.append(f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            then = f"falling back to {paths[i + 1]}" if i + 1 < len(paths) else "none left"
            log(f"[ssl-bench] cannot consolidate the sharded checkpoint {problems[-1]}; {then}")
    raise CheckpointError("cannot consolidate the sharded checkpoint(s): " + "; ".join(problems))


def consolidated(path: str | Path, log: Callable[[str], None] = print) -> Path:
    """A sharded checkpoint (directory) as one file next to it, ``<name>-consolidated.ckpt``; a file as is.

    The file holds Lightning's metadata and the whole ``state_dict`` (no optimizer state), under the
    keys of a DDP run's checkpoint, so every reader of ssl-bench checkpoints reads it. It is written
    once per sharded checkpoint (again when the directory is newer), in one process, without a GPU.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    out = path.with_name(path.name.removesuffix(".ckpt") + tracking.CONSOLIDATED_SUFFIX)
    meta = path / SHARDED_META
    if out.is_file() and meta.is_file() and out.stat().st_mtime >= meta.stat().st_mtime:
        return out
    for part in (SHARDED_INDEX, SHARDED_META):  # written last: without them the save did not finish
        if not (path / part).is_file():
            raise FileNotFoundError(f"{path / part} is missing: the sharded checkpoint is incomplete")
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        dcp_to_torch_save(path, tmp)
        state = torch.load(tmp, map_location="cpu", weights_only=True)["state_dict"]
        torch.save({**torch.load(meta, map_location="cpu", weights_only=True), "state_dict": state,
                    "consolidated_from": str(path)}, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    log(f"[ssl-bench] consolidated the sharded checkpoint {path} into {out}")
    return out
