"""Metric names, the run-directory writer and the W&B mirror.

The run directory (DESIGN.md §1) is the source of truth; W&B mirrors it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ssl_bench.config import RUN_CHECKPOINT_DIR, RUN_CONFIG_FILE, RUN_LAST_CHECKPOINT, Config, to_yaml

CONFIG_FILE = RUN_CONFIG_FILE
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CHECKPOINT_DIR = RUN_CHECKPOINT_DIR
LAST_CHECKPOINT = RUN_LAST_CHECKPOINT
ATTEMPTS_DIR = "attempts"

# Collapse diagnostics in metrics.jsonl (DINO Fig. 7; see eval/collapse.py).
TEACHER_ENTROPY = "collapse/teacher_entropy"
KL_TEACHER_STUDENT = "collapse/kl_teacher_student"
RANKME = "collapse/rankme"
FEATURE_STD = "collapse/feature_std"
COLLAPSED = "collapse/collapsed"

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"

KNN_TOP1 = "knn_top1"
# Online k-NN during training (eval.knn_every_n_epochs): knn/top1, knn/top5, knn/k{k}_top1 by step.
ONLINE_KNN_PREFIX = "knn/"
EVALS_DIR = "evals"  # post-hoc evaluations (ssl-bench eval ...): one JSON record each
FEATURES_DIR = "features"  # cached frozen features, keyed by weights + data + preprocessing


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_result(directory: Path) -> dict[str, Any] | None:
    """The run's result.json, or None when absent or unreadable (e.g. truncated)."""
    try:
        return json.loads((Path(directory) / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def archive_previous_attempt(directory: Path) -> Path | None:
    """Move the files of an earlier, unfinished attempt to attempts/N/ so nothing is overwritten.

    Checkpoints stay in place so a later resume can use them.
    """
    names = [n for n in (CONFIG_FILE, ENV_FILE, METRICS_FILE, RESULT_FILE, EVALS_DIR) if (directory / n).exists()]
    if not names:
        return None
    attempts = directory / ATTEMPTS_DIR
    n = 1 + sum(1 for _ in attempts.iterdir()) if attempts.exists() else 1
    target = attempts / str(n)
    target.mkdir(parents=True)
    for name in names:
        shutil.move(str(directory / name), str(target / name))
    return target


class RunDir:
    """Writes config.yaml, env.json and result.json of one run."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory)
        self.checkpoints = self.path / CHECKPOINT_DIR

    def start(self, cfg: Config, run_id: str, env: dict[str, Any]) -> None:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path / CONFIG_FILE, to_yaml(cfg))
        write_json(self.path / ENV_FILE, env)
        self.write_result({"run_id": run_id, "study": cfg.study, "method": cfg.method.name,
                           "seed": cfg.seed, "status": STATUS_RUNNING})

    def write_result(self, result: Mapping[str, Any]) -> None:
        write_json(self.path / RESULT_FILE, result)


def record_eval(directory: Path, eval_id: str, record: Mapping[str, Any]) -> Path:
    """Store a post-hoc evaluation: ``evals/<eval_id>.json`` and ``result.json["evals"][eval_id]``.

    The training record (status, metrics, protocol) is never modified; earlier evaluations stay
    (the same ``eval_id`` — same kind, protocol and weights — is replaced by its rerun). A lock file
    serialises concurrent evaluations of one run directory.
    """
    import fcntl

    directory = Path(directory)
    (directory / EVALS_DIR).mkdir(parents=True, exist_ok=True)
    path = directory / EVALS_DIR / f"{eval_id}.json"
    write_json(path, record)
    with open(directory / ".result.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = read_result(directory)
        if result is not None:
            result.setdefault("evals", {})[eval_id] = dict(record)
            write_json(directory / RESULT_FILE, result)
    return path


class JsonlLogger(Logger):
    """Lightning logger appending one JSON object per logged step to metrics.jsonl."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self._path = Path(path)
        self._start = time.time()

    @property
    def name(self) -> str:
        return "jsonl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None  # config.yaml already holds the resolved config

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        record = {"step": step, "time_s": round(time.time() - self._start, 3)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with self._path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible
    return value


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wandb_logger(cfg: Config, run_id: str, directory: Path) -> Logger | None:
    """W&B mirror (same run id, group = study) or None when tracking.wandb=off."""
    if cfg.tracking.wandb == "off":
        return None
    from lightning.pytorch.loggers import WandbLogger

    from ssl_bench.config import to_dict

    return WandbLogger(project=cfg.tracking.wandb_project, entity=cfg.tracking.wandb_entity,
                       id=run_id, name=run_id, group=cfg.study, mode=cfg.tracking.wandb,
                       save_dir=str(directory), config=to_dict(cfg), resume="allow")
