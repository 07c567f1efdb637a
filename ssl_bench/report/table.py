"""Result tables from collected runs: Markdown, LaTeX (booktabs) and CSV, each with a provenance footer."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

import pandas as pd

from ssl_bench.report.aggregate import (COMPLETED, NOT_COUNTED, Cell, aggregate, best_rows, check_columns,
                                        metric_title)
from ssl_bench.report.collect import torn_text
from ssl_bench.report.references import Reference, check_reference

DEFAULT_METRICS = ("knn_top1", "knn_top1_init", "linear_top1")
# Collapse diagnostics at the last measured step (DINO Fig. 7), shown by default when the runs have them.
DIAGNOSTIC_METRICS = ("teacher_entropy_last", "kl_teacher_student_last", "rankme_last")
FORMATS = ("md", "tex", "csv")


@dataclass
class TableSpec:
    """What a table shows: row axes, metric columns, the spread statistic, an optional reference."""

    rows: Sequence[str]
    metrics: Sequence[str]
    ci: bool = False  # spread = 95% t confidence half-width instead of the sample std
    reference: Reference | None = None
    digits: int = 2
    command: str = ""  # the command line that produced the table, for the footer


def default_metrics(df: pd.DataFrame) -> list[str]:
    """The accuracy metrics and collapse diagnostics that at least one run recorded."""
    return [m for m in (*DEFAULT_METRICS, *DIAGNOSTIC_METRICS) if m in df and df[m].notna().any()]


def stat_text(cell: Cell, ci: bool, digits: int) -> str | None:
    """``mean ± spread`` (``mean`` alone for one value), or None without values."""
    if cell.mean is None:
        return None
    spread = cell.ci95 if ci else cell.std
    return f"{cell.mean:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def notes(cell: Cell) -> str:
    """Runs kept out of the statistics, and collapsed runs kept in, e.g.
    ``n=2 of 3: 1 failed; 2 collapsed; stopped at step 40, 60`` (train.stop_on_collapse ended those two)."""
    parts = []
    if cell.n < cell.expected:
        reasons = [f"{c} {s}" for s, c in cell.not_counted.items() if c]
        reasons += [f"{cell.no_value} without this metric"] if cell.no_value else []
        parts.append(f"n={cell.n} of {cell.expected}" + (f": {', '.join(reasons)}" if reasons else ""))
    if cell.collapsed:
        parts.append(f"{cell.collapsed} collapsed")
    if cell.stopped_at:
        parts.append("stopped at step " + ", ".join(str(s) for s in cell.stopped_at))
    return "; ".join(parts)


def cell_text(cell: Cell, ci: bool, digits: int) -> str:
    stat, extra = stat_text(cell, ci, digits), notes(cell)
    if stat is None:
        states = [f"{c} {s}" for s, c in cell.not_counted.items() if c]
        return ", ".join(states) if states else ("not recorded" if cell.no_value else "—")
    return f"{stat} ({extra})" if extra else stat


def runs_text(cells: dict[str, Cell]) -> str:
    """``completed/expected`` runs of a row."""
    any_cell = next(iter(cells.values()), None)
    if any_cell is None:
        return "—"
    counted = sum(any_cell.not_counted.values())
    return f"{any_cell.expected - counted}/{any_cell.expected}"


def cells(df: pd.DataFrame, spec: TableSpec) -> dict[str, dict[str, Cell]]:
    """The table's cells (``aggregate``), with the reference value set where the reference has one."""
    table = aggregate(df, spec.rows, spec.metrics)
    if spec.reference is not None:
        for label, row in table.items():
            for metric, cell in row.items():
                cell.reference = spec.reference.value(label, metric)
    return table


def table_rows(table: dict[str, dict[str, Cell]], spec: TableSpec, bold: tuple[str, str]
               ) -> tuple[list[str], list[list[str]]]:
    """Header and body cells of ``cells()``; ``bold`` = (open, close) markup for the best mean per column."""
    ref = spec.reference
    header = [*spec.rows, "runs"]
    for metric in spec.metrics:
        header.append(metric_title(metric))
        if ref is not None and metric in ref.metrics():
            header += [f"{metric_title(metric)} ref.", f"Δ {metric_title(metric)}"]
    best = {m: best_rows(table, m) for m in spec.metrics}
    body = []
    for label, row in table.items():
        line = [*label.split(", ", len(spec.rows) - 1), runs_text(row)]
        for metric in spec.metrics:
            cell = row[metric]
            text = cell_text(cell, spec.ci, spec.digits)
            stat = stat_text(cell, spec.ci, spec.digits)
            if label in best[metric] and stat is not None:
                text = text.replace(stat, f"{bold[0]}{stat}{bold[1]}", 1)
            line.append(text)
            if ref is not None and metric in ref.metrics():
                line += ["—" if cell.reference is None else f"{cell.reference:.{spec.digits}f}",
                         "—" if cell.delta is None else f"{cell.delta:+.{spec.digits}f}"]
        body.append(line)
    return header, body


