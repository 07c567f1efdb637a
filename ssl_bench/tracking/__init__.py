"""Metric names, the run-directory writer and the W&B mirror.

The run directory (DESIGN.md §1) is the source of truth; W&B mirrors it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ssl_bench import repro
from ssl_bench.config import (RUN_CHECKPOINT_DIR, RUN_CONFIG_FILE, RUN_LAST_CHECKPOINT,  # noqa: F401
                              RUN_PREVIOUS_CHECKPOINT, Config,
                              CorruptRecordError, read_json_record, read_jsonl_counted, to_yaml)
# CorruptRecordError is re-exported: callers of read_result catch tracking.CorruptRecordError

CONFIG_FILE = RUN_CONFIG_FILE
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CHECKPOINT_DIR = RUN_CHECKPOINT_DIR
LAST_CHECKPOINT = RUN_LAST_CHECKPOINT
PREVIOUS_CHECKPOINT = RUN_PREVIOUS_CHECKPOINT
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
STATUS_PREEMPTED = "preempted"
UNFINISHED = (STATUS_RUNNING, STATUS_FAILED, STATUS_PREEMPTED)
# metrics.jsonl keys logged by the training step of the line's step (redone after a resume from that step).
STEP_KEY_PREFIXES = ("train/", "collapse/")

KNN_TOP1 = "knn_top1"
# Online k-NN during training (eval.knn_every_n_epochs): knn/top1, knn/top5, knn/k{k}_top1 by step.
ONLINE_KNN_PREFIX = "knn/"
FP16_SKIPPED_STEPS = "train/fp16_skipped_steps"  # 16-mixed: steps the GradScaler skipped so far
EVALS_DIR = "evals"  # post-hoc evaluations (ssl-bench eval ...): one JSON record each
FEATURES_DIR = "features"  # cached frozen features, keyed by weights + data + preprocessing


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file + rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


NON_FINITE_KEY = "non_finite"  # top-level key of a JSON record: dotted paths of values written as null


def finite_json(value: Any, replaced: list[str], where: str = "") -> Any:
    """``value`` as plain JSON data with every NaN/±inf (also numpy/torch scalars) replaced by None.

    The dotted path of each replaced value (``metrics.linear_grid.3.val_top1``) is appended to ``replaced``.
    """
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy / torch scalars and arrays
        value = value.tolist()
    if isinstance(value, Mapping):
        return {k: finite_json(v, replaced, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v, replaced, f"{where}.{i}" if where else str(i)) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        replaced.append(where)
        return None
    return value


def strict_json(data: Mapping[str, Any]) -> str:
    """Strict JSON text of a record (no NaN/Infinity tokens); replaced paths listed under NON_FINITE_KEY."""
    replaced: list[str] = []
    clean = finite_json({k: v for k, v in data.items() if k != NON_FINITE_KEY}, replaced)
    # A record read back and rewritten (record_eval) keeps the flags of values that are still null.
    earlier = data.get(NON_FINITE_KEY)
    kept = [p for p in earlier if isinstance(p, str) and _at(clean, p) is _NULL] if isinstance(earlier, list) else []
    replaced = list(dict.fromkeys(kept + replaced))
    if replaced:
        clean[NON_FINITE_KEY] = replaced
    return json.dumps(clean, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


_NULL = object()


def _at(data: Any, dotted: str) -> Any:
    """The value at a dotted path of finite_json's output: _NULL where it is None, None where absent."""
    node = data
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return _NULL if node is None else node


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, strict_json(data))


def read_result(directory: Path) -> dict[str, Any] | None:
    """The run's result.json, or None when absent; raises CorruptRecordError when it cannot be read."""
    return read_json_record(Path(directory) / RESULT_FILE)


# The process that writes a "running" result.json (repro.owner()) and how long its heartbeat may be silent.
OWNER_KEY = "owner"
LOST_AFTER_S = 30 * 60  # an owner on another host without a heartbeat for this long is lost
_PID_REUSE_SLACK_S = 5.0  # started_at has whole seconds; a process started later than this is another one


