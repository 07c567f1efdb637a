"""The run-directory writer: config, env and result records, attempts kept aside, metrics.jsonl, W&B hooks.

Every file name comes from ``tracking.layout``; W&B only mirrors what is written here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from ssl_bench.config import Config, to_yaml
from ssl_bench.tracking.layout import (ATTEMPTS_DIR, CHECKPOINT_DIR, CONFIG_FILE, ENV_FILE, EVALS_DIR, EVALS_KEY,
                                       METRICS_FILE, RESULT_FILE, RESULT_LOCK, STATUS_RUNNING, STEP_KEY_PREFIXES)
from ssl_bench.tracking.records import atomic_write_text, read_json_record, read_result, write_json


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

    def update_env(self, extra: Mapping[str, Any]) -> None:
        """Add keys to this attempt's env.json (e.g. ``speed_levers``, chosen once the model exists)."""
        env = json.loads((self.path / ENV_FILE).read_text())
        write_json(self.path / ENV_FILE, {**env, **extra})


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
    with open(directory / RESULT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = read_result(directory)
        if result is not None:
            result.setdefault(EVALS_KEY, {})[eval_id] = dict(record)
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