def provenance(df: pd.DataFrame, study: str, spec: TableSpec | None = None) -> list[str]:
    """Footer lines: study and run states, statistic, code (git sha, dirty), data, hardware, protocol, reference."""
    done = df[df["status"] == COMPLETED]
    states = df["status"].value_counts().to_dict()
    order = [s for s in (COMPLETED, *NOT_COUNTED) if s in states] + [s for s in states if s not in NOT_COUNTED
                                                                     and s != COMPLETED]
    lines = [f"study `{study}`: {len(df)} runs, " + ", ".join(f"{states[s]} {s}" for s in order)]
    if spec is not None:
        spread = "95% confidence half-width (Student t)" if spec.ci else "sample std (ddof=1)"
        lines.append(f"cells: mean ± {spread} over the completed runs (seeds) of a row; n is given when some "
                     f"runs have no value; bold = best mean where higher/lower is better")
    lines.append(f"code: git {', '.join(code_versions(done)) or 'unknown'}")
    lines += setup_lines(done)
    saved = compute_saved_text(done)
    if saved:
        lines.append(saved)
    torn = torn_lines_text(df)
    if torn:
        lines.append(torn)
    protocols: list[str] = []
    for p in sorted({p for p in done["protocol"].dropna()}):
        protocols += protocol_lines(json.loads(p) or {})
    lines += merge_seeds(protocols)
    if spec is not None and spec.reference is not None:
        ref = spec.reference
        lines.append(f"reference: {ref.title} ({ref.source}; {ref.path})" + (f"; {ref.note}" if ref.note else ""))
    if spec is not None and spec.command:
        lines.append(f"command: `{spec.command}`")
    return list(dict.fromkeys(lines))  # runs of one study share protocols: say each once


def compute_saved_text(done: pd.DataFrame) -> str | None:
    """``train.stop_on_collapse stopped 2 of 9 runs early: 0.031 device-hours not spent`` (None if none stopped).

    Each stopped run records ``timing.device_hours_saved``: its remaining planned steps at its own measured
    seconds per step, times its devices.
    """
    if "collapse.stopped_early" not in done or not done["collapse.stopped_early"].notna().any():
        return None
    stopped = done[done["collapse.stopped_early"].notna()]
    hours = pd.to_numeric(stopped.get("timing.device_hours_saved", pd.Series(dtype=float)), errors="coerce")
    device = "GPU" if any(isinstance(h, str) and "x " in h for h in stopped["hardware"]) else "device"
    text = f"train.stop_on_collapse stopped {len(stopped)} of {len(done)} completed runs early"
    if hours.notna().any():
        text += (f": {hours.sum():.3g} {device}-hours not spent"
                 f" ({hours.sum() * 60:.3g} min{'' if hours.notna().all() else '; some runs did not record it'})")
    return text


def code_versions(done: pd.DataFrame) -> list[str]:
    """Distinct ``<sha> (dirty)`` of the runs; an unreadable env.json says so, never "not a git checkout"."""
    errors = done["env_error"] if "env_error" in done else [None] * len(done)
    labels = set()
    for sha, dirty, error in zip(done["git_sha"], done["git_dirty"], errors):
        if isinstance(error, str):
            labels.add(error)
        elif isinstance(sha, str):
            labels.add(f"{sha[:10]}{' (dirty)' if dirty is True else ''}")
        else:
            labels.add("unknown (not a git checkout)")
    return sorted(labels)


def torn_lines_text(df: pd.DataFrame) -> str | None:
    """``metrics.jsonl: 2 torn line(s) skipped in 1 run`` (None when every line parsed or nobody counted)."""
    if "metrics_torn_lines" not in df:
        return None
    torn = pd.to_numeric(df["metrics_torn_lines"], errors="coerce").fillna(0)
    runs = int((torn > 0).sum())
    if not runs:
        return None
    return torn_text(int(torn.sum()), runs)


def _values(done: pd.DataFrame, column: str) -> str:
    if column not in done:
        return "?"
    values = [v for v in dict.fromkeys(done[column].tolist()) if v is not None and not pd.isna(v)]
    return ", ".join(str(int(v) if isinstance(v, float) and v.is_integer() else v) for v in values) or "?"


