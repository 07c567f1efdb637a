"""Seed statistics per table cell: mean, std, n, 95% CI, run states, reference deltas, paired differences."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from ssl_bench.tracking.layout import STATUS_COMPLETED as COMPLETED

# Run states a cell names when they keep runs out of its statistics (result.json status, or no record).
NOT_COUNTED = ("failed", "running", "preempted", "corrupt", "missing")

# Display titles of the metrics tables usually show; any other result.json metric is shown under its own name.
METRIC_TITLES = {
    "knn_top1": "k-NN top-1 (%)", "knn_top5": "k-NN top-5 (%)", "knn_top1_init": "k-NN top-1 at init (%)",
    "linear_top1": "linear top-1 (%)", "linear_top5": "linear top-5 (%)",
    "teacher_entropy_last": "teacher entropy (nats)", "kl_teacher_student_last": "KL(t‖s) (nats)",
    "rankme_last": "RankMe", "feature_std_last": "feature std", "timing.wall_s": "wall time (s)",
    "timing.train_s": "train time (s)",
}
# Which way is better, for bolding the best row. Collapse diagnostics have no better direction (a high
# entropy is uniform collapse, a low one one-hot collapse), so they are never bolded.
# Metrics measured before training (k-NN at init): a run's collapse does not concern them.
BEFORE_TRAINING = "_init"
HIGHER_IS_BETTER = ("knn_", "linear_top", "rankme")
LOWER_IS_BETTER = ("loss", "timing.")

# Two-sided 95% Student-t quantiles t(0.975, dof) for dof 1..30 (standard tables).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)
_Z975 = 1.959964


def t975(dof: int) -> float:
    """t(0.975, dof): the table up to 30, the Cornish-Fisher expansion above it (error < 1e-4)."""
    if dof < 1:
        raise ValueError(f"a confidence interval needs at least 2 values (dof {dof})")
    if dof <= len(_T975):
        return _T975[dof - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)


def metric_title(metric: str) -> str:
    return METRIC_TITLES.get(metric, metric)


def direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower is better, 0 if neither (never bolded)."""
    if metric.startswith(LOWER_IS_BETTER) or "loss" in metric:
        return -1
    if metric.startswith(HIGHER_IS_BETTER):
        return 1
    return 0


@dataclass
class Cell:
    """Statistics of one metric over the runs of one table row."""

    metric: str
    values: list[float] = field(default_factory=list)
    expected: int = 0
    not_counted: dict[str, int] = field(default_factory=dict)  # state -> runs kept out (failed, running...)
    no_value: int = 0  # completed runs that did not record this metric
    collapsed: int = 0  # completed runs flagged collapsed (their values are in the mean, and the cell says so)
    stopped_at: list[int] = field(default_factory=list)  # steps at which train.stop_on_collapse ended such runs
    reference: float | None = None

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95% Student-t confidence interval of the mean."""
        return None if self.n < 2 else t975(self.n - 1) * self.std / math.sqrt(self.n)

    @property
    def delta(self) -> float | None:
        return None if self.mean is None or self.reference is None else self.mean - self.reference

    def record(self) -> dict[str, Any]:
        return {"metric": self.metric, "mean": self.mean, "std": self.std, "n": self.n, "ci95": self.ci95,
                "expected": self.expected, **{f"n_{s}": self.not_counted.get(s, 0) for s in NOT_COUNTED},
                "n_no_value": self.no_value, "n_collapsed": self.collapsed,
                "stopped_at": list(self.stopped_at), "reference": self.reference,
                "delta": self.delta}


def row_key(values: Any, rows: Sequence[str]) -> str:
    values = values if isinstance(values, tuple) else (values,)
    return ", ".join(str(v) for v in values)


def check_columns(df: pd.DataFrame, rows: Sequence[str], metrics: Sequence[str]) -> None:
    """A clear error for a row axis or metric no run has, listing the valid ones."""
    from ssl_bench.config import ConfigError

    known = metric_columns(df)
    axes = [c for c in df.columns if c == "method" or (c not in known and c not in _RECORD_COLUMNS
                                                        and not c.startswith(("config.", "collapse.")))]
    for name in rows:
        if name not in df.columns:
            raise ConfigError(f"--rows {name!r} is not an axis of this study; valid: {', '.join(axes)}")
    if not (df["status"] == COMPLETED).any():
        return  # nothing recorded yet to check metric names against: every cell shows its runs' states
    for name in metrics:
        if name not in known:
            raise ConfigError(f"--cols {name!r}: no run recorded this metric; valid: {', '.join(known) or 'none yet'}")


_RECORD_COLUMNS = ("study", "run_id", "seed", "method", "status", "error", "protocol", "source", "git_sha", "git_dirty",
                   "hardware", "world_size", "torch_version", "started_at", "slurm_job_id", "duplicates",
                   "env_error", "metrics_torn_lines")


def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns: result.json metrics (undotted names) and ``timing.*``.

    Grid axes are dotted config keys (``optim.lr``) or ``method``, so a numeric axis is never a metric.
    """
    out = []
    for name in df.columns:
        if name in _RECORD_COLUMNS or ("." in name and not name.startswith("timing.")):
            continue
        column = df[name]
        if pd.api.types.is_bool_dtype(column):
            continue
        numeric = pd.api.types.is_numeric_dtype(column) or column.map(
            lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))).all()
        if numeric and pd.to_numeric(column, errors="coerce").notna().any():
            out.append(name)
    return out


