"""``run(cfg) -> RunResult``: the one place that wires data, method, evaluation and tracking, and resumes runs."""

from __future__ import annotations

import gc
import logging
import os
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ssl_bench import config as config_lib
from ssl_bench import dist, repro, tracking
from ssl_bench.data import SSLDataModule, dataset_info
from ssl_bench.data.masking import patch_grid
from ssl_bench.eval.collapse import CollapseMonitor
from ssl_bench.backbones.checkpoints import weights_sha256 as state_sha256
from ssl_bench.eval.features import FeatureCache, weights_sha256
from ssl_bench.eval.knn_protocol import run_knn
from ssl_bench.methods import build_method, sharding
from ssl_bench.methods.finite import NonFiniteError
from ssl_bench.run import speed
from ssl_bench.run.callbacks import CollapseDiagnostics, Heartbeat, compute_saved, InitialKNN, OnlineKNN, ProgressLines
from ssl_bench.run.checkpoints import AtomicLastCheckpoint
from ssl_bench.run.guard import NonFiniteGuard
from ssl_bench.run.preemption import Preempted, agreed_preemption
from ssl_bench.run.progress import feature_progress
from ssl_bench.run.resume import Attempt, plan_resume, start_attempt


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    skipped: bool = False  # completed earlier; nothing was recomputed
    is_main: bool = True  # False on the other ranks of a DDP run, which write no records