def setup_lines(done: pd.DataFrame) -> list[str]:
    """Data, model, length and hardware of the completed runs (every distinct value, so mixes show)."""
    if done.empty:
        return []
    subset = _values(done, "config.data.subset")
    data = _values(done, "config.data.name") + ("" if subset == "?" else f" (training subset {subset})")
    steps = _values(done, "timing.train_steps")
    accumulate = _values(done, "config.optim.accumulate_grad_batches")  # "?" for records from before the key
    batch = _values(done, "config.data.batch_size") + ("" if accumulate in ("?", "1") else
                                                        f" x {accumulate} accumulated micro-batches")
    lines = [f"data: {data}; backbone {_values(done, 'config.backbone.name')}; epochs {_values(done, 'config.optim.epochs')}"
             f"; batch {batch}" + (f"; steps {steps}" if steps != "?" else "")]
    lines.append(f"hardware: {_values(done, 'hardware')}; world size {_values(done, 'world_size')}; "
                 f"torch {_values(done, 'torch_version')}")
    return lines


_SEED = re.compile(r"\(seed (\d+)\)")


def merge_seeds(lines: list[str]) -> list[str]:
    """Protocol lines that differ only in their subset seeds, said once: ``(seed 0)``... -> ``(seeds 0, 1, 2)``."""
    groups: dict[str, list[str]] = {}
    for line in lines:
        groups.setdefault(_SEED.sub("(seed #)", line), []).append(line)
    out = []
    for template, members in groups.items():
        seeds = sorted({int(x) for line in members for x in _SEED.findall(line)})
        if len(members) < 2 or len(seeds) < 2:
            out += list(dict.fromkeys(members))
            continue
        out.append(template.replace("(seed #)", f"(seeds {', '.join(map(str, seeds))})"))
    return out


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


def incomplete_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Runs that are not completed (missing, running, failed), so none is silently dropped."""
    bad = df[df["status"] != COMPLETED]
    cols = [c for c in ("run_id", "method", "seed", "status", "error") if c in bad]
    return bad[cols]


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(":---" if i < 1 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "‖": r"$\|$",
        "Δ": r"$\Delta$", "—": "---", "–": "--", "×": r"$\times$", "≥": r"$\geq$", "≤": r"$\leq$"}


def tex_escape(text: str) -> str:
    """Text safe inside a LaTeX tabular cell: special characters escaped, ±/‖/Δ as math."""
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def latex(header: list[str], body: list[list[str]], n_rows: int, comments: list[str]) -> str:
    """A booktabs ``tabular`` for ``\\input{}``, provenance as ``%`` comments above it."""
    align = "l" * n_rows + "r" * (len(header) - n_rows)
    out = [f"% {line}" for line in comments]
    out += [f"\\begin{{tabular}}{{{align}}}", "\\toprule", " & ".join(tex_escape(h) for h in header) + r" \\",
            "\\midrule"]
    for row in body:
        cells = []
        for c in row:
            if "\x00" in c:  # bold markers from table_rows
                pre, rest = c.split("\x00", 1)
                mid, post = rest.split("\x01", 1)
                cells.append(f"{tex_escape(pre)}\\textbf{{{tex_escape(mid)}}}{tex_escape(post)}")
            else:
                cells.append(tex_escape(c))
        out.append(" & ".join(cells) + r" \\")
    out += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(out) + "\n"


def tidy(table: dict[str, dict[str, Cell]], spec: TableSpec) -> pd.DataFrame:
    """One line per (row, metric) with numeric mean, std, n, ci95, run-state counts, reference and delta."""
    lines = []
    for label, row in table.items():
        for cell in row.values():
            lines.append({**dict(zip(spec.rows, label.split(", ", len(spec.rows) - 1))), **cell.record()})
    return pd.DataFrame(lines)


def render(df: pd.DataFrame, study: str, spec: TableSpec, fmt: str = "md") -> str:
    """The table in ``fmt`` (md | tex | csv) with its provenance footer; errors name bad rows/cols."""
    check_columns(df, spec.rows, spec.metrics)
    table = cells(df, spec)
    unused = check_reference(spec.reference, list(table), spec.metrics) if spec.reference is not None else []
    footer = provenance(df, study, spec)
    if unused:
        footer.append(f"reference rows not in this study: {', '.join(unused)}")
    if fmt == "csv":
        buf = io.StringIO()
        buf.write("".join(f"# {line}\n" for line in footer))
        tidy(table, spec).to_csv(buf, index=False)
        return buf.getvalue()
    if fmt == "tex":
        header, body = table_rows(table, spec, ("\x00", "\x01"))
        return latex(header, body, len(spec.rows), footer)
    if fmt != "md":
        from ssl_bench.config import ConfigError

        raise ConfigError(f"--format {fmt!r}: valid formats are {', '.join(FORMATS)}")
    header, body = table_rows(table, spec, ("**", "**"))
    parts = [markdown(header, body)]
    bad = incomplete_runs(df)
    if not bad.empty:
        parts.append("Runs not in the statistics (not completed):\n\n"
                     + bad.to_markdown(index=False, disable_numparse=True))
    parts.append("\n".join(f"- {line}" for line in footer))
    return "\n\n".join(parts) + "\n"