def aggregate(df: pd.DataFrame, rows: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, Cell]]:
    """Row label -> metric -> Cell, rows in study order.

    Only completed runs enter the statistics. Every other run is counted by its state in each cell of
    its row, so a failed seed is visible in the table and not silently averaged away. Collapsed runs did
    complete: their values are in the statistics and counted in ``Cell.collapsed``; those that
    ``train.stop_on_collapse`` ended early give their last step in ``Cell.stopped_at`` (their values are
    from that step, not from the planned end).
    """
    table: dict[str, dict[str, Cell]] = {}
    for key, group in df.groupby(list(rows), sort=False, dropna=False):
        label = row_key(key, rows)
        done = group[group["status"] == COMPLETED]
        states = group.loc[group["status"] != COMPLETED, "status"].value_counts().to_dict()
        flags = (done["collapse.collapsed"].fillna(False).astype(bool) if "collapse.collapsed" in done
                 else pd.Series(False, index=done.index))
        stopped = (done["collapse.stopped_early"].notna() if "collapse.stopped_early" in done
                   else pd.Series(False, index=done.index))
        steps = pd.to_numeric(done.get("timing.train_steps", pd.Series(index=done.index, dtype=float)),
                              errors="coerce")
        cells = {}
        for metric in metrics:
            values = pd.to_numeric(done[metric], errors="coerce") if metric in done else pd.Series(dtype=float)
            present = values.notna()
            cells[metric] = Cell(metric, [float(v) for v in values[present]], expected=len(group),
                                 not_counted={str(s): int(c) for s, c in states.items()},
                                 no_value=int((~present).sum()) if metric in done else len(done),
                                 collapsed=0 if metric.endswith(BEFORE_TRAINING) or not len(present)
                                 else int(flags[present].sum()),
                                 stopped_at=[] if metric.endswith(BEFORE_TRAINING) else
                                 sorted(int(v) for v in steps[present & stopped].dropna()))
        table[label] = cells
    return table


def best_rows(table: dict[str, dict[str, Cell]], metric: str) -> set[str]:
    """Labels of the rows with the best mean for ``metric`` (ties all bold); empty when it has no direction."""
    sign = direction(metric)
    means = {label: cells[metric].mean for label, cells in table.items() if cells[metric].mean is not None}
    if not sign or len(means) < 2:
        return set()
    best = max(v * sign for v in means.values())
    return {label for label, v in means.items() if math.isclose(v * sign, best, rel_tol=0, abs_tol=1e-12)}


def paired_differences(a: pd.DataFrame, b: pd.DataFrame, rows: Sequence[str], metrics: Sequence[str]
                       ) -> dict[str, dict[str, dict[str, Any]]]:
    """Row label -> metric -> A cell, B cell and the B - A differences of runs paired by (rows, seed).

    A pair needs a completed run with the metric on both sides; runs without a partner are counted as
    ``unpaired`` so that a seed missing from one side is visible.
    """
    keys = list(dict.fromkeys([*rows, "seed"]))
    cells_a, cells_b = aggregate(a, rows, metrics), aggregate(b, rows, metrics)
    done_a, done_b = (x[x["status"] == COMPLETED] for x in (a, b))
    merged = done_a.merge(done_b, on=keys, how="outer", suffixes=("__a", "__b"))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in dict.fromkeys([*cells_a, *cells_b]):
        out[label] = {}
        for metric in metrics:
            diffs, unpaired = [], 0
            part = merged[[row_key(tuple(r[k] for k in rows), rows) == label for _, r in merged.iterrows()]]
            for _, r in part.iterrows():
                va, vb = (pd.to_numeric(pd.Series([r.get(f"{metric}__{s}")]), errors="coerce").iloc[0]
                          for s in ("a", "b"))
                if pd.notna(va) and pd.notna(vb):
                    diffs.append(float(vb - va))
                else:
                    unpaired += 1
            diff = Cell(metric, diffs, expected=len(part))
            out[label][metric] = {"a": cells_a.get(label, {}).get(metric), "b": cells_b.get(label, {}).get(metric),
                                  "diff": diff, "unpaired": unpaired}
    return out
