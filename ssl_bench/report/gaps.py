"""Does one arm of a study beat each other arm by more than k pooled seed stds? (``ssl-bench results gaps``)

Issue 20 asks that DINO's k-NN be above each collapsed arm "by more than twice the pooled seed std".
This module computes that criterion from the run records instead of by hand:

- the gap is the baseline row's mean minus the other row's mean, over completed runs, signed so that a
  positive gap means the baseline is better (for a lower-is-better metric: the other mean minus the
  baseline's);
- the per-seed gaps pair the runs of the two rows by seed (runs completed on both sides);
- the pooled std of a set of rows is ``sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))`` over their sample stds
  (ddof=1); with the same number of seeds in each row it is the root of the mean of the variances;
- the criterion is met when the gap exceeds ``times`` x the pooled std of the two rows. The pooled std of
  all rows is shown beside it, as a second reading.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd

from ssl_bench.report.aggregate import COMPLETED, Cell, aggregate, check_columns, direction, metric_title, row_key
from ssl_bench.report.table import latex, markdown, notes, provenance


def pooled_std(cells: Sequence[Cell]) -> float | None:
    """``sqrt(sum((n_i - 1) s_i^2) / sum(n_i - 1))`` over the cells with at least two values; None if none has."""
    dof = sum(c.n - 1 for c in cells if c.n >= 2)
    if not dof:
        return None
    return math.sqrt(sum((c.n - 1) * c.std ** 2 for c in cells if c.n >= 2) / dof)


@dataclass
class Gap:
    """The baseline row against one other row, for one metric."""

    label: str
    baseline: Cell
    other: Cell
    sign: int  # +1: higher is better; -1: lower is better
    times: float
    per_seed: list[tuple[object, float]] = field(default_factory=list)  # (seed, signed baseline-vs-row gap)
    pooled_all: float | None = None

    @property
    def gap(self) -> float | None:
        if self.baseline.mean is None or self.other.mean is None:
            return None
        return self.sign * (self.baseline.mean - self.other.mean)

    @property
    def pooled(self) -> float | None:
        return pooled_std([self.baseline, self.other])

    def met(self, pooled: float | None) -> bool | None:
        """gap > times x pooled std; None when the gap or the std cannot be computed."""
        if self.gap is None or pooled is None:
            return None
        return self.gap > self.times * pooled


def gaps(df: pd.DataFrame, rows: Sequence[str], metric: str, baseline: str, times: float = 2.0) -> list[Gap]:
    """The baseline row against every other row of the study, in study order."""
    from ssl_bench.config import ConfigError

    check_columns(df, rows, [metric])
    sign = direction(metric)
    if not sign:
        raise ConfigError(f"--metric {metric!r} has no better direction (a collapse diagnostic?): a gap needs "
                          f"an accuracy (knn_top1, linear_top1, ...), a loss or a time")
    if not times > 0:
        raise ConfigError(f"--times {times}: must be positive")
    table = aggregate(df, rows, [metric])
    if baseline not in table:
        raise ConfigError(f"--baseline {baseline!r} is not a row of this study (rows by {', '.join(rows)}); "
                          f"valid: {', '.join(table)}")
    done = df[df["status"] == COMPLETED].copy()
    done["_row"] = [row_key(tuple(r[k] for k in rows), rows) for _, r in done.iterrows()]
    done["_value"] = pd.to_numeric(done[metric], errors="coerce") if metric in done else float("nan")
    by_seed = {label: {s: float(v) for s, v in zip(part["seed"], part["_value"]) if pd.notna(v)}
               for label, part in done.groupby("_row", sort=False)}
    pooled_all = pooled_std([cells[metric] for cells in table.values()])
    out = []
    base_seeds = by_seed.get(baseline, {})
    for label, cells in table.items():
        if label == baseline:
            continue
        other_seeds = by_seed.get(label, {})
        paired = [(s, sign * (base_seeds[s] - other_seeds[s])) for s in base_seeds if s in other_seeds]
        out.append(Gap(label, table[baseline][metric], cells[metric], sign, times, paired, pooled_all))
    return out


def _num(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:.{digits}f}".replace("-", "−")


def _met(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "**no**")


def _row_state(cell: Cell) -> str:
    """``completed/expected`` runs, then the table's cell notes (runs kept out, collapsed, stop steps)."""
    extra = notes(cell)
    return f"{cell.n}/{cell.expected}" + (f"; {extra}" if extra else "")


def render_gaps(df: pd.DataFrame, study: str, rows: Sequence[str], metric: str, baseline: str, times: float = 2.0,
                fmt: str = "md", digits: int = 2, command: str = "") -> str:
    """The gap table in md | tex | csv, with the runs' provenance in the footer."""
    result = gaps(df, rows, metric, baseline, times)
    title = metric_title(metric)
    k = f"{times:g}"
    footer = provenance(df, study)
    footer += [f"metric: {title}; gap = mean of `{baseline}` minus mean of the row"
               + (" (reversed: lower is better)" if result and result[0].sign < 0 else "")
               + "; per seed: the same, for runs of one seed completed in both rows",
               f"pooled std = sqrt(Σ(n_i − 1)·s_i² / Σ(n_i − 1)) over sample stds (ddof=1), of `{baseline}` and the "
               f"row, or of all {len(result) + 1} rows; met = gap > {k} × pooled std"]
    if command:
        footer.append(f"command: `{command}`")
    if fmt == "csv":
        records = [{"baseline": baseline, "row": g.label, "metric": metric, "baseline_mean": g.baseline.mean,
                    "row_mean": g.other.mean, "gap": g.gap,
                    "per_seed": " ".join(f"{s}:{v:.6g}" for s, v in g.per_seed),
                    "pooled_std": g.pooled, "threshold": None if g.pooled is None else times * g.pooled,
                    "met": g.met(g.pooled), "pooled_std_all": g.pooled_all,
                    "met_all": g.met(g.pooled_all), "row_runs": g.other.n, "row_collapsed": g.other.collapsed,
                    "row_stopped_at": " ".join(str(s) for s in g.other.stopped_at)} for g in result]
        buf = io.StringIO()
        buf.write("".join(f"# {line}\n" for line in footer))
        pd.DataFrame(records).to_csv(buf, index=False)
        return buf.getvalue()
    header = [f"{baseline} minus", f"{title}: row", "gap", "per seed", f"{k} × pooled std", "met?",
              f"{k} × pooled std (all rows)", "met? (all rows)", "row runs"]
    body = [[g.label, _num(g.other.mean, digits), _num(g.gap, digits),
             ", ".join(f"{s}: {_num(v, digits)}" for s, v in g.per_seed) or "no pairs",
             _num(None if g.pooled is None else times * g.pooled, digits), _met(g.met(g.pooled)),
             _num(None if g.pooled_all is None else times * g.pooled_all, digits), _met(g.met(g.pooled_all)),
             _row_state(g.other)] for g in result]
    base = result[0].baseline if result else aggregate(df, rows, [metric])[baseline][metric]
    lead = f"`{baseline}`: {_num(base.mean, digits)} ± {_num(base.std, digits)} ({_row_state(base)})"
    if fmt == "tex":
        return latex(header, [[c.replace("**", "") for c in row] for row in body], 1, [lead, *footer])
    return lead + "\n\n" + markdown(header, body) + "\n\n" + "\n".join(f"- {line}" for line in footer) + "\n"
