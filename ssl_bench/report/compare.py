"""Two result sets side by side with paired differences (same grid and seeds, e.g. two code versions)."""

from __future__ import annotations

import io
from typing import Sequence

import pandas as pd

from ssl_bench.report.aggregate import check_columns, metric_title, paired_differences
from ssl_bench.report.table import TableSpec, cell_text, latex, markdown, provenance, stat_text


def compare_rows(a: pd.DataFrame, b: pd.DataFrame, labels: Sequence[str], spec: TableSpec
                 ) -> tuple[list[str], list[list[str]]]:
    """Per row and metric: A, B and the mean ± spread of the paired B - A differences (with n pairs)."""
    pairs = paired_differences(a, b, spec.rows, spec.metrics)
    header = [*spec.rows]
    for metric in spec.metrics:
        title = metric_title(metric)
        header += [f"{title} {labels[0]}", f"{title} {labels[1]}", f"Δ {title} (B − A, paired)"]
    body = []
    for label, metrics in pairs.items():
        line = [*label.split(", ", len(spec.rows) - 1)]
        for metric in spec.metrics:
            entry = metrics[metric]
            for side in ("a", "b"):
                line.append("absent" if entry[side] is None else cell_text(entry[side], spec.ci, spec.digits))
            diff = entry["diff"]
            text = stat_text(diff, spec.ci, spec.digits)
            if text is not None:
                text = ("+" if diff.mean >= 0 else "") + text + f" (n={diff.n}"
                text += f", {entry['unpaired']} unpaired)" if entry["unpaired"] else ")"
            line.append(text or f"no pairs ({entry['unpaired']} unpaired)")
        body.append(line)
    return header, body


def diff_records(a: pd.DataFrame, b: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Tidy CSV form: one line per (row, metric) with A, B and paired-difference statistics."""
    lines = []
    for label, metrics in paired_differences(a, b, spec.rows, spec.metrics).items():
        for metric, entry in metrics.items():
            d = entry["diff"]
            lines.append({**dict(zip(spec.rows, label.split(", ", len(spec.rows) - 1))), "metric": metric,
                          "mean_a": entry["a"].mean if entry["a"] else None,
                          "mean_b": entry["b"].mean if entry["b"] else None,
                          "diff_mean": d.mean, "diff_std": d.std, "diff_ci95": d.ci95, "pairs": d.n,
                          "unpaired": entry["unpaired"]})
    return pd.DataFrame(lines)


def render_compare(a: pd.DataFrame, b: pd.DataFrame, labels: Sequence[str], spec: TableSpec, fmt: str = "md") -> str:
    """The comparison in md | tex | csv, with both sides' provenance in the footer."""
    check_columns(a, spec.rows, spec.metrics)
    check_columns(b, spec.rows, spec.metrics)
    footer = [f"A = {labels[0]}", *[f"A {line}" for line in provenance(a, labels[0])],
              f"B = {labels[1]}", *[f"B {line}" for line in provenance(b, labels[1])],
              "pairs: runs with the same row values and seed, completed on both sides; Δ = B − A"]
    if spec.command:
        footer.append(f"command: `{spec.command}`")
    if fmt == "csv":
        buf = io.StringIO()
        buf.write("".join(f"# {line}\n" for line in footer))
        diff_records(a, b, spec).to_csv(buf, index=False)
        return buf.getvalue()
    header, body = compare_rows(a, b, labels, spec)
    if fmt == "tex":
        return latex(header, body, len(spec.rows), footer)
    return markdown(header, body) + "\n\n" + "\n".join(f"- {line}" for line in footer) + "\n"