def check_owner(owner: Any, now: float | None = None) -> tuple[bool, str | None]:
    """(lost, note) for the owner of a "running" record, judged from this host without SLURM.

    On this host: lost when its pid is gone, or now belongs to a process started after the run did.
    Elsewhere: lost when the heartbeat is older than LOST_AFTER_S; else the note gives its age.
    A record without a readable owner (older versions) is never called lost.
    """
    if not isinstance(owner, Mapping):
        return False, None
    pid, host = owner.get("pid"), owner.get("host")
    if host == socket.gethostname() and isinstance(pid, int):
        if not repro.pid_alive(pid):
            return True, f"process {pid} on {host} is gone"
        began, started = repro.process_start_time(pid), _epoch(owner.get("started_at"))
        if began is not None and started is not None and began > started + _PID_REUSE_SLACK_S:
            return True, f"pid {pid} on {host} is another process now"
        return False, None
    beat = _epoch(owner.get("heartbeat_at"))
    if beat is None:
        return False, None
    minutes = int(max(0.0, (time.time() if now is None else now) - beat) // 60)
    if minutes * 60 >= LOST_AFTER_S:
        return True, f"no heartbeat for {minutes} min"
    return False, f"heartbeat {minutes} min ago"


def _epoch(stamp: Any) -> float | None:
    """Epoch seconds of a repro.utc_now() timestamp (None when absent or unreadable)."""
    try:
        return datetime.datetime.fromisoformat(stamp).timestamp() if isinstance(stamp, str) else None
    except ValueError:
        return None


def next_attempt_dir(directory: Path) -> Path:
    """``attempts/<n>``, n one more than the attempts kept so far (not created)."""
    attempts = Path(directory) / ATTEMPTS_DIR
    return attempts / str(1 + (sum(1 for _ in attempts.iterdir()) if attempts.exists() else 0))


def archive_previous_attempt(directory: Path, checkpoints: bool = True) -> Path | None:
    """Move the files of an earlier attempt to attempts/N/ so nothing is overwritten.

    A run that starts over (``force``, nothing resumable) takes its checkpoints along, so the
    new attempt never falls back to, or resumes from, the old attempt's weights.
    """
    candidates = (CONFIG_FILE, ENV_FILE, METRICS_FILE, RESULT_FILE, EVALS_DIR)
    candidates += (CHECKPOINT_DIR,) if checkpoints else ()
    names = [n for n in candidates if (directory / n).exists()]
    if not names:
        return None
    target = next_attempt_dir(directory)
    target.mkdir(parents=True)
    for name in names:
        shutil.move(str(directory / name), str(target / name))
    return target


def done_before(record: Mapping[str, Any], step: int) -> bool:
    """Whether a metrics.jsonl line is work a checkpoint at ``step`` (optimizer steps done) already holds.

    Lines of training steps < step, and evaluation lines at ``step`` itself (the online k-NN at the
    end of the epoch the checkpoint closes, logged before it was saved). Training-step lines at
    ``step`` belong to step ``step``, which is redone. Unreadable lines count as not done.
    """
    s = record.get("step")
    if s is None or s < step:
        return True
    return s == step and not any(key.startswith(STEP_KEY_PREFIXES) for key in record)


def set_aside_metrics(directory: Path, step: int, attempt_dir: Path) -> tuple[int, Path | None]:
    """Before resuming from ``step``: move metrics.jsonl lines of work to be redone to
    ``<attempt_dir>/metrics.after_step_<step>.jsonl`` and atomically rewrite metrics.jsonl.

    Returns (lines kept, file the others went to or None). The moved lines are written first, so
    a crash in between duplicates lines rather than losing them.
    """
    path = Path(directory) / METRICS_FILE
    if not path.exists():
        return 0, None
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            done = done_before(json.loads(line), step)
        except json.JSONDecodeError:  # a line torn by the crash
            done = False
        (keep if done else moved).append(line)
    target = None
    if moved:
        attempt_dir.mkdir(parents=True, exist_ok=True)
        target = attempt_dir / f"metrics.after_step_{step}.jsonl"
        atomic_write_text(target, "".join(line + "\n" for line in moved))
    atomic_write_text(path, "".join(line + "\n" for line in keep))
    return len(keep), target


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


@dataclass
class MetricLines:
    """The readable lines of metrics.jsonl and how many were skipped (torn by a crash, or being written)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    torn: int = 0


def read_metrics_counted(directory: Path) -> MetricLines:
    """metrics.jsonl's lines that parse, and the count of those that do not (absent file: none)."""
    return MetricLines(*read_jsonl_counted(Path(directory) / METRICS_FILE))


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's readable lines; ``read_metrics_counted`` also says how many were skipped."""
    return read_metrics_counted(directory).records


def wandb_logger(cfg: Config, run_id: str, directory: Path) -> Logger | None:
    """W&B mirror (``ssl_bench.tracking.wandb_mirror``) with env.json attached, or None when tracking.wandb=off."""
    if cfg.tracking.wandb == "off":
        return None
    from ssl_bench.tracking.wandb_mirror import wandb_logger as mirror

    env = read_json_record(Path(directory) / ENV_FILE)
    return mirror(cfg, run_id, directory, env)


def publish_wandb(logger: Logger | None, result: Mapping[str, Any]) -> None:
    """result.json's record as the W&B run summary; the W&B run is finished (no-op without W&B)."""
    if logger is not None:
        from ssl_bench.tracking.wandb_mirror import publish_result

        publish_result(logger, result)
