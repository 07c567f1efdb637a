"""Run records as strict JSON: atomic writes, non-finite values made visible, readable metric lines.

Torch-free (report/ reads records without torch). A record that cannot be read raises
CorruptRecordError; it is never reported as missing (DESIGN.md habit 13).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ssl_bench.tracking.layout import METRICS_FILE, RESULT_FILE


class CorruptRecordError(ValueError):
    """A run record (result.json, env.json...) exists but cannot be read: corrupt, never "missing" (habit 13)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path} is corrupt ({reason}); nothing was changed: repair or move it away")


def read_json_record(path: Path) -> dict[str, Any] | None:
    """A JSON record: None when the file is absent; CorruptRecordError when it exists but cannot be read.

    Every reader (tracking, launch, report) uses this one rule.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(path, f"{type(exc).__name__}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptRecordError(path, f"not JSON: {exc}" if text.strip() else "empty file") from exc
    if not isinstance(data, dict):
        raise CorruptRecordError(path, f"a JSON {type(data).__name__}, not an object")
    return data


def torn_lines_text(lines: int, runs: Optional[int] = None) -> str:
    """``metrics.jsonl: 2 torn line(s) skipped`` (``in 1 run`` when ``runs`` is given)."""
    where = "" if runs is None else f" in {runs} run{'s' if runs != 1 else ''}"
    return f"metrics.jsonl: {lines} torn line(s) skipped{where}"


def read_jsonl_counted(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON-object lines of a JSONL file, how many lines were skipped because they do not parse);
    an absent file has neither. A torn line is left by a crash mid-write or is being written."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    return records, torn


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
