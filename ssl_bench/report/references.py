"""Reference numbers (a paper's table, a baseline) to set beside observed results: ``experiments/references/*.yaml``.

A reference file::

    title: DINO Table 7 (ViT-S/16, 300 epochs, ImageNet)
    source: Caron et al. 2021, arXiv 2104.14294, Table 7
    note: optional free text (how the numbers were obtained)
    rows:                  # table row label (the --rows value, e.g. the method) -> metric -> value
      dino: {knn_top1: 72.8, linear_top1: 76.1}
      "*": {knn_top1: 86.05}   # "*" applies to every row without its own entry
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ssl_bench.config import ConfigError, read_yaml

ANY_ROW = "*"
KEYS = ("title", "source", "note", "rows")


@dataclass
class Reference:
    title: str
    source: str
    path: str
    note: str = ""
    rows: dict[str, dict[str, float]] = field(default_factory=dict)

    def value(self, row: str, metric: str) -> float | None:
        for key in (row, ANY_ROW):
            if metric in self.rows.get(key, {}):
                return self.rows[key][metric]
        return None

    def metrics(self) -> list[str]:
        return list(dict.fromkeys(m for values in self.rows.values() for m in values))


def load_reference(path: str | Path) -> Reference:
    """Read and check a reference file; errors name the file and the bad key."""
    path = Path(path)
    if not path.is_file():
        here = sorted(p.name for p in path.parent.glob("*.yaml")) if path.parent.is_dir() else []
        raise ConfigError(f"reference file {path} does not exist"
                          + (f"; files in {path.parent}: {', '.join(here)}" if here else ""))
    tree = read_yaml(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a reference file is a mapping with keys {', '.join(KEYS)}")
    for key in tree:
        if key not in KEYS:
            close = difflib.get_close_matches(str(key), KEYS, n=1)
            raise ConfigError(f"{path}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                              + f"; valid keys: {', '.join(KEYS)}")
    for key in ("title", "source", "rows"):
        if not tree.get(key):
            raise ConfigError(f"{path}: {key!r} is required (where the numbers come from must be stated)")
    rows = tree["rows"]
    if not isinstance(rows, dict):
        raise ConfigError(f"{path}: 'rows' maps a row label to {{metric: value}}")
    return Reference(title=str(tree["title"]), source=str(tree["source"]), note=str(tree.get("note") or ""),
                     path=str(path), rows={str(r): _values(path, str(r), v) for r, v in rows.items()})


def _values(path: Path, row: str, values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: rows.{row} must map metric names to numbers, got {values!r}")
    out = {}
    for metric, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: rows.{row}.{metric} must be a number, got {value!r}")
        out[str(metric)] = float(value)
    return out


def check_reference(reference: Reference, labels: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """Error for a reference metric the table does not show; returns reference rows the study lacks."""
    for metric in reference.metrics():
        if metric not in metrics:
            raise ConfigError(f"{reference.path}: metric {metric!r} is not a column of this table "
                              f"(--cols {' '.join(metrics)}); add it to --cols or remove it from the reference")
    return [row for row in reference.rows if row != ANY_ROW and row not in labels]
