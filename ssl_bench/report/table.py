"""Markdown result tables grouped by the study's axes, with provenance and missing runs listed."""

from __future__ import annotations

import json
from typing import Any, Sequence

import pandas as pd

COMPLETED = "completed"
DEFAULT_METRICS = (("knn_top1", "k-NN top-1 (%)"), ("knn_top1_init", "k-NN top-1 at init (%)"),
                   ("linear_top1", "linear top-1 (%)"))
# Collapse diagnostics at the last measured step (DINO Fig. 7), shown when the runs have them.
DIAGNOSTIC_METRICS = (("teacher_entropy_last", "teacher entropy (nats)"), ("kl_teacher_student_last", "KL(t‖s) (nats)"),
                      ("rankme_last", "RankMe"))


def mean_std(values: pd.Series, digits: int = 2) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    if values.empty:
        return "—"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def minutes(values: pd.Series) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()
    return "—" if values.empty else f"{values.mean() / 60:.1f}"


def collapsed(done: pd.DataFrame) -> str:
    """``n/m`` runs flagged collapsed, with the steps where it happened."""
    flags = done["collapse.collapsed"].fillna(False).astype(bool)
    steps = ", ".join(str(int(s)) for s in done.loc[flags, "collapse.collapse_step"].dropna())
    return f"{int(flags.sum())}/{len(done)}" + (f" (step {steps})" if steps else "")


def summary_table(df: pd.DataFrame, rows: Sequence[str],
                  metrics: Sequence[tuple[str, str]] = DEFAULT_METRICS) -> pd.DataFrame:
    """One line per combination of ``rows`` values: completed/expected runs, metric mean ± std, wall time.

    Metrics no run has (e.g. k-NN at init when it was switched off) are left out; collapse
    diagnostics and the collapse flag are added when the runs recorded them.
    """
    metrics = [(m, t) for m, t in metrics if m in df and df[m].notna().any()]
    metrics += [(m, t) for m, t in DIAGNOSTIC_METRICS if m in df and df[m].notna().any()]
    lines = []
    for key, group in df.groupby(list(rows), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        done = group[group["status"] == COMPLETED]
        line: dict[str, Any] = dict(zip(rows, key))
        line["runs"] = f"{len(done)}/{len(group)}"
        for metric, title in metrics:
            line[title] = mean_std(done[metric]) if metric in done else "—"
        if "collapse.collapsed" in done:
            line["collapsed"] = collapsed(done)
        line["wall time (min)"] = minutes(done["timing.wall_s"]) if "timing.wall_s" in done else "—"
        lines.append(line)
    return pd.DataFrame(lines)


def incomplete_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that are not completed (missing, running, failed), so none is silently dropped."""
    bad = df[df["status"] != COMPLETED]
    cols = [c for c in ("run_id", "method", "seed", "status", "error") if c in bad]
    return bad[cols]


def provenance(df: pd.DataFrame, study: str) -> list[str]:
    """Footer lines: study, runs, git shas with dirty flags, evaluation protocol."""
    done = df[df["status"] == COMPLETED]
    shas = sorted({f"{s[:10]}{' (dirty)' if d is True else ''}" if isinstance(s, str) else "unknown (not a git checkout)"
                   for s, d in zip(done["git_sha"], done["git_dirty"])})
    protocols = sorted({p for p in done["protocol"].dropna()})
    lines = [f"study `{study}`: {len(done)} of {len(df)} runs completed",
             f"code: git {', '.join(shas) if shas else 'unknown'}"]
    for p in protocols:
        lines += protocol_lines(json.loads(p) or {})
    return list(dict.fromkeys(lines))  # runs of one study share protocols: say each once


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """One footer line per evaluation protocol recorded with the numbers."""
    lines = []
    knn = protocol.get("knn")
    if knn:
        lines.append(f"k-NN protocol: k={knn['k']}, T={knn['temperature']}, {knn['features']}; "
                     f"bank = {knn['bank']}; test = {knn['test']}")
    lin = protocol.get("linear")
    if lin:
        lines.append(f"linear protocol: {lin.get('heads', '?')} heads ({len(lin.get('lrs', []))} lrs x n_last_blocks "
                     f"{lin.get('n_last_blocks')} x avgpool {lin.get('avgpool')}), {lin.get('epochs')} epochs, "
                     f"SGD momentum {lin.get('momentum')}, wd {lin.get('weight_decay')}, "
                     f"{'RandomResizedCrop + flip' if lin.get('augment') else 'precomputed features (no augmentation)'}; "
                     f"head chosen on {lin.get('selection', 'a held-out split')}")
    return lines


def markdown_report(df: pd.DataFrame, study: str, rows: Sequence[str]) -> str:
    """The table, the list of incomplete runs and the provenance footer, as Markdown."""
    parts = [summary_table(df, rows).to_markdown(index=False, disable_numparse=True)]
    bad = incomplete_runs(df)
    if not bad.empty:
        parts.append("Runs not in the table (not completed):\n\n" + bad.to_markdown(index=False, disable_numparse=True))
    parts.append("\n".join(f"- {line}" for line in provenance(df, study)))
    return "\n\n".join(parts) + "\n"
