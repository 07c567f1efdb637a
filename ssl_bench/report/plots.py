"""Study figures: collapse curves (DINO Fig. 7), online k-NN accuracy and loss over training steps.

Caron et al. 2021 (DINO), Sec. 5.3 and Fig. 7, plot the teacher's target entropy and
KL(teacher || student) over training for each ablation; ``FIGURES["collapse"]`` is that figure,
with seeds drawn as a band. Input is the long table of ``curves.collect_curves``. Every method
keeps one colour in every figure of every study (``method_colour``), so figures can be compared
side by side. Files are written reproducibly (no PDF creation date, fixed dpi) so they can live in git.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 150
BANDS = ("std", "range")
HLines = Mapping[str, Sequence[tuple[float, str]]]

# Names as in ssl_bench.methods (not imported: it pulls in torch). A family shares a hue, its
# ablations take neighbouring shades, so "dino_no_centering" reads as a variant of "dino".
METHOD_COLOURS = {
    "dino": "#1f77b4",
    "dino_no_centering": "#d62728",
    "dino_no_sharpening": "#ff7f0e",
    "dino_no_centering_no_sharpening": "#8c564b",
    "dino_sinkhorn": "#17becf",
    "dino_no_multicrop": "#9467bd",
    "dino_no_momentum": "#e377c2",
    "dinov2": "#2ca02c",
    "dinov2_no_koleo": "#98df8a",
    "dinov2_no_ibot": "#bcbd22",
    "dinov2_no_sinkhorn": "#006d2c",
    "ibot": "#7f7f7f",
}
# Unknown names: sha256 of the name picks one of these (stable across processes, unlike hash()).
# Dark and muted tones (matplotlib's tab20b) that none of the fixed colours above is close to.
FALLBACK_PALETTE = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
                    "#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194")
SPARSE_POINTS = 12  # curves with this many points or fewer get markers
LINE_STYLES = ("-", "--", ":", "-.")


class FigureSpec(NamedTuple):
    """One figure: a panel per metric, with its y-axis label."""

    metrics: tuple[str, ...]
    title: str
    ylabels: tuple[str, ...]


FIGURES: dict[str, FigureSpec] = {
    "collapse": FigureSpec(("collapse/teacher_entropy", "collapse/kl_teacher_student"),
                           "Collapse diagnostics (DINO Fig. 7)",
                           ("teacher entropy (nats)", "KL(teacher || student) (nats)")),
    "knn": FigureSpec(("knn/top1",), "k-NN over training", ("k-NN top-1 (%)",)),
    "loss": FigureSpec(("train/loss",), "Training loss", ("train loss",)),
    "rank": FigureSpec(("collapse/rankme", "collapse/feature_std"), "Embedding spread (RankMe, feature std)",
                       ("RankMe", "feature std (L2-normalised)")),
}
YLABELS = {m: y for spec in FIGURES.values() for m, y in zip(spec.metrics, spec.ylabels)}


class StudyFigures(dict):
    """``plot_study``'s answer: figure name -> written paths ([] when skipped); ``skipped``: name -> why."""

    def __init__(self) -> None:
        super().__init__()
        self.skipped: dict[str, str] = {}


def method_colour(name: str) -> str:
    """Fixed hex colour of a registered method; any other name gets a palette colour from its sha256."""
    if name in METHOD_COLOURS:
        return METHOD_COLOURS[name]
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return FALLBACK_PALETTE[int.from_bytes(digest[:4], "big") % len(FALLBACK_PALETTE)]


def method_of_label(label: str) -> str:
    """The longest known method name inside an arm label ("dinov2_no_ibot, 0.1" -> "dinov2_no_ibot").

    Without one, the label's first comma-separated field stands for the method.
    """
    known = [m for m in METHOD_COLOURS if m in label]
    return max(known, key=len) if known else label.split(",")[0].strip()


def _shade(colour: str, amount: float) -> str:
    """``colour`` mixed with white by ``amount`` in [0, 1)."""
    return to_hex(tuple(c + (1.0 - c) * amount for c in to_rgb(colour)))


