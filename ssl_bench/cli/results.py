"""``ssl-bench results collect|table|plot|compare|gaps|curves``: run records -> DataFrame -> tables and figures."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import pandas as pd

from ssl_bench import config as config_lib
from ssl_bench.report.curves import DEFAULT_CURVES

RUN_FILES = (".csv", ".parquet")  # a collected table (results collect --output) instead of a study file
SOURCES = ("runs", "wandb")


def expected_runs(study) -> tuple[list[dict], list[str]]:
    """The study's runs as dicts for report/, and the axis names (``method.name`` shown as ``method``)."""
    expected = [{"run_id": s.run_id, "run_dir": s.run_dir, "seed": s.seed, "method": s.method,
                 "axes": {("method" if k == "method.name" else k): v for k, v in s.axes}} for s in study.runs]
    rows = [("method" if k == "method.name" else k) for k in study.axes] or ["method"]
    if "method" not in study.axes and "method.name" not in study.axes:
        for run in expected:
            run["axes"].setdefault("method", run["method"])
    return expected, rows


def load_runs(target: str, overrides: list[str], source: str = "runs", project: str | None = None,
              entity: str | None = None) -> tuple[pd.DataFrame, str, list[str]]:
    """(one row per run, study name, default row axes) from a study file or a collected CSV/Parquet file."""
    path = Path(target)
    if path.suffix in RUN_FILES:
        if not path.is_file():
            raise config_lib.ConfigError(f"collected runs file {path} does not exist")
        try:
            df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, comment="#")
        except (ValueError, OSError) as exc:  # pandas' ParserError and EmptyDataError are ValueErrors
            raise config_lib.ConfigError(f"{path} cannot be read as a `ssl-bench results collect` table: "
                                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        if "status" not in df or "run_id" not in df:
            raise config_lib.ConfigError(f"{path} is not a `ssl-bench results collect` table (no run_id/status)")
        study = str(df["study"].iloc[0]) if "study" in df and len(df) else path.stem
        return df, study, ["method"]
    if source not in SOURCES:
        raise config_lib.ConfigError(f"--from {source!r}: valid sources are {', '.join(SOURCES)}")
    from ssl_bench.launch.grid import load_study

    study = load_study(target, overrides)
    expected, rows = expected_runs(study)
    if source == "wandb":
        from ssl_bench.report.wandb_source import collect_wandb

        df = collect_wandb(study.name, *_wandb_target(study, project, entity), expected=expected)
    else:
        from ssl_bench.report.collect import collect

        df = collect(expected)
    df.insert(0, "study", study.name)
    return df, study.name, rows


def command_line(args: argparse.Namespace) -> str:
    """The command as typed (``ssl-bench ...``), for the table footer."""
    return "ssl-bench " + " ".join(shlex.quote(a) for a in getattr(args, "argv", sys.argv[1:]))


def write_output(text: str, path: str | None, quiet: bool = False) -> None:
    if not quiet:
        print(text, end="")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
        print(f"[ssl-bench] wrote {path}", file=sys.stderr)


def _runs(args: argparse.Namespace) -> tuple[pd.DataFrame, str, list[str]]:
    return load_runs(args.study, args.overrides, getattr(args, "source", "runs"), getattr(args, "project", None),
                     getattr(args, "entity", None))


def cmd_collect(args: argparse.Namespace) -> int:
    df, study, _ = _runs(args)
    states = df["status"].value_counts().to_dict()
    print(f"[ssl-bench] {study}: {len(df)} runs ({', '.join(f'{c} {s}' for s, c in states.items())}), "
          f"{len(df.columns)} columns", file=sys.stderr)
    if not args.output:
        print(df.to_csv(index=False), end="")
        return 0
    out = Path(args.output)
    if out.suffix not in RUN_FILES:
        raise config_lib.ConfigError(f"--output {out}: use a .csv or .parquet file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        try:
            df.to_parquet(out, index=False)
        except ImportError as exc:
            raise config_lib.ConfigError(f"Parquet needs pyarrow ({exc}); write .csv or pip install pyarrow") from exc
    else:
        df.to_csv(out, index=False)
    print(f"[ssl-bench] wrote {out}", file=sys.stderr)
    return 0


def table_spec(args: argparse.Namespace, df: pd.DataFrame, rows: list[str]):
    from ssl_bench.report.references import load_reference
    from ssl_bench.report.table import TableSpec, default_metrics

    metrics = args.cols or default_metrics(df) or ["knn_top1"]  # before any result: a row of run states
    reference = load_reference(args.reference) if args.reference else None
    return TableSpec(rows=args.rows or rows, metrics=metrics, ci=args.ci, reference=reference, digits=args.digits,
                     command=command_line(args))


def cmd_table(args: argparse.Namespace) -> int:
    from ssl_bench.report.table import render

    df, study, rows = _runs(args)
    fmt = args.format or _format_of(args.output)
    write_output(render(df, study, table_spec(args, df, rows), fmt), args.output)
    return 0


def _format_of(path: str | None) -> str:
    suffix = Path(path).suffix.lstrip(".") if path else ""
    return {"tex": "tex", "csv": "csv"}.get(suffix, "md")


def cmd_compare(args: argparse.Namespace) -> int:
    from ssl_bench.report.compare import render_compare

    a, name_a, rows = load_runs(args.study_a, [f"tracking.runs_root={args.root_a}"] if args.root_a else [])
    b, name_b, _ = load_runs(args.study_b, [f"tracking.runs_root={args.root_b}"] if args.root_b else [])
    spec = table_spec(args, a, rows)
    labels = (args.label_a or _side_label(a, name_a, args.root_a), args.label_b or _side_label(b, name_b, args.root_b))
    fmt = args.format or _format_of(args.output)
    write_output(render_compare(a, b, labels, spec, fmt), args.output)
    return 0


def cmd_gaps(args: argparse.Namespace) -> int:
    from ssl_bench.report.gaps import render_gaps

    df, study, rows = _runs(args)
    fmt = args.format or _format_of(args.output)
    write_output(render_gaps(df, study, args.rows or rows, args.metric, args.baseline, args.times, fmt, args.digits,
                             command_line(args)), args.output)
    return 0


def _side_label(df: pd.DataFrame, study: str, root: str | None) -> str:
    shas = sorted({str(s)[:7] for s in df.get("git_sha", pd.Series(dtype=object)).dropna()})
    return f"{study}" + (f" @ {'/'.join(shas)}" if shas else "") + (f" ({root})" if root else "")


def cmd_plot(args: argparse.Namespace) -> int:
    from ssl_bench.launch.grid import load_study
    from ssl_bench.report.plots import FIGURES, plot_study

    study = load_study(args.study, args.overrides)
    expected, rows = expected_runs(study)
    metrics = sorted({m for name in args.figures for m in FIGURES[name][0]}) if args.figures else \
        sorted({m for spec in FIGURES.values() for m in spec[0]})
    curves = study_curves(study, expected, metrics, args.source, args.project, args.entity)
    if "knn/top1" in metrics:
        from ssl_bench.report.collect import collect
        from ssl_bench.report.curves import with_knn_endpoints

        curves = with_knn_endpoints(curves, collect(expected), rows)
    out_dir = Path(args.output_dir or Path("results") / study.name)
    hlines = _entropy_ceiling(study)
    written = plot_study(curves, rows, out_dir, study.name, figures=tuple(args.figures or FIGURES), hlines=hlines,
                         band=args.band)
    for name, paths in written.items():
        print(f"{name}: {', '.join(str(p) for p in paths)}" if paths else f"{name}: skipped ({written.skipped[name]})")
    return 0


def study_curves(study, expected: list[dict], metrics: list[str], source: str = "runs", project: str | None = None,
                 entity: str | None = None) -> pd.DataFrame:
    """Per-step metrics of the study's runs from their metrics.jsonl or W&B history; an error if none logged them."""
    from ssl_bench.report.curves import collect_curves

    if source == "wandb":
        from ssl_bench.report.wandb_source import history_wandb

        project, entity = _wandb_target(study, project, entity)
        curves = history_wandb(study.name, project, entity, keys=metrics, expected=expected)
    else:
        curves = collect_curves(expected, metrics)
    if curves.empty:
        raise config_lib.ConfigError(f"study {study.name!r}: no run has logged {metrics} yet (looked in "
                                     f"{len(expected)} runs, source {source}, under {study.runs[0].run_dir.parent})")
    return curves


def _wandb_target(study, project: str | None, entity: str | None) -> tuple[str, str | None]:
    """The W&B project and entity: the options, else the study's tracking settings."""
    tracking = study.runs[0].config.tracking
    return project or tracking.wandb_project, entity or tracking.wandb_entity


def _entropy_ceiling(study) -> dict[str, list[tuple[float, str]]]:
    """log K for the teacher-entropy panel (uniform collapse), when every run has the same K."""
    from ssl_bench.report.plots import entropy_hlines

    ks = {spec.config.method.out_dim for spec in study.runs}
    return entropy_hlines(ks.pop()) if len(ks) == 1 else {}


def cmd_curves(args: argparse.Namespace) -> int:
    from ssl_bench.launch.grid import load_study
    from ssl_bench.report.curves import markdown_curves, plot_curves

    study = load_study(args.study, args.overrides)
    expected, rows = expected_runs(study)
    metrics = args.metric or list(DEFAULT_CURVES)
    curves = study_curves(study, expected, metrics)
    write_output(markdown_curves(curves, rows, metrics, args.every), args.output)
    if args.plot:
        plot_curves(curves, rows, metrics, args.plot, title=study.name)
        print(f"figure: {args.plot}")
    return 0


def _study_args(p: argparse.ArgumentParser, wandb: bool = True) -> None:
    p.add_argument("study", help="study YAML file (or a table written by `results collect`)")
    p.add_argument("overrides", nargs="*", help="the same overrides the study was launched with")
    if wandb:
        p.add_argument("--from", dest="source", default="runs", choices=SOURCES,
                       help="read run directories (default) or the study's W&B group")
        p.add_argument("--project", help="W&B project (default: the study's tracking.wandb_project)")
        p.add_argument("--entity", help="W&B entity (default: the study's tracking.wandb_entity)")


def _table_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", nargs="+", help="axes that make the rows (default: the study's grid axes)")
    p.add_argument("--cols", nargs="+", help="metrics (result.json names, e.g. knn_top1 linear_top1); "
                                             "default: accuracies and collapse diagnostics the runs have")
    p.add_argument("--format", choices=("md", "tex", "csv"), help="default: from --output's suffix, else md")
    p.add_argument("--ci", action="store_true", help="± 95%% confidence half-width (Student t) instead of std")
    p.add_argument("--reference", help="reference numbers to compare with, e.g. experiments/references/NAME.yaml")
    p.add_argument("--digits", type=int, default=2, help="decimals (default 2)")
    p.add_argument("--output", help="also write the table to this file")


def add_results_parser(sub) -> None:
    results = sub.add_parser("results", help="tables and figures from run records")
    rs = results.add_subparsers(dest="results_command", required=True)
    p = rs.add_parser("collect", help="one tidy row per run (axes, seed, status, metrics, timing, provenance)")
    _study_args(p)
    p.add_argument("--output", help="write CSV or Parquet (by suffix) instead of printing CSV")
    p.set_defaults(func=cmd_collect)

    p = rs.add_parser("table", help="mean ± std over seeds per row, Markdown/LaTeX/CSV with provenance")
    _study_args(p)
    _table_args(p)
    p.set_defaults(func=cmd_table)

    p = rs.add_parser("compare", help="two studies (or one grid on two code versions) with paired differences")
    p.add_argument("study_a", help="study YAML or collected CSV/Parquet: the baseline (A)")
    p.add_argument("study_b", help="study YAML or collected CSV/Parquet: compared with A (differences are B - A)")
    p.add_argument("--root-a", help="runs root of A (tracking.runs_root), e.g. a copy made by an older release")
    p.add_argument("--root-b", help="runs root of B")
    p.add_argument("--label-a", help="column label for A (default: study @ git sha)")
    p.add_argument("--label-b", help="column label for B")
    _table_args(p)
    p.set_defaults(func=cmd_compare)

    p = rs.add_parser("gaps", help="is one row ahead of each other row by more than k pooled seed stds?")
    _study_args(p)
    p.add_argument("--baseline", required=True, help="the row compared with every other, e.g. dino")
    p.add_argument("--metric", default="knn_top1", help="result.json metric (default knn_top1)")
    p.add_argument("--times", type=float, default=2.0, help="met when gap > TIMES x pooled std (default 2)")
    p.add_argument("--rows", nargs="+", help="axes that make the rows (default: the study's grid axes)")
    p.add_argument("--format", choices=("md", "tex", "csv"), help="default: from --output's suffix, else md")
    p.add_argument("--digits", type=int, default=2, help="decimals (default 2)")
    p.add_argument("--output", help="also write the table to this file")
    p.set_defaults(func=cmd_gaps)

    p = rs.add_parser("plot", help="PNG+PDF figures: collapse curves (DINO Fig. 7), k-NN over training, loss")
    _study_args(p)
    p.add_argument("--figures", nargs="+", choices=("collapse", "knn", "loss", "rank"),
                   help="default: all that have data")
    p.add_argument("--band", choices=("std", "range"), default="std", help="seed band: mean ± std or min..max")
    p.add_argument("--output-dir", help="default: results/<study>/")
    p.set_defaults(func=cmd_plot)

    p = rs.add_parser("curves", help="metric curves by step per arm as Markdown tables")
    _study_args(p, wandb=False)
    p.add_argument("--metric", action="append",
                   help=f"metrics.jsonl key; repeatable (default: {' '.join(DEFAULT_CURVES)})")
    p.add_argument("--every", type=int, default=50, help="table rows every N steps (and the last step)")
    p.add_argument("--output", help="also write the Markdown to this file")
    p.add_argument("--plot", help="also draw the curves to this image file (PNG, PDF, SVG)")
    p.set_defaults(func=cmd_curves)

