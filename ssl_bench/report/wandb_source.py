"""Collect a study's runs from W&B into the same tidy DataFrame that ``collect.collect`` builds.

W&B mirrors the run directory (DESIGN.md §1, ``ssl_bench.tracking.wandb_mirror``): a run's config is the
resolved config plus ``env`` (env.json), ``run_id`` and ``run_dir``; its summary is
``summary_of(result.json)``: metric keys flat, ``status``, ``error``, ``timing/<k>`` and
``collapse/<k>``. Here each W&B run is turned back into a result.json-like record and passed to
``collect.run_row``, the one row builder, so both sources give the same columns.

Only wandb's public API is used (``api.runs``, ``run.summary``, ``run.config``, ``run.scan_history``);
tests pass a small fake object as ``api``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable, Sequence

import pandas as pd

from ssl_bench.config import ConfigError
from ssl_bench.report.collect import run_row
from ssl_bench.report.curves import DEFAULT_CURVES
from ssl_bench.tracking.layout import STATUS_FAILED as FAILED
from ssl_bench.tracking.layout import STATUS_PREEMPTED as PREEMPTED
from ssl_bench.tracking.layout import STATUS_RUNNING as RUNNING

UNKNOWN = "unknown"  # a W&B run that ended without the final record ssl-bench writes to its summary
# Run-level keys the mirror adds to the resolved config (wandb_mirror.run_config).
MIRROR_CONFIG_KEYS = ("env", "run_id", "run_dir")
# Unprefixed summary keys that are not result metrics: W&B's summary keeps the last value of every
# logged history key, and Lightning adds ``epoch`` to what ``self.log`` logs.
NOT_METRICS = ("status", "error", "epoch")
# W&B run states without our summary status -> result.json status. ``finished`` without a status
# means the process exited before publish_result (e.g. killed between training and the final
# record), so nothing says whether it completed: UNKNOWN, never "completed".
STATE_STATUS = {"running": RUNNING, "pending": RUNNING, "crashed": FAILED, "failed": FAILED, "killed": FAILED,
                "preempting": PREEMPTED, "preempted": PREEMPTED, "finished": UNKNOWN}
# The step of a history row, best first: Lightning's WandbLogger logs ``trainer/global_step`` with
# every metric; ``step`` is what metrics.jsonl uses; ``_step`` is W&B's own counter of log calls
# (not the training step under Lightning), the last resort.
STEP_KEYS = ("trainer/global_step", "step", "_step")


def collect_wandb(study: str, project: str, entity: str | None = None, api: Any = None,
                  expected: Iterable[dict[str, Any]] | None = None) -> pd.DataFrame:
    """One row per run of ``study`` (the W&B group) in ``entity/project``, columns as ``collect.collect``.

    Rows of ``expected`` runs come first, in their order; an expected run W&B lacks is a row with
    status ``missing``. W&B runs not in ``expected`` follow, with their axes read from their config.
    Extra columns: ``duplicates``, how many other W&B runs of the group had the same run id (the
    most recent one is kept: summary ``_timestamp``, else ``created_at``).

    Args:
        study: the study name (W&B group).
        project: W&B project; ``entity`` None is wandb's default entity.
        api: a ``wandb.Api()``-like object (default: a new ``wandb.Api()``).
        expected: dicts with ``run_id``, ``seed``, ``axes`` and ``method`` (cli.expected_runs); None:
            every W&B run of the group, with axes ``{"method": <method name>}``.

    Raises:
        ConfigError: the project has no run in group ``study``.
    """
    runs = latest_runs(study, project, entity, api)
    expected = None if expected is None else list(expected)
    rows = []
    for run, info in identities(runs, expected):
        if run is None:
            rows.append({**run_row(info, None, None, None), "duplicates": 0})
            continue
        wandb_run, duplicates = run
        result, env, config = record_of(wandb_run)
        row = run_row(info, result, env, config, source=source_of(wandb_run, entity, project))
        row["protocol"] = None  # the evaluation protocol is nested, so it stays in result.json only
        rows.append({**row, "duplicates": duplicates})
    return pd.DataFrame(rows)


def history_wandb(study: str, project: str, entity: str | None = None, api: Any = None,
                  keys: Sequence[str] = DEFAULT_CURVES,
                  expected: Iterable[dict[str, Any]] | None = None) -> pd.DataFrame:
    """Long table as ``curves.collect_curves``: one row per (run, step) with any of ``keys`` logged.

    Reads ``run.scan_history(keys=[key, step_key])`` once per key (every logged row, unlike the
    sampled ``run.history``); a scan only returns rows holding both keys, so the step keys of
    STEP_KEYS are tried in order until one gives rows. Runs and axes as in ``collect_wandb``.

    Args:
        study, project, entity, api, expected: as for ``collect_wandb``.
        keys: metric names as logged (e.g. ``collapse/teacher_entropy``).
    """
    runs = latest_runs(study, project, entity, api)
    rows = []
    for run, info in identities(runs, None if expected is None else list(expected)):
        if run is None:
            continue
        for step, values in sorted(history_of(run[0], keys).items()):
            rows.append({"run_id": info["run_id"], "seed": info["seed"], **info["axes"], "step": step, **values})
    return pd.DataFrame(rows)


def latest_runs(study: str, project: str, entity: str | None, api: Any) -> dict[str, tuple[Any, int]]:
    """run_id -> (most recent W&B run of that id in group ``study``, how many others had it)."""
    if api is None:
        import wandb  # lazily: only this source needs it

        api = wandb.Api()
    path = f"{entity}/{project}" if entity else project
    found: dict[str, list[Any]] = {}
    for run in api.runs(path, filters={"group": study}):
        found.setdefault(run_id_of(run), []).append(run)
    if not found:
        raise ConfigError(f"W&B project {path!r} has no run in group {study!r} (the project has "
                          f"{count_runs(api, path)} run(s) in all); check the study name, "
                          "tracking.wandb_project and tracking.wandb_entity")
    return {rid: (max(group, key=recency), len(group) - 1) for rid, group in found.items()}


def count_runs(api: Any, path: str) -> int | str:
    """Number of runs in a project (``len`` of wandb's Runs asks the server for the count)."""
    try:
        runs = api.runs(path)
        try:
            return len(runs)
        except TypeError:
            return sum(1 for _ in runs)
    except Exception as exc:  # the count only decorates the error message; never hide the real error
        return f"an unknown number of ({type(exc).__name__})"


def identities(runs: dict[str, tuple[Any, int]], expected: list[dict[str, Any]] | None
               ) -> list[tuple[tuple[Any, int] | None, dict[str, Any]]]:
    """(W&B run or None, run dict for run_row) pairs: expected runs first, then the others."""
    pairs: list[tuple[tuple[Any, int] | None, dict[str, Any]]] = []
    axis_names: list[str] = []
    for info in expected or []:
        pairs.append((runs.get(info["run_id"]), info))
        axis_names += [a for a in info["axes"] if a not in axis_names]
    known = {info["run_id"] for info in expected or []}
    for rid, run in runs.items():
        if rid not in known:
            config = config_of(run[0])
            names = axis_names if expected is not None else ["method"]
            pairs.append((run, {"run_id": rid, "seed": config.get("seed"), "method": method_of(config),
                                "axes": {name: axis_value(config, name) for name in names}}))
    return pairs


def record_of(run: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(result.json-like record, env.json record, resolved config) of one W&B run."""
    summary = {k: v for k, v in dict(run.summary or {}).items() if not str(k).startswith("_")}
    full = config_of(run)
    env = full.get("env") if isinstance(full.get("env"), dict) else {}
    config = {k: v for k, v in full.items() if k not in MIRROR_CONFIG_KEYS}
    status, error = status_of(summary, getattr(run, "state", None))
    result = {"status": status, "error": error, "method": method_of(config),
              "metrics": {k: v for k, v in summary.items()
                          if "/" not in str(k) and k not in NOT_METRICS and scalar(v)}}
    for section in ("timing", "collapse"):
        prefix = f"{section}/"
        result[section] = {k[len(prefix):]: v for k, v in summary.items() if str(k).startswith(prefix) and scalar(v)}
    return result, env, config


def status_of(summary: dict[str, Any], state: str | None) -> tuple[str, str | None]:
    """The run's status and error, from its summary (written by ssl-bench) and W&B's run state.

    The summary's ``status`` wins, except that a W&B run running again (a resumed attempt continues
    the same W&B run) is ``running`` while its summary still holds an earlier attempt's unfinished
    record. Without a summary status the state decides (STATE_STATUS), with an error saying so.
    """
    status = summary.get("status")
    if isinstance(status, str) and status:
        if state == "running" and status in (RUNNING, FAILED, PREEMPTED):
            return RUNNING, None
        return status, summary.get("error")
    derived = STATE_STATUS.get(str(state), UNKNOWN)
    if derived == RUNNING:
        return RUNNING, None
    return derived, f"W&B run {state} without the final ssl-bench record in its summary"


def history_of(run: Any, keys: Sequence[str]) -> dict[int, dict[str, Any]]:
    """step -> {key: value} of one W&B run's history; a key logged twice at a step keeps the last."""
    by_step: dict[int, dict[str, Any]] = {}
    for key in keys:
        for step_key in STEP_KEYS:
            rows = [r for r in run.scan_history(keys=[key, step_key])
                    if r.get(key) is not None and r.get(step_key) is not None]
            if rows:
                break
        for row in rows:
            by_step.setdefault(int(row[step_key]), {})[key] = row[key]
    return by_step


def run_id_of(run: Any) -> str:
    """The ssl-bench run id: config ``run_id`` (the mirror writes it), else the W&B name, else its id."""
    return str(config_of(run).get("run_id") or getattr(run, "name", None) or run.id)


def config_of(run: Any) -> dict[str, Any]:
    """The W&B run's config without W&B's own ``_``-prefixed keys."""
    return {k: v for k, v in dict(run.config or {}).items() if not str(k).startswith("_")}


def method_of(config: dict[str, Any]) -> Any:
    method = config.get("method")
    return method.get("name") if isinstance(method, dict) else method


def axis_value(config: dict[str, Any], axis: str) -> Any:
    """An axis value from a nested config: ``method`` means ``method.name`` (as cli.expected_runs names it)."""
    node: Any = config
    for part in ("method.name" if axis == "method" else axis).split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def recency(run: Any) -> float:
    """Seconds since the epoch of a run's last activity: summary ``_timestamp``, else ``created_at``."""
    stamp = (run.summary or {}).get("_timestamp")
    if isinstance(stamp, (int, float)):
        return float(stamp)
    created = getattr(run, "created_at", None)
    try:
        return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return float("-inf")


def source_of(run: Any, entity: str | None, project: str) -> str:
    """``wandb:<entity>/<project>/<id>``, from the run's own path where it has one."""
    path = getattr(run, "path", None)
    if isinstance(path, (list, tuple)) and path:
        return "wandb:" + "/".join(str(p) for p in path)
    if isinstance(path, str) and path:
        return f"wandb:{path}"
    return f"wandb:{entity or '-'}/{project}/{run.id}"


def scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
