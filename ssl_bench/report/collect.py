"""Collect run directories into one tidy DataFrame: one row per expected run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ssl_bench.tracking.layout import CONFIG_FILE, ENV_FILE, EVALS_KEY, METRICS_FILE, RESULT_FILE
from ssl_bench.tracking.records import CorruptRecordError, read_json_record, read_jsonl_counted, torn_lines_text

MISSING = "missing"
CORRUPT = "corrupt"  # a record that exists but cannot be read (habit 13: never reported as missing)
COLLAPSE_FIELDS = ("collapsed", "collapse_step", "collapse_reason", "stopped_early")


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON record, None when absent; a corrupt file reads as the marker record
    ``{"status": "corrupt (<file>: <reason>)", "corrupt": <reason>}`` so every status shown says so."""
    try:
        return read_json_record(path)
    except CorruptRecordError as exc:
        return {"status": f"{CORRUPT} ({Path(path).name}: {exc.reason})", "corrupt": exc.reason}


def count_torn_lines(path: Path) -> int:
    """Lines of a JSONL file that do not parse as a JSON object (0 for an absent file)."""
    return read_jsonl_counted(Path(path))[1]


torn_text = torn_lines_text  # the footer line for skipped metric lines (tracking.records: shared with grid status)


def collect(expected: Iterable[dict[str, Any]]) -> pd.DataFrame:
    """One row per expected run, from its run directory (result.json, env.json, config.yaml).

    Args:
        expected: dicts with ``run_id``, ``run_dir``, ``seed`` and ``axes`` (a dict of
            axis -> value), e.g. from a study's RunSpecs. Runs without a result.json get status
            ``missing``; an unreadable one gives status ``corrupt`` with the reason in ``error``;
            none is dropped. An unreadable env.json puts its reason in ``env_error``.
    """
    rows = []
    for run in expected:
        directory = Path(run["run_dir"])
        result, result_error = _record(directory / RESULT_FILE)
        env, env_error = _record(directory / ENV_FILE)
        row = run_row(run, result, env, read_yaml_quiet(directory / CONFIG_FILE), source=str(directory))
        if result_error:
            row["status"], row["error"] = CORRUPT, result_error
        row["env_error"] = env_error
        row["metrics_torn_lines"] = count_torn_lines(directory / METRICS_FILE)
        rows.append(row)
    return pd.DataFrame(rows)


def _record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None), (None, None) when absent, or (None, ``<file> corrupt: <reason>``)."""
    try:
        return read_json_record(path), None
    except CorruptRecordError as exc:
        return None, f"{path.name} corrupt: {exc.reason}"


def run_row(run: dict[str, Any], result: dict[str, Any] | None, env: dict[str, Any] | None,
            config: dict[str, Any] | None, source: str | None = None) -> dict[str, Any]:
    """The tidy row of one run: identity and axes, status, every metric and timing, protocol, provenance.

    One function for every source (run directories, W&B), so both give the same columns.

    Args:
        run: ``run_id``, ``seed``, ``axes`` (axis -> value) and optionally ``method``.
        result: the result.json record (None: the run has none yet -> status ``missing``).
        env: the env.json record (git, versions, hardware, world size).
        config: the resolved config as a nested dict (config.yaml).
        source: where the record was read (a run directory or a W&B run path).
    """
    result, env, config = result or None, env or {}, config or {}
    row: dict[str, Any] = {"run_id": run["run_id"], "seed": run["seed"], **run["axes"]}
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
    row.update(config_fields(config))
    row.update(provenance_fields(env))
    protocol = dict((result or {}).get("protocol") or {})
    for kind, entry in latest_evals(result or {}).items():
        protocol.setdefault(kind, entry.get("protocol"))
    row["protocol"] = json.dumps(protocol, sort_keys=True) if result else None
    row["source"] = source
    return row


# Config values every table footer and comparison needs; dotted paths into the resolved config.
CONFIG_FIELDS = ("data.name", "data.subset", "data.batch_size", "optim.accumulate_grad_batches", "backbone.name",
                 "optim.epochs", "trainer.max_steps", "trainer.accelerator", "trainer.devices", "trainer.num_nodes",
                 "trainer.precision")


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """``config.<dotted key>`` columns for CONFIG_FIELDS (None where the config lacks the key)."""
    out = {}
    for dotted in CONFIG_FIELDS:
        node: Any = config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[f"config.{dotted}"] = node
    return out


def provenance_fields(env: dict[str, Any]) -> dict[str, Any]:
    """Git sha and dirty flag, versions and hardware of env.json as flat columns."""
    git, hardware, versions = env.get("git") or {}, env.get("hardware") or {}, env.get("versions") or {}
    return {"git_sha": git.get("sha"), "git_dirty": git.get("dirty"),
            "hardware": hardware_label(hardware), "world_size": env.get("world_size"),
            "torch_version": versions.get("torch"), "started_at": env.get("started_at"),
            "slurm_job_id": env.get("slurm_job_id")}


def hardware_label(hardware: dict[str, Any]) -> str | None:
    """``2 CPU cores`` or ``1x NVIDIA H100`` style label from env.json's hardware record."""
    if not hardware:
        return None
    gpus = hardware.get("gpus") or hardware.get("cuda_devices")
    if hardware.get("cuda") and isinstance(gpus, list) and gpus:
        names = sorted({str(g.get("name", g)) if isinstance(g, dict) else str(g) for g in gpus})
        return f"{len(gpus)}x {', '.join(names)}"
    return f"{hardware.get('cpu_count', '?')} CPU cores ({hardware.get('processor') or 'cpu'})"


def read_yaml_quiet(path: Path) -> dict[str, Any] | None:
    """A YAML file as a dict, or None if it is missing or unreadable (a run still starting)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def latest_evals(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The most recent post-hoc evaluation (``ssl-bench eval``) of each kind in a result.json."""
    latest: dict[str, dict[str, Any]] = {}
    for entry in (result.get(EVALS_KEY) or {}).values():
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
