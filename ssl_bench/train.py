"""``run(cfg) -> RunResult``: the one place that wires data, method, evaluation and tracking."""

from __future__ import annotations

import logging
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from ssl_bench import config as config_lib
from ssl_bench import dist, repro, tracking
from ssl_bench.callbacks import AtomicLastCheckpoint, CollapseDiagnostics, OnlineKNN, ProgressLines
from ssl_bench.data import SSLDataModule
from ssl_bench.data.masking import patch_grid
from ssl_bench.eval.collapse import CollapseMonitor
from ssl_bench.eval.features import FeatureCache, weights_sha256
from ssl_bench.eval.knn_protocol import run_knn
from ssl_bench.methods import build_method


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
    """Train ``cfg``, evaluate by k-NN and write the run directory; skip if already completed."""
    run_id = config_lib.run_id(cfg)
    directory = config_lib.run_dir(cfg)
    previous = tracking.read_result(directory)
    if previous and previous.get("status") == tracking.STATUS_COMPLETED and not force:
        return RunResult(run_id, directory, tracking.STATUS_COMPLETED, previous.get("metrics", {}),
                         previous.get("timing", {}), skipped=True)
    if repro.launch_rank(cfg.trainer.devices) != 0:
        # Another DDP rank: rank 0 owns the run directory (archive, config, env, result.json).
        metrics, timing, _, _ = _train_and_evaluate(cfg, tracking.RunDir(directory))
        return RunResult(run_id, directory, tracking.STATUS_COMPLETED, metrics, timing, is_main=False)
    if directory.exists():
        tracking.archive_previous_attempt(directory)
    run_dir = tracking.RunDir(directory)
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    run_dir.start(cfg, run_id, repro.environment(cfg.seed, world))
    record: dict[str, Any] = {"run_id": run_id, "study": cfg.study, "method": cfg.method.name, "seed": cfg.seed}
    started = time.time()
    try:
        metrics, timing, diagnostics, protocol = _train_and_evaluate(cfg, run_dir)
    except BaseException as exc:
        run_dir.write_result({**record, "status": tracking.STATUS_FAILED,
                              "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                              "timing": {"wall_s": round(time.time() - started, 2)}})
        raise
    timing["wall_s"] = round(time.time() - started, 2)
    run_dir.write_result({**record, "status": tracking.STATUS_COMPLETED, "metrics": metrics, "timing": timing,
                          "collapse": diagnostics, "protocol": protocol})
    return RunResult(run_id, directory, tracking.STATUS_COMPLETED, metrics, timing)


def _train_and_evaluate(cfg: config_lib.Config, run_dir: tracking.RunDir) -> tuple[dict, dict, dict, dict]:
    repro.seed_everything(cfg.seed)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    method = build_method(cfg)
    datamodule = build_datamodule(cfg, method)
    metrics: dict[str, Any] = {}
    timing: dict[str, float] = {}

    protocol: dict[str, Any] = {}
    if cfg.eval.knn and cfg.eval.knn_init:
        t0 = time.time()
        values, protocol["knn"] = knn_metrics(cfg, method.eval_backbone(), suffix="_init")
        metrics.update(values)
        timing["knn_init_s"] = round(time.time() - t0, 2)

    diagnostics = CollapseDiagnostics(cfg.train.diagnostics_every_n_steps,
                                      CollapseMonitor(cfg.method.out_dim, cfg.train.collapse_entropy_low,
                                                      cfg.train.collapse_entropy_high, cfg.train.collapse_kl,
                                                      cfg.train.collapse_window),
                                      cfg.train.stop_on_collapse)
    extra: list[Callback] = [diagnostics]
    if cfg.eval.knn and cfg.eval.knn_every_n_epochs:
        extra.append(OnlineKNN(cfg.eval.knn_every_n_epochs,
                               lambda backbone: knn_metrics(cfg, backbone, suffix="")[0]))
    trainer = build_trainer(cfg, run_dir, extra)
    t0 = time.time()
    trainer.fit(method, datamodule=datamodule)
    train_s = time.time() - t0
    images = trainer.global_step * cfg.data.batch_size * trainer.world_size
    timing.update({"train_s": round(train_s, 2), "train_steps": trainer.global_step,
                   "train_images_per_s": round(images / max(train_s, 1e-9), 2)})
    metrics["train_loss_last"] = _last_logged(trainer, "train/loss")
    metrics.update({f"{name}_last": value for name, value in diagnostics.last.items() if name != "collapsed"})

    if cfg.eval.knn:  # every rank: under DDP each extracts its share and holds its shard of the bank
        t0 = time.time()
        values, protocol["knn"] = knn_metrics(cfg, method.eval_backbone(), suffix="", run_dir=run_dir.path)
        metrics.update(values)
        timing["knn_s"] = round(time.time() - t0, 2)
    timing["peak_rss_mb"] = round(repro.peak_rss_mb(), 1)
    return metrics, timing, diagnostics.summary(), protocol


def build_datamodule(cfg: config_lib.Config, method: torch.nn.Module) -> SSLDataModule:
    """The data the method needs: without local crops for single-scale methods, with iBOT masks for masked ones."""
    local = None if method.uses_local_crops else 0
    if local == 0 and cfg.data.local_crops_number:
        print(f"[ssl-bench] {cfg.method.name}: 2 global views only; data.local_crops_number="
              f"{cfg.data.local_crops_number} is not used", flush=True)
    grid = patch_grid(cfg.data.global_crop_size, method.student.backbone.patch_size) if method.uses_masks else None
    return SSLDataModule(cfg, local_crops_number=local, mask_grid=grid)


def quiet_lightning() -> None:
    """Hide Lightning's banners and advertising; our own lines say what runs where."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    warnings.filterwarnings("ignore", message=".*`weights_only` was not set.*")


def build_trainer(cfg: config_lib.Config, run_dir: tracking.RunDir, extra: list[Callback] = ()) -> L.Trainer:
    quiet_lightning()
    loggers = [tracking.JsonlLogger(run_dir.path / tracking.METRICS_FILE)]
    wandb = tracking.wandb_logger(cfg, run_dir.path.name, run_dir.path)
    if wandb is not None:
        loggers.append(wandb)
    t = cfg.trainer
    callbacks: list[Callback] = [AtomicLastCheckpoint(run_dir.checkpoints), *extra]
    if not cfg.tracking.progress_bar:
        callbacks.append(ProgressLines(cfg.tracking.log_every_n_steps * 5))
    return L.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, precision=t.precision,
                     max_epochs=cfg.optim.epochs, max_steps=t.max_steps, logger=loggers,
                     callbacks=callbacks, enable_checkpointing=False,
                     log_every_n_steps=cfg.tracking.log_every_n_steps,
                     enable_progress_bar=cfg.tracking.progress_bar, enable_model_summary=False,
                     default_root_dir=str(run_dir.path), num_sanity_val_steps=0)


def knn_metrics(cfg: config_lib.Config, backbone: torch.nn.Module, suffix: str,
                run_dir: Path | None = None) -> tuple[dict[str, float], dict[str, Any]]:
    """k-NN top-1/top-5 for every k in cfg.eval.knn_k (``knn_top1{suffix}`` at the reported k) and the protocol.

    With ``eval.cache_features`` the trained backbone's features are kept in ``<run_dir>/features``,
    keyed by a hash of the weights, so later ``ssl-bench eval knn`` calls reuse them.
    """
    cache = weights = None
    if cfg.eval.cache_features and run_dir is not None and not suffix:
        cache, weights = FeatureCache(run_dir / tracking.FEATURES_DIR), weights_sha256(backbone)
    outcome = run_knn(cfg, backbone, suffix, cache, weights, progress=lambda label: feature_progress(cfg, label),
                      log=lambda line: print(line, flush=True) if dist.rank() == 0 else None)
    return outcome.metrics, outcome.protocol


def feature_progress(cfg: config_lib.Config, label: str):
    """A progress callback for feature extraction: a tqdm bar, or with bars off (batch jobs) a plain
    line at every 10% of the batches, so a long extraction is never silent."""
    if not cfg.tracking.progress_bar:
        return _progress_lines(f"k-NN {label}") if dist.rank() == 0 else None
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"k-NN {label}", unit="batch", leave=False)
        bar.update(1)
        if done == total:
            bar.close()

    return update


def _progress_lines(label: str):
    start = time.time()

    def update(done: int, total: int) -> None:
        step = max(total // 10, 1)
        if total > 0 and (done % step == 0 or done == total):
            elapsed = time.time() - start
            eta = elapsed / done * (total - done)
            print(f"[ssl-bench] {label}: {done}/{total} batches, {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)

    return update


def _last_logged(trainer: L.Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else None


def validate_config(cfg: config_lib.Config, label: str = "config", check_data: bool = True) -> None:
    """Fail before anything starts: unknown method/dataset/backbone, unbuildable model, unreachable data."""
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
