"""Collect run directories into one tidy DataFrame: one row per expected run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

MISSING = "missing"
COLLAPSE_FIELDS = ("collapsed", "collapse_step", "collapse_reason", "stopped_early")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect(expected: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per expected run: its axes, seed, status and every metric/timing in result.json.

    Args:
        expected: dicts with ``run_id``, ``run_dir``, ``seed`` and ``axes`` (a dict of
            axis -> value), e.g. from a study's RunSpecs. Runs without a readable
            result.json get status ``missing``; none is dropped.
    """
    rows = []
    for run in expected:
        row: dict[str, Any] = {"run_id": run["run_id"], "seed": run["seed"], **run["axes"]}
        result = read_json(Path(run["run_dir"]) / "result.json")
        env = read_json(Path(run["run_dir"]) / "env.json") or {}
        row["status"] = result.get("status", MISSING) if result else MISSING
        row["method"] = (result or {}).get("method", run.get("method"))
        row["error"] = (result or {}).get("error")
        for key, value in ((result or {}).get("metrics") or {}).items():
            row[key] = value
        for key, value in ((result or {}).get("timing") or {}).items():
            row[f"timing.{key}"] = value
        for key, value in ((result or {}).get("collapse") or {}).items():
            if key in COLLAPSE_FIELDS:
                row[f"collapse.{key}"] = value
        row.update(latest_eval_metrics(result or {}, row))
        git = env.get("git") or {}
        row["git_sha"] = git.get("sha")
        row["git_dirty"] = git.get("dirty")
        protocol = dict((result or {}).get("protocol") or {})
        for kind, entry in latest_evals(result or {}).items():
            protocol.setdefault(kind, entry.get("protocol"))
        row["protocol"] = json.dumps(protocol, sort_keys=True) if result else None
        rows.append(row)
    return pd.DataFrame(rows)


def latest_evals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The most recent post-hoc evaluation (``ssl-bench eval``) of each kind in a result.json."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in (result.get("evals") or {}).values():
        kind = entry.get("kind")
        if kind and str(entry.get("created", "")) >= str(latest.get(kind, {}).get("created", "")):
            latest[kind] = entry
    return latest


def latest_eval_metrics(result: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """Metrics of the latest evaluation of each kind that the training record does not already hold.

    Training metrics are never replaced: a post-hoc k-NN with another protocol stays in ``evals``.
    """
    out: dict[str, Any] = {}
    for entry in latest_evals(result).values():
        for key, value in (entry.get("metrics") or {}).items():
            if key not in row and value is not None:
                out[key] = value
    return out
