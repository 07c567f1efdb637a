"""Resuming an interrupted run: which checkpoint to continue from, and the run directory of the new attempt.

An unfinished attempt (result.json running/failed/preempted, or none) that left a loadable
checkpoint of the same run id is continued; its records say so (``resumes``, each with the ``reason``
the attempt before ended: preempted, failed or lost), and the
metrics.jsonl lines of work that will be redone are set aside under attempts/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ssl_bench import config as config_lib
from ssl_bench import repro, tracking
from ssl_bench.run.checkpoints import ResumePoint, find_resume_checkpoint


@dataclass
class Attempt:
    """One attempt at a run: where it resumes from and what it has produced so far (for every record)."""

    resume: Optional[ResumePoint] = None
    knn_init: bool = True  # compute the k-NN at init (False: a resumed attempt reuses the earlier values)
    metrics: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    protocol: dict[str, Any] = field(default_factory=dict)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    ddp: dict[str, Any] = field(default_factory=dict)  # world size and every rank's teacher hash (DDP only)
    wandb: Any = None  # the W&B logger, finished with the final record
    on_init_metrics: Callable[[], None] = lambda: None  # rank 0 records the k-NN at init at once
    on_heartbeat: Callable[[], None] = lambda: None  # rank 0 refreshes owner.heartbeat_at in result.json


def plan_resume(cfg: config_lib.Config, run_id: str, directory: Path, previous: Optional[dict], force: bool,
                log: Callable[[str], None] = print) -> tuple[Optional[ResumePoint], Optional[str]]:
    """(checkpoint to continue from, None), or (None, why the attempt found there is not continued).

    (None, None) when there is nothing to continue: ``force``, ``train.resume=false`` or no checkpoint.
    """
    checkpoints = directory / tracking.CHECKPOINT_DIR
    if force or not cfg.train.resume or not any(checkpoints.glob("*.ckpt")):
        return None, None
    status = previous.get("status") if previous else None
    reason = None
    if previous is not None and status not in tracking.UNFINISHED:
        reason = f"result.json has status {status!r}"
    elif (saved := _saved_run_id(directory)) != run_id:
        reason = f"{tracking.CONFIG_FILE} is {'unreadable' if saved is None else f'of run {saved}'}"
    else:
        point = find_resume_checkpoint(directory, run_id, log)
        if point is not None:
            return point, None
        reason = f"no loadable checkpoint in {checkpoints}"
    log(f"[ssl-bench] {run_id}: {reason}; starting from scratch (the old attempt goes to {tracking.ATTEMPTS_DIR}/)")
    return None, reason


def _saved_run_id(directory: Path) -> Optional[str]:
    try:
        return config_lib.run_id(config_lib.from_dict(config_lib.read_yaml(directory / tracking.CONFIG_FILE)))
    except Exception:  # missing, unreadable or no longer a valid config: not this run's
        return None


def start_attempt(cfg: config_lib.Config, run_id: str, run_dir: tracking.RunDir, previous: Optional[dict],
                  attempt: Attempt, fresh_reason: Optional[str]) -> dict[str, Any]:
    """Rank 0: prepare the run directory for this attempt; returns the fixed part of its result.json."""
    record: dict[str, Any] = {"run_id": run_id, "study": cfg.study, "method": cfg.method.name, "seed": cfg.seed,
                              tracking.OWNER_KEY: repro.owner()}
    if attempt.resume is None:
        archived = tracking.archive_previous_attempt(run_dir.path) if run_dir.path.exists() else None
        run_dir.start(cfg, run_id, repro.environment(cfg.seed, cfg.trainer.devices * cfg.trainer.num_nodes))
        if fresh_reason:
            record["fresh_start"] = {"reason": fresh_reason, "archived_to": str(archived) if archived else None}
    else:
        _continue_attempt(run_id, run_dir, previous or {}, attempt, record)

    def write_running() -> None:  # every "running" record is also a heartbeat of its owner
        record[tracking.OWNER_KEY]["heartbeat_at"] = repro.utc_now()
        run_dir.write_result({**record, "status": tracking.STATUS_RUNNING, "metrics": attempt.metrics,
                              "timing": attempt.timing})

    attempt.on_init_metrics = attempt.on_heartbeat = write_running
    attempt.on_init_metrics()
    return record


def _continue_attempt(run_id: str, run_dir: tracking.RunDir, previous: dict, attempt: Attempt,
                      record: dict[str, Any]) -> None:
    """Set aside the log lines of work to redo, add this resume to ``record`` and reuse the k-NN at init."""
    resume = attempt.resume
    assert resume is not None
    record.update({key: previous[key] for key in ("fresh_start",) if key in previous})
    _, moved = tracking.set_aside_metrics(run_dir.path, resume.step, tracking.next_attempt_dir(run_dir.path))
    restarts = os.environ.get("SLURM_RESTART_COUNT")
    record["resumes"] = list(previous.get("resumes", [])) + [{
        "reason": resume_reason(previous), "previous_owner": previous.get(tracking.OWNER_KEY),
        "from_step": resume.step, "checkpoint": resume.name, "epoch": resume.epoch, "batch": resume.batch,
        "at": repro.utc_now(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart_count": int(restarts) if restarts and restarts.isdigit() else None,
        "skipped_checkpoints": resume.problems,
        "metrics_set_aside": str(moved.relative_to(run_dir.path)) if moved else None}]
    reused = {k: v for k, v in previous.get("metrics", {}).items() if k.endswith("_init")}
    if attempt.knn_init and reused:
        attempt.metrics.update(reused)
        attempt.timing.update({k: v for k, v in previous.get("timing", {}).items() if k == "knn_init_s"})
        attempt.knn_init = False
    print(f"[ssl-bench] resuming {run_id} from step {resume.step} ({tracking.CHECKPOINT_DIR}/{resume.path.name}, "
          f"epoch {resume.epoch}, batch {resume.batch} of {resume.batches_per_epoch})", flush=True)


def resume_reason(previous: dict) -> str:
    """Why the attempt before this one ended: "preempted", "failed", or "lost" (its record still said
    running, or there was none: the process was killed, e.g. SIGKILL or a node failure)."""
    status = previous.get("status")
    return {tracking.STATUS_PREEMPTED: "preempted", tracking.STATUS_FAILED: "failed"}.get(status, "lost")