def run(cfg: config_lib.Config, force: bool = False) -> RunResult:
    """Train ``cfg``, evaluate by k-NN and write the run directory; skip it if completed, resume it if interrupted.

    An unfinished attempt (result.json running/failed/preempted, or none) that left a loadable
    checkpoint of this run id is continued from it (``train.resume``); ``force`` archives the old
    attempt, checkpoints included, and starts over. A stop on a preemption request is recorded as
    status "preempted" and :class:`~ssl_bench.run.preemption.Preempted` is re-raised for the launcher.
    """
    run_id = config_lib.run_id(cfg)
    directory = config_lib.run_dir(cfg)
    try:
        previous = tracking.read_result(directory)
    except tracking.CorruptRecordError:
        if not force:
            raise  # nothing is resumed, archived or overwritten on a record nobody can read
        previous = None  # --force starts over: the attempt, its corrupt record included, goes to attempts/
    if previous and previous.get("status") == tracking.STATUS_COMPLETED and not force:
        return RunResult(run_id, directory, tracking.STATUS_COMPLETED, previous.get("metrics", {}),
                         previous.get("timing", {}), skipped=True)
    main = repro.launch_rank(cfg.trainer.devices) == 0
    resume, fresh_reason = plan_resume(cfg, run_id, directory, previous, force, _printer(main))
    run_dir = tracking.RunDir(directory)
    attempt = Attempt(resume=resume, knn_init=cfg.eval.knn and cfg.eval.knn_init)
    if not main:
        # Another DDP rank: rank 0 owns the run directory (archive, config, env, result.json).
        attempt.knn_init = attempt.knn_init and resume is None  # nobody records this rank's values
        _run_attempt(cfg, run_dir, attempt)
        return RunResult(run_id, directory, tracking.STATUS_COMPLETED, attempt.metrics, attempt.timing, is_main=False)
    record = start_attempt(cfg, run_id, run_dir, previous, attempt, fresh_reason)
    started = time.time()
    try:
        _run_attempt(cfg, run_dir, attempt)
    except Preempted as exc:
        _finish(run_dir, attempt, {**record, "status": tracking.STATUS_PREEMPTED, "step": exc.step,
                                   "metrics": attempt.metrics, "timing": {"wall_s": round(time.time() - started, 2)}})
        raise
    except NonFiniteError as exc:  # habit 11: a diverged run reports its step, never an accuracy
        _finish(run_dir, attempt, {**record, "status": tracking.STATUS_FAILED, "error": str(exc), "step": exc.step,
                                   "metrics": attempt.metrics, "timing": {"wall_s": round(time.time() - started, 2)}})
        raise
    except BaseException as exc:
        _finish(run_dir, attempt, {**record, "status": tracking.STATUS_FAILED, "metrics": attempt.metrics,
                                   "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                                   "timing": {"wall_s": round(time.time() - started, 2)}})
        raise
    attempt.timing["wall_s"] = round(time.time() - started, 2)
    _finish(run_dir, attempt, {**record, "status": tracking.STATUS_COMPLETED, "metrics": attempt.metrics,
                               "timing": attempt.timing, "collapse": attempt.diagnostics, "protocol": attempt.protocol,
                               **({"ddp": attempt.ddp} if attempt.ddp else {})})
    return RunResult(run_id, directory, tracking.STATUS_COMPLETED, attempt.metrics, attempt.timing)


def _finish(run_dir: tracking.RunDir, attempt: Attempt, result: dict[str, Any]) -> None:
    """The attempt's final record: result.json, then the W&B summary (which finishes the W&B run)."""
    run_dir.write_result(result)
    tracking.publish_wandb(attempt.wandb, result)


def _printer(main: bool) -> Callable[[str], None]:
    return (lambda line: print(line, flush=True)) if main else (lambda line: None)


def _run_attempt(cfg: config_lib.Config, run_dir: tracking.RunDir, attempt: Attempt) -> None:
    """Train and evaluate; a DDP process group started for it (by Lightning) is closed after, on every rank."""
    owns_group = not dist.is_distributed()
    try:
        _train_and_evaluate(cfg, run_dir, attempt)
    except Preempted as exc:  # every rank stopped at the same step, so the barrier below is met
        if owns_group:
            traceback.clear_frames(exc.__traceback__)  # the frames hold the trainer and its DDP model
            close_process_group()
        raise
    if owns_group:
        close_process_group()


def close_process_group() -> None:
    """Barrier, free the model, then ``destroy_process_group``: the clean end of a (gloo) DDP run.

    Lightning destroys only NCCL groups (at exit); a gloo group left to interpreter exit, or
    destroyed while a DDP model still holds it, aborted about one run in three.
    """
    if not dist.is_distributed():
        return
    gc.collect()  # the DDP-wrapped model and its reducer, unreachable once the attempt returned
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _train_and_evaluate(cfg: config_lib.Config, run_dir: tracking.RunDir, attempt: Attempt) -> None:
    repro.seed_everything(cfg.seed)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    method = build_method(cfg)
    levers = speed.apply(method, cfg)
    if repro.launch_rank(cfg.trainer.devices) == 0:  # rank 0 owns env.json
        run_dir.update_env({"speed_levers": levers})
    datamodule = build_datamodule(cfg, method)
    metrics, timing, protocol = attempt.metrics, attempt.timing, attempt.protocol

    diagnostics = CollapseDiagnostics(cfg.train.diagnostics_every_n_steps,
                                      CollapseMonitor(cfg.method.out_dim, cfg.train.collapse_entropy_low,
                                                      cfg.train.collapse_entropy_high, cfg.train.collapse_kl,
                                                      cfg.train.collapse_window),
                                      cfg.train.stop_on_collapse)
    extra: list[Callback] = [diagnostics, Heartbeat(attempt.on_heartbeat)]
    if cfg.eval.knn and cfg.eval.knn_init:  # inside fit: on the training device, sharded over the ranks
        extra.append(InitialKNN(attempt.knn_init,
                                lambda backbone, device: _knn_init(cfg, attempt, backbone, device)))
    if cfg.eval.knn and cfg.eval.knn_every_n_epochs:
        extra.append(OnlineKNN(cfg.eval.knn_every_n_epochs,
                               lambda backbone, device: knn_metrics(cfg, backbone, suffix="", device=device)[0]))
    trainer = build_trainer(cfg, run_dir, extra)
    attempt.wandb = next((lg for lg in trainer.loggers if not isinstance(lg, tracking.JsonlLogger)), None)
    start_step = attempt.resume.step if attempt.resume else 0
    t0 = time.time()
    try:
        trainer.fit(method, datamodule=datamodule, ckpt_path=str(attempt.resume.path) if attempt.resume else None)
    except SIGTERMException as exc:
        _raise_if_preempted(trainer, method.device, exc)
        raise
    train_s = time.time() - t0 - (timing.get("knn_init_s", 0.0) if attempt.knn_init else 0.0)  # minus the init k-NN
    _raise_if_preempted(trainer, method.device)
    attempt.ddp = _rank_weight_hashes(method)
    images = (trainer.global_step - start_step) * config_lib.rank_batch_size(cfg) * trainer.world_size
    timing.update({"train_s": round(train_s, 2), "train_steps": trainer.global_step,
                   "train_images_per_s": round(images / max(train_s, 1e-9), 2)})
    timing.update(compute_saved(int(trainer.estimated_stepping_batches), trainer.global_step - start_step,
                                trainer.global_step, train_s, trainer.world_size,
                                stopped=diagnostics.stopped_early is not None))
    metrics["train_loss_last"] = _last_logged(trainer, "train/loss", run_dir.path)
    metrics.update({f"{name}_last": value for name, value in diagnostics.last.items() if name != "collapsed"})

    if getattr(trainer.precision_plugin, "scaler", None) is not None:
        timing["fp16_skipped_steps"] = method.finite.skipped_steps()
    if cfg.eval.knn:  # every rank: under DDP each extracts its share and holds its shard of the bank
        t0 = time.time()
        device = trainer.strategy.root_device  # Lightning moved the module back to the CPU at the end of fit
        values, protocol["knn"] = knn_metrics(cfg, method.eval_backbone().to(device), suffix="",
                                              run_dir=run_dir.path, device=device)
        metrics.update(values)
        timing["knn_s"] = round(time.time() - t0, 2)
    timing["peak_rss_mb"] = round(repro.peak_rss_mb(), 1)
    attempt.diagnostics = diagnostics.summary()


def _rank_weight_hashes(method: torch.nn.Module) -> dict[str, Any]:
    """Under DDP, every rank's teacher-weight hash (all equal when the ranks stayed in sync); {} in one process."""
    if not dist.is_distributed():
        return {}
    hashes: list[Any] = [None] * dist.world_size()  # under FSDP of the gathered weights (rank shards differ)
    torch.distributed.all_gather_object(hashes, state_sha256(sharding.full_state(method.teacher)))
    return {"world_size": dist.world_size(), "teacher_sha256": hashes}


def _raise_if_preempted(trainer: L.Trainer, device: torch.device, sigterm: Optional[BaseException] = None) -> None:
    """Preempted when the checkpoint callback stopped the loop, or a request came after the last step's check."""
    saver = next(c for c in trainer.callbacks if isinstance(c, AtomicLastCheckpoint))
    if saver.stopped_at is not None:
        raise Preempted(saver.stopped_at) from sigterm
    if sigterm is None and agreed_preemption(device):  # last.ckpt is the final epoch's: nothing to save
        raise Preempted(trainer.global_step)


def pipeline_options(cfg: config_lib.Config, method: torch.nn.Module) -> tuple[Optional[int], Optional[tuple]]:
    """(local_crops_number override, iBOT mask grid) of the data ``method`` needs: 0 local crops for
    single-scale methods (None keeps the config's), a patch grid for masked ones (None: no masks)."""
    local = None if method.uses_local_crops else 0
    grid = patch_grid(cfg.data.global_crop_size, method.student.backbone.patch_size) if method.uses_masks else None
    return local, grid


def build_datamodule(cfg: config_lib.Config, method: torch.nn.Module) -> SSLDataModule:
    """The data the method needs: without local crops for single-scale methods, with iBOT masks for masked ones."""
    local, grid = pipeline_options(cfg, method)
    if local == 0 and cfg.data.local_crops_number:
        print(f"[ssl-bench] {cfg.method.name}: 2 global views only; data.local_crops_number="
              f"{cfg.data.local_crops_number} is not used", flush=True)
    note = method.accumulation_note()
    if note and repro.launch_rank(cfg.trainer.devices) == 0:
        print(f"[ssl-bench] {note}", flush=True)
    return SSLDataModule(cfg, local_crops_number=local, mask_grid=grid)


def quiet_lightning() -> None:
    """Hide Lightning's banners and advertising; our own lines say what runs where."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*`weights_only` was not set.*")
    # Printed whenever Slurm's client tools are installed, even for a run outside any SLURM job.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system.*")


def trainer_settings(cfg: config_lib.Config) -> dict[str, Any]:
    """The ``L.Trainer`` arguments every training loop shares (runs here, ``ssl-bench bench train``)."""
    t = cfg.trainer
    return {"accelerator": t.accelerator, "devices": t.devices, "num_nodes": t.num_nodes, **precision_settings(cfg),
            "sync_batchnorm": cfg.backbone.sync_batchnorm, "strategy": sharding.lightning_strategy(cfg),
            "max_epochs": cfg.optim.epochs, "enable_checkpointing": False, "enable_model_summary": False,
            "use_distributed_sampler": False,  # ResumableLoader shards by rank itself
            "num_sanity_val_steps": 0}


def runs_on_cpu(cfg: config_lib.Config) -> bool:
    return cfg.trainer.accelerator == "cpu" or (cfg.trainer.accelerator == "auto" and not torch.cuda.is_available())


def precision_settings(cfg: config_lib.Config) -> dict[str, Any]:
    """``precision=...``, or for ``16-mixed`` on the CPU an explicit fp16 plugin with a real GradScaler.

    Given ``precision="16-mixed"`` on the CPU, Lightning silently trains in bf16 instead; the
    explicit ``MixedPrecision("16-mixed", "cpu")`` keeps fp16 autocast and the loss scaling, so the
    fp16 path of the paper recipes runs (slowly) on a CPU too.
    """
    if cfg.trainer.precision.startswith("bf16") and runs_on_cpu(cfg) and not repro.cpu_info()["cpu_bf16"]:
        warnings.warn(f"trainer.precision={cfg.trainer.precision} on a CPU without bf16 instructions "
                      f"({', '.join(repro.BF16_CPU_FLAGS)}): torch emulates bf16, slower than 32-true", stacklevel=2)
    if cfg.trainer.precision in ("16-mixed", "16") and runs_on_cpu(cfg):
        from lightning.pytorch.plugins import MixedPrecision

        return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]}
    return {"precision": cfg.trainer.precision}


def build_trainer(cfg: config_lib.Config, run_dir: tracking.RunDir, extra: list[Callback] = ()) -> L.Trainer:
    quiet_lightning()
    loggers = [tracking.JsonlLogger(run_dir.path / tracking.METRICS_FILE)]
    wandb = tracking.wandb_logger(cfg, run_dir.path.name, run_dir.path)
    if wandb is not None:
        loggers.append(wandb)
    t = cfg.trainer
    # First: a non-finite step fails before the diagnostics measure it or a checkpoint stores it.
    guard = NonFiniteGuard(cfg.tracking.log_every_n_steps)
    callbacks: list[Callback] = [guard, *extra]
    if not cfg.tracking.progress_bar:
        callbacks.append(ProgressLines(cfg.tracking.log_every_n_steps * 5))
    # Last: a checkpoint taken at a step end or epoch end covers what the other callbacks did there.
    callbacks.append(AtomicLastCheckpoint(run_dir.checkpoints, cfg.train.checkpoint_every_n_steps, guard))
    settings = trainer_settings(cfg)
    plugins = settings.pop("plugins", [])
    if SLURMEnvironment.detect():
        # submitit owns the SLURM signals and requeueing (launch/); with auto_requeue Lightning would
        # install its own SIGUSR1 handler that checkpoints to hpc_ckpt_*.ckpt and requeues by itself.
        plugins.append(SLURMEnvironment(auto_requeue=False))
    trainer = L.Trainer(**settings, max_steps=t.max_steps, logger=loggers, callbacks=callbacks,
                        plugins=plugins or None, log_every_n_steps=cfg.tracking.log_every_n_steps,
                        enable_progress_bar=cfg.tracking.progress_bar, default_root_dir=str(run_dir.path))
    if "SUBMITIT_EXECUTOR" in os.environ:
        # In a submitit job, submitit and launch/jobs.py own SIGTERM and USR2 (checkpoint at the step end,
        # then requeue). Lightning's SIGTERM handler would end training without a checkpoint and, under
        # DDP, broadcast from inside the signal handler. Private Lightning API, on purpose: Lightning 2.x
        # has no public switch that leaves SIGTERM to the caller (SLURMEnvironment(auto_requeue=False)
        # only drops its requeue handler).
        trainer._signal_connector.register_signal_handlers = lambda: None
    return trainer


def _knn_init(cfg: config_lib.Config, attempt: Attempt, backbone: torch.nn.Module, device: torch.device) -> None:
    """The k-NN of the initial weights, recorded at once (rank 0) so that a preempted attempt keeps it."""
    t0 = time.time()
    values, attempt.protocol["knn"] = knn_metrics(cfg, backbone, suffix="_init", device=device)
    attempt.metrics.update(values)
    attempt.timing["knn_init_s"] = round(time.time() - t0, 2)
    attempt.on_init_metrics()


def knn_metrics(cfg: config_lib.Config, backbone: torch.nn.Module, suffix: str, run_dir: Path | None = None,
                device: torch.device | str = "cpu") -> tuple[dict[str, float], dict[str, Any]]:
    """k-NN top-1/top-5 for every k in cfg.eval.knn_k (``knn_top1{suffix}`` at the reported k) and the protocol.

    ``device`` is where the backbone's weights are (the training device inside training).

    With ``eval.cache_features`` the trained backbone's features are kept in ``<run_dir>/features``,
    keyed by a hash of the weights, so later ``ssl-bench eval knn`` calls reuse them.
    """
    cache = weights = None
    if cfg.eval.cache_features and run_dir is not None and not suffix:
        cache, weights = FeatureCache(run_dir / tracking.FEATURES_DIR), weights_sha256(backbone)
    outcome = run_knn(cfg, backbone, suffix, cache, weights, device,
                      progress=lambda label: feature_progress(cfg, label),
                      log=lambda line: print(line, flush=True) if dist.rank() == 0 else None)
    return outcome.metrics, outcome.protocol


def _last_logged(trainer: L.Trainer, key: str, directory: Path) -> float | None:
    """The last value of ``key``; from metrics.jsonl when this attempt trained no step (resumed at the end)."""
    value = trainer.callback_metrics.get(key)
    if value is not None:
        return float(value)
    logged = [line[key] for line in tracking.read_metrics(directory) if key in line]
    return float(logged[-1]) if logged else None


def validate_config(cfg: config_lib.Config, label: str = "config", check_data: bool = True) -> None:
    """Fail before anything starts: unknown method/dataset/backbone, unbuildable model, unreachable data."""
    from ssl_bench.backbones import has_batchnorm
    from ssl_bench.data import DATASETS, check_dataset
    from ssl_bench.methods import METHODS
    from ssl_bench.registry import RegistryError

    try:
        METHODS.entry(cfg.method.name)
        DATASETS.entry(cfg.data.name)
    except RegistryError as exc:
        raise config_lib.ConfigError(f"{label}: {exc}") from exc
    try:
        with torch.device("meta"):  # builds the modules without allocating weights
            method = build_method(cfg)
    except Exception as exc:
        raise config_lib.ConfigError(f"{label}: cannot build method {cfg.method.name!r} with backbone "
                                     f"{cfg.backbone.name!r}: {exc}") from exc
    if cfg.backbone.sync_batchnorm and not has_batchnorm(method.student):
        raise config_lib.ConfigError(f"{label}: backbone.sync_batchnorm=true but {cfg.backbone.name!r} has no "
                                     "BatchNorm layer to synchronise; set it for BatchNorm backbones (ResNets) only")
    if method.uses_masks:
        try:
            patch_grid(cfg.data.global_crop_size, method.student.backbone.patch_size)
        except ValueError as exc:
            raise config_lib.ConfigError(f"{label}: method {cfg.method.name!r} masks patches of the global crops, "
                                         f"but data.global_crop_size / backbone.patch_size: {exc}") from exc
    if check_data:
        try:
            check_dataset(cfg.data)
        except FileNotFoundError as exc:
            raise config_lib.ConfigError(f"{label}: {exc}") from exc
    size = dataset_info(cfg.data.name).train_size
    if size:
        images = min(size, cfg.data.subset or size)
        problem = config_lib.one_step_problem(cfg, images, f"data.name={cfg.data.name!r} with {images} "
                                                           "training images")
        if problem:
            raise config_lib.ConfigError(f"{label}: {problem}")


def check_local_devices(cfg: config_lib.Config, label: str = "config") -> None:
    """ConfigError unless this machine has the devices ``trainer`` asks for (local runs; a SLURM profile decides)."""
    t = cfg.trainer
    if speed.runs_on_cuda(cfg):
        available, what = (torch.cuda.device_count() if torch.cuda.is_available() else 0), "CUDA GPU(s)"
    elif runs_on_cpu(cfg):
        available, what = os.cpu_count() or 1, "CPU cores"
    else:
        return  # mps: Lightning reports what is missing
    if available == 0:
        raise config_lib.ConfigError(f"{label}: trainer.accelerator={t.accelerator!r} but torch finds no CUDA GPU "
                                     "here (torch.cuda.is_available() is False); use trainer.accelerator=cpu or run "
                                     "on a GPU machine (--cluster slurm --profile ...)")
    if t.devices > available:
        raise config_lib.ConfigError(f"{label}: trainer.devices={t.devices} but this machine has {available} {what} "
                                     f"for trainer.accelerator={t.accelerator!r}; valid: 1..{available}")
