"""``grid status`` / ``grid cancel``: each run's state from its run directory and SLURM's accounting.

The run directory says what the training did (result.json status, resumes, collapse flag,
metrics.jsonl); ``squeue``/``sacct`` say what SLURM did with the latest job of the run (pending,
running, cancelled, killed, out of memory...). A job that ended without a completed record is a
failure even if the process never wrote one (SIGKILL, node failure). A record that still says running
while its owner is gone is ``lost``: its SLURM job ended, its process on this host died (or the pid is
another process now), or its heartbeat on another host is older than ``tracking.LOST_AFTER_S``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssl_bench import tracking
from ssl_bench.launch.grid import Study
from ssl_bench.launch.submissions import latest_jobs

PENDING, RUNNING, COMPLETED, FAILED, COLLAPSED, NOT_SUBMITTED, CORRUPT, LOST = (
    "pending", "running", "completed", "failed", "collapsed", "not submitted", "corrupt", "lost")
ACTIVE = (PENDING, RUNNING)  # never LOST: a lost run is resubmitted or rerun like a failed one
SLURM_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "PREEMPTED"}
SLURM_PENDING = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"}


@dataclass
class RunState:
    run_id: str
    axes: dict[str, Any]
    seed: int
    state: str
    job_id: Optional[str] = None
    slurm_state: Optional[str] = None
    nodes: Optional[str] = None
    restarts: int = 0
    resume_reasons: list[str] = field(default_factory=list)  # "preempted" | "lost" | "failed", one per resume
    last_step: Optional[int] = None
    last_metric: Optional[str] = None
    torn_lines: int = 0  # metrics.jsonl lines that did not parse (skipped)
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        extra = [e for e in (resumes_label(self.restarts, self.resume_reasons), *self.notes) if e]
        return self.state + (f" ({'; '.join(extra)})" if extra else "")


def resumes_label(restarts: int, reasons: list[str]) -> str:
    """``resumed 2x (1 preempted, 1 lost)``; ``resumed 2x after preemption`` when every resume was one."""
    if not restarts:
        return ""
    reasons = [r or "reason not recorded" for r in reasons] + ["reason not recorded"] * (restarts - len(reasons))
    if set(reasons) == {"preempted"}:
        return f"resumed {restarts}x after preemption"
    counts = {r: reasons.count(r) for r in sorted(set(reasons), key=lambda r: (_REASON_ORDER.get(r, 9), r))}
    return f"resumed {restarts}x ({', '.join(f'{n} {r}' for r, n in counts.items())})"


_REASON_ORDER = {"preempted": 0, "lost": 1, "failed": 2}


def slurm_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """job id -> {"state", "nodes"} from squeue (active jobs, arrays expanded) then sacct (ended ones)."""
    if not job_ids or shutil.which("squeue") is None:
        return {}
    states: dict[str, dict[str, str]] = {}
    out = _run(["squeue", "-h", "-r", "-o", "%i|%T|%N", "-j", ",".join(job_ids)])
    for line in out.splitlines():
        job, state, nodes = (line.split("|") + ["", ""])[:3]
        states[job.strip()] = {"state": state.strip(), "nodes": nodes.strip()}
    missing = [j for j in job_ids if j not in states]
    if missing and shutil.which("sacct"):
        out = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State,NodeList", "-j", ",".join(missing)])
        for line in out.splitlines():
            job, state, nodes = (line.split("|") + ["", ""])[:3]
            if job in missing:  # the last line of a requeued job is its latest state
                states[job] = {"state": state.split()[0] if state else "", "nodes": nodes}
    return states


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def study_status(study: Study) -> list[RunState]:
    jobs = latest_jobs(study)
    slurm_ids = [j["job_id"] for j in jobs.values() if j["cluster"] == "slurm"]
    live = slurm_states(slurm_ids)
    return [run_state(spec, jobs.get(spec.run_id), live) for spec in study.runs]


def run_state(spec: Any, job: Optional[dict[str, Any]], live: dict[str, dict[str, str]]) -> RunState:
    directory = Path(spec.run_dir)
    try:
        result, corrupt = tracking.read_result(directory) or {}, None
    except tracking.CorruptRecordError as exc:  # habit 13: corrupt, never "missing" or "not submitted"
        result, corrupt = {}, f"{tracking.RESULT_FILE}: {exc.reason}"
    resumes = [r for r in result.get("resumes") or [] if isinstance(r, dict)]
    row = RunState(spec.run_id, dict(spec.axes), spec.seed, NOT_SUBMITTED, restarts=len(resumes),
                   resume_reasons=[str(r.get("reason") or "") for r in resumes])
    progress = progress_of(directory)
    row.last_step, row.last_metric, row.torn_lines = progress.step, progress.metric, progress.torn
    if corrupt:
        row.notes.append(corrupt)
    if progress.torn:
        row.notes.append(torn_note(progress.torn))
    starts = _slurm_starts(directory)
    if starts:
        row.nodes = starts[-1].get("nodelist")
    if job:
        row.job_id = job["job_id"]
        info = live.get(job["job_id"], {})
        row.slurm_state = info.get("state")
        row.nodes = info.get("nodes") or row.nodes
    if corrupt:
        # An active SLURM job still says so (it may rewrite the record); otherwise the record decides.
        row.state = _from_slurm(row, tracking.STATUS_RUNNING, job) if row.slurm_state in SLURM_ACTIVE else CORRUPT
        return row
    status = result.get("status")
    if status == tracking.STATUS_FAILED and result.get("error"):  # e.g. "non-finite loss at step 12"
        row.notes.append(str(result["error"]).splitlines()[0][:160])
    if status == tracking.STATUS_COMPLETED:
        collapsed = (result.get("collapse") or {}).get("collapsed")
        row.state = COLLAPSED if collapsed else COMPLETED
        return row
    row.state = _from_slurm(row, status, job)
    if row.state == RUNNING and row.slurm_state not in SLURM_ACTIVE:  # no live job vouches for it: its owner
        lost, note = tracking.check_owner(result.get(tracking.OWNER_KEY))
        row.state = LOST if lost else RUNNING
        if note:
            row.notes.append(note)
    return row


def _from_slurm(row: RunState, status: Optional[str], job: Optional[dict[str, Any]]) -> str:
    slurm = row.slurm_state
    if job is None:  # never submitted through SLURM/submitit: the run record alone
        return {None: NOT_SUBMITTED, tracking.STATUS_RUNNING: RUNNING}.get(status, FAILED)
    if job["cluster"] != "slurm" or slurm is None:
        return {None: PENDING, tracking.STATUS_RUNNING: RUNNING, "preempted": PENDING}.get(status, FAILED)
    if slurm in SLURM_PENDING:
        if status == "preempted":
            row.notes.append("preempted, waiting to resume")
        return PENDING
    if slurm in SLURM_ACTIVE:
        return RUNNING
    if status == tracking.STATUS_RUNNING:  # the job ended without a final record: killed, node failure...
        row.notes.append(f"SLURM {slurm}, run record says running")
        return LOST
    if slurm == "COMPLETED" and status is None:
        row.notes.append("job ended before the run started")
    elif slurm != "COMPLETED" or status != tracking.STATUS_FAILED:
        row.notes.append(f"SLURM {slurm}" + (f", run record says {status}" if status else ""))
    return FAILED


def _slurm_starts(directory: Path) -> list[dict[str, Any]]:
    path = directory / "slurm.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Progress:
    step: Optional[int] = None  # last logged step
    metric: Optional[str] = None  # ``name=value`` of its loss (or last k-NN)
    torn: int = 0  # metrics.jsonl lines skipped because they do not parse


def progress_of(directory: Path) -> Progress:
    """Last logged step, a short ``name=value`` of its loss (or last k-NN) and the torn lines of metrics.jsonl."""
    lines = tracking.read_metrics_counted(directory)
    out = Progress(torn=lines.torn)
    for record in lines.records:
        if isinstance(record.get("step"), (int, float)):
            out.step = max(out.step or 0, int(record["step"]))
        for key in ("knn/top1", "train/loss"):
            if isinstance(record.get(key), (int, float)):
                out.metric = f"{key}={record[key]:.4g}"
                break
    return out


def torn_note(count: int) -> str:
    return tracking.torn_lines_text(count)


def torn_summary(states: list[RunState]) -> Optional[str]:
    """Footer line ``metrics.jsonl: 2 torn line(s) skipped in 1 run`` (None when every line parsed)."""
    torn = [s.torn_lines for s in states if s.torn_lines]
    if not torn:
        return None
    return tracking.torn_lines_text(sum(torn), len(torn))


def rows_for_table(states: list[RunState]) -> list[dict[str, Any]]:
    return [{"run_id": s.run_id, **{("method" if k == "method.name" else k): v for k, v in s.axes.items()},
             "seed": s.seed, "state": s.label, "job": s.job_id or "-", "nodes": s.nodes or "-",
             "restarts": s.restarts, "last step": s.last_step if s.last_step is not None else "-",
             "last metric": s.last_metric or "-"} for s in states]


def cancel(study: Study) -> dict[str, str]:
    """scancel the latest SLURM job of every run still pending or running; run id -> job id cancelled."""
    targets = {s.run_id: s.job_id for s in study_status(study)
               if s.state in ACTIVE and s.job_id and s.slurm_state is not None}
    jobs = latest_jobs(study)
    evals = [j["eval_job"] for r, j in jobs.items() if j.get("eval_job") and r in targets]
    if targets:
        subprocess.run(["scancel", *targets.values(), *evals], check=True, timeout=60)
    return targets