def arm_colours(arms: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, dict[str, str]]:
    """Matplotlib line kwargs (``color``, ``linestyle``) per arm label.

    An arm takes its method's colour. When several arms share a method (another axis varies), the
    k-th of them, in the order given, gets line style ``LINE_STYLES[k % 4]``, and every further round
    of four is drawn a shade lighter, so the first arm of a method is always its plain solid line.

    Args:
        arms: arm labels in study order.
        methods: the method of each arm (same order); by default read from the label (``method_of_label``).
    """
    methods = list(methods) if methods is not None else [method_of_label(a) for a in arms]
    seen: dict[str, int] = {}
    styles = {}
    for arm, method in zip(arms, methods):
        k = seen.get(method, 0)
        seen[method] = k + 1
        shade = min(0.6, 0.25 * (k // len(LINE_STYLES)))
        styles[arm] = {"color": _shade(method_colour(method), shade), "linestyle": LINE_STYLES[k % len(LINE_STYLES)]}
    return styles


def _with_arms(curves: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """``curves`` with an ``arm`` column: the axis values joined as ``curves.arm_label`` does."""
    data = curves.copy()
    data["arm"] = data[list(axes)].astype(str).agg(", ".join, axis=1) if axes and len(data) else ""
    return data


def _arm_styles(data: pd.DataFrame) -> dict[str, dict[str, str]]:
    """Styles from every arm in the study, so an arm looks the same in each of its figures."""
    first = data.drop_duplicates("arm")
    methods = [str(m) for m in first["method"]] if "method" in first else None
    return arm_colours(list(first["arm"]), methods)


def _finite(data: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows with a finite ``metric``: non-finite values are logged as strings ("nan", "inf") and cannot be drawn."""
    if metric not in data:
        return data.iloc[0:0]
    out = data.assign(**{metric: pd.to_numeric(data[metric], errors="coerce")})
    return out[out[metric].abs() < math.inf]


def band_stats(curves: pd.DataFrame, axes: Sequence[str], metric: str, band: str = "std") -> dict[str, pd.DataFrame]:
    """Per arm, indexed by step: ``mean`` over seeds, ``low``/``high`` band edges, ``n`` seeds present.

    A step redone after a resume keeps the run's last value. A step that only some seeds logged
    uses those. ``band="std"`` gives mean -/+ sample std (0 with one seed); ``"range"`` gives min..max.

    Args:
        curves: long table from ``collect_curves`` (run_id, seed, axis columns, step, metrics).
        axes: the columns naming an arm.
        metric: the column to summarise.
        band: "std" or "range".
    """
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS}, not {band!r}")
    data = _finite(_with_arms(curves, axes), metric)
    out = {}
    for arm, group in data.groupby("arm", sort=False):
        per_run = group.groupby(["run_id", "step"], sort=False)[metric].last()
        stats = per_run.groupby(level="step").agg(["mean", "std", "min", "max", "count"]).sort_index()
        if band == "std":
            spread = stats["std"].fillna(0.0)
            low, high = stats["mean"] - spread, stats["mean"] + spread
        else:
            low, high = stats["min"], stats["max"]
        out[arm] = pd.DataFrame({"mean": stats["mean"], "low": low, "high": high, "n": stats["count"]})
    return out


def _seed_counts(data: pd.DataFrame, metric: str) -> dict[str, int]:
    unit = "seed" if "seed" in data else "run_id"
    return _finite(data, metric).groupby("arm", sort=False)[unit].nunique().to_dict()


def _draw_hlines(ax, lines: Sequence[tuple[float, str]]) -> None:
    """Reference levels (e.g. log K, the entropy of uniform targets), labelled at the right edge."""
    for y, text in lines:
        ax.axhline(y, color="0.35", linestyle=(0, (1, 3)), linewidth=1.0, zorder=1)
        ax.text(0.99, y, text, transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7, color="0.25")


def make_figure(curves: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str], title: str = "",
                band: str = "std", hlines: HLines | None = None,
                ylabels: Sequence[str] | None = None) -> Figure:
    """The figure of ``plot_figure``, not saved: one panel per metric, one line and band per arm.

    Args: as for ``plot_figure``.
    """
    data = _with_arms(curves, axes)
    styles = _arm_styles(data)
    ylabels = list(ylabels) if ylabels is not None else [YLABELS.get(m, m) for m in metrics]
    fig = Figure(figsize=(5.0 * len(metrics), 3.8))
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric, ylabel in zip(panels, metrics, ylabels):
        seeds = _seed_counts(data, metric)
        for arm, stats in band_stats(curves, axes, metric, band).items():
            style = styles[arm]
            marker = "o" if len(stats) <= SPARSE_POINTS else None  # a few evaluations: show where they are
            ax.plot(stats.index, stats["mean"], label=f"{arm} (n={seeds[arm]})", linewidth=1.5, marker=marker,
                    markersize=4, **style)
            ax.fill_between(stats.index, stats["low"], stats["high"], color=style["color"], alpha=0.2, linewidth=0)
        _draw_hlines(ax, (hlines or {}).get(metric, ()))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
        if not seeds:  # plot_study never asks for this; a direct call says so instead of a blank panel
            ax.text(0.5, 0.5, f"no run logged {metric}", transform=ax.transAxes, ha="center", color="0.4")
            continue
        ax.legend(fontsize=7, title=f"band: {'mean ± std' if band == 'std' else 'min..max'} over seeds",
                  title_fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path_stem: Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.pdf``, without timestamps so unchanged figures stay unchanged in git."""
    path_stem = Path(path_stem)
    path_stem.parent.mkdir(parents=True, exist_ok=True)
    png, pdf = path_stem.with_name(path_stem.name + ".png"), path_stem.with_name(path_stem.name + ".pdf")
    fig.savefig(png, dpi=DPI, metadata={"Software": None})
    fig.savefig(pdf, metadata={"CreationDate": None, "Producer": None, "Creator": None})
    return [png, pdf]


def plot_figure(curves: pd.DataFrame, axes: Sequence[str], metrics: Sequence[str], path_stem: Path,
                title: str = "", band: str = "std", hlines: HLines | None = None,
                ylabels: Sequence[str] | None = None) -> list[Path]:
    """Write ``<path_stem>.png`` and ``.pdf``: per metric a panel, per arm the seed mean and a band.

    Args:
        curves: long table from ``collect_curves`` (run_id, seed, axis columns, step, metrics).
        axes: the columns naming an arm (e.g. ``["method"]``); a ``method`` column sets the colours.
        metrics: one panel each, left to right.
        path_stem: output path without suffix.
        title: figure title.
        band: "std" (mean -/+ std over seeds) or "range" (min..max over seeds).
        hlines: metric -> [(y, label)] reference lines, e.g. ``entropy_hlines(K)``.
        ylabels: y-axis label per metric; defaults from ``FIGURES``, else the metric name.
    """
    fig = make_figure(curves, axes, metrics, title, band, hlines, ylabels)
    return save_figure(fig, path_stem)


def entropy_hlines(out_dim: int) -> dict[str, list[tuple[float, str]]]:
    """Reference for the collapse figure: log K, the teacher entropy of uniform targets (no sharpening)."""
    return {"collapse/teacher_entropy": [(math.log(out_dim), f"log K = {math.log(out_dim):.2f} (uniform, K={out_dim})")]}


def logged_metrics(curves: pd.DataFrame, metrics: Sequence[str]) -> list[str]:
    """Those of ``metrics`` that some run logged with a finite value."""
    return [m for m in metrics if not _finite(curves, m).empty]


def plot_study(curves: pd.DataFrame, axes: Sequence[str], out_dir: Path, study: str,
               figures: Sequence[str] = ("collapse", "knn", "loss"), hlines: HLines | None = None,
               band: str = "std") -> StudyFigures:
    """Write ``<out_dir>/<study>_<figure>.{png,pdf}`` for each of ``figures`` that has data.

    A figure draws the panels of its metrics that some run logged; one with none is not written
    and appears as ``[]`` with its reason in ``result.skipped``.

    Args:
        curves: long table from ``collect_curves`` holding the metrics of the figures.
        axes: the columns naming an arm.
        out_dir: destination folder (created).
        study: study name, for file names and titles.
        figures: names in ``FIGURES``.
        hlines: metric -> [(y, label)] reference lines.
        band: "std" or "range".
    """
    unknown = [f for f in figures if f not in FIGURES]
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; known: {sorted(FIGURES)}")
    result = StudyFigures()
    for name in figures:
        spec = FIGURES[name]
        present = logged_metrics(curves, spec.metrics)
        if not present:
            result[name] = []
            result.skipped[name] = f"no run logged {', '.join(spec.metrics)}"
            log.info("figure %s skipped: %s", name, result.skipped[name])
            continue
        ylabels = [y for m, y in zip(spec.metrics, spec.ylabels) if m in present]
        result[name] = plot_figure(curves, axes, present, Path(out_dir) / f"{study}_{name}",
                                   f"{study}: {spec.title}", band, hlines, ylabels)
    return result
