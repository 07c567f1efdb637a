"""The submissions log of a study: one JSON line per ``grid launch`` to submitit, read by status and cancel.

It lives under ``<runs_root>/<study>/.slurm/`` next to the code snapshots and submitit folders.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ssl_bench import config as config_lib
from ssl_bench.launch.grid import Study

SLURM_DIR = ".slurm"  # under <runs_root>/<study>/: code snapshots, submitit folders, submissions.jsonl
SUBMISSIONS_FILE = "submissions.jsonl"


def study_root(study: Study) -> Path:
    return config_lib.run_dir(study.runs[0].config).parent


def submissions_path(study: Study) -> Path:
    return study_root(study) / SLURM_DIR / SUBMISSIONS_FILE


def append_submission(study: Study, record: dict[str, Any]) -> None:
    path = submissions_path(study)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_submissions(study: Study) -> list[dict[str, Any]]:
    path = submissions_path(study)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def latest_jobs(study: Study) -> dict[str, dict[str, Any]]:
    """run id -> the latest submission that included it (job id, cluster, kind, snapshot)."""
    jobs: dict[str, dict[str, Any]] = {}
    for sub in read_submissions(study):
        for run_id, job_id in sub.get("train_jobs", {}).items():
            jobs[run_id] = {"job_id": job_id, "cluster": sub["cluster"], "submitted_at": sub["submitted_at"],
                            "submission": sub["id"], "eval_job": sub.get("eval_jobs", {}).get(run_id)}
    return jobs
