"""Metric curves from ``metrics.jsonl``: per-arm tables by step and a figure (e.g. DINO Fig. 7)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import pandas as pd

from ssl_bench.tracking.layout import METRICS_FILE, ONLINE_KNN_PREFIX
from ssl_bench.tracking.records import read_jsonl_counted

DEFAULT_CURVES = ("collapse/teacher_entropy", "collapse/kl_teacher_student")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Lines of a JSONL file; a missing file or a torn line (a run still writing) is skipped."""
    return read_jsonl_counted(path)[0]


TORN_LINES = "torn_lines"  # DataFrame.attrs key of collect_curves: run id -> metrics.jsonl lines skipped


def collect_curves(expected: Iterable[dict[str, Any]], metrics: Sequence[str]) -> pd.DataFrame:
    """Long table: one row per (run, logged step) holding any of ``metrics``.

    ``attrs["torn_lines"]`` maps each run id with unparseable metrics.jsonl lines to their count.

    Args:
        expected: dicts with ``run_id``, ``run_dir``, ``seed`` and ``axes``, as for ``collect``.
        metrics: metric names as written in metrics.jsonl.
    """
    rows, torn_lines = [], {}
    for run in expected:
        records, torn = read_jsonl_counted(Path(run["run_dir"]) / METRICS_FILE)
        if torn:
            torn_lines[run["run_id"]] = torn
        for record in records:
            values = {m: record[m] for m in metrics if record.get(m) is not None}
            if values and record.get("step") is not None:
                rows.append({"run_id": run["run_id"], "seed": run["seed"], **run["axes"],
                             "step": int(record["step"]), **values})
    curves = pd.DataFrame(rows)
    curves.attrs[TORN_LINES] = torn_lines
    return curves


def torn_lines_note(curves: pd.DataFrame) -> str | None:
    """``metrics.jsonl: 2 torn line(s) skipped in 1 run`` from ``collect_curves``' attrs (None if none)."""
    torn = curves.attrs.get(TORN_LINES) or {}
    if not torn:
        return None
    from ssl_bench.report.collect import torn_text

    return torn_text(sum(torn.values()), len(torn))


ONLINE_KNN = ONLINE_KNN_PREFIX + "top1"  # the online k-NN key in metrics.jsonl


def with_knn_endpoints(curves: pd.DataFrame, runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Add each run's k-NN at init (step 0) and final k-NN (last training step) to the online k-NN curve.

    The online k-NN (``eval.knn_every_n_epochs``) is logged between epochs only; the randomly
    initialised backbone and the final evaluation, same protocol, are in result.json.

    Args:
        curves: long table from ``collect_curves``.
        runs: the study's rows from ``collect.collect`` (``knn_top1_init``, ``knn_top1``, ``timing.train_steps``).
        axes: the arm columns, copied onto the added rows.
    """
    done = runs[runs["status"] == "completed"] if "status" in runs else runs
    points = []
    for _, run in done.iterrows():
        base = {"run_id": run["run_id"], "seed": run["seed"], **{a: run[a] for a in axes}}
        if pd.notna(run.get("knn_top1_init")):
            points.append({**base, "step": 0, ONLINE_KNN: float(run["knn_top1_init"])})
        if pd.notna(run.get("knn_top1")) and pd.notna(run.get("timing.train_steps")):
            points.append({**base, "step": int(run["timing.train_steps"]), ONLINE_KNN: float(run["knn_top1"])})
    if not points:
        return curves
    added = pd.DataFrame(points)
    return pd.concat([curves, added], ignore_index=True).sort_values(["run_id", "step"], kind="stable")


def arm_label(row: pd.Series, axes: Sequence[str]) -> str:
    return ", ".join(str(row[a]) for a in axes)


def curve_table(curves: pd.DataFrame, axes: Sequence[str], metric: str, every: int = 50) -> pd.DataFrame:
    """Mean over seeds of ``metric`` at every ``every``-th step (and the last), one column per arm."""
    data = curves.dropna(subset=[metric]).copy()
    if data.empty:
        return pd.DataFrame()
    data["arm"] = data.apply(arm_label, axis=1, axes=axes)
    last = int(data["step"].max())
    keep = data[(data["step"] % max(every, 1) == 0) | (data["step"] == last)]
    table = keep.pivot_table(index="step", columns="arm", values=metric, aggfunc="mean", sort=False)
    arms = list(dict.fromkeys(data["arm"]))  # study order, not alphabetical
    return table[[a for a in arms if a in table.columns]].round(3)


def markdown_curves(curves: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str], every: int) -> str:
    parts = []
    for metric in metrics:
        if metric not in curves:
            parts.append(f"### {metric}\n\nno run logged `{metric}`")
            continue
        seeds = curves.dropna(subset=[metric]).groupby(list(axes))["seed"].nunique()
        note = f"mean over {seeds.min()}–{seeds.max()} seeds" if seeds.min() != seeds.max() else \
            f"mean over {seeds.min()} seed(s)"
        table = curve_table(curves, axes, metric, every)
        parts.append(f"### {metric} ({note})\n\n" + table.to_markdown())
    torn = torn_lines_note(curves)
    if torn:
        parts.append(f"- {torn}")
    return "\n\n".join(parts) + "\n"


def plot_curves(curves: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str], path: str | Path,
                title: str = "") -> None:
    """One panel per metric, one line per arm (mean over seeds, band = min..max), to one image file."""
    from ssl_bench.report.plots import make_figure

    fig = make_figure(curves, axes, metrics, title=title, band="range")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
