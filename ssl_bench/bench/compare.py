"""Side-by-side benchmarks: config variants of ``bench data`` and the synthetic/real pair of ``bench train``.

Variants are timed interleaved (A B A B ..., one round per repeat), so that a slow spell of a shared
machine falls on every variant alike rather than on whichever ran last. Every ``bench data`` run builds
a fresh loader (new workers) and every ``bench train`` run (by default) a fresh process. A ratio is
``median(variant img/s) / median(baseline img/s)`` over the repeats, the baseline being the first
variant (``bench data``) or the synthetic crops (``bench train``); the ratios of the runs paired by
repeat are recorded beside it to show their spread.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Callable, Optional

from ssl_bench import config as config_lib
from ssl_bench.bench.data import bench_data, config_summary
from ssl_bench.bench.train import summarise_runs


@dataclasses.dataclass
class DataVariant:
    """One side of a ``bench data`` comparison: its label (``key=value``), config and pipeline options."""

    label: str
    override: str
    cfg: config_lib.Config
    local_crops_number: Optional[int] = None
    mask_grid: Optional[tuple[int, int]] = None


def parse_compare(spec: str) -> tuple[str, list[str]]:
    """``"data.multicrop=pil,tensor"`` -> ``("data.multicrop", ["pil", "tensor"])``.

    Commas inside brackets belong to the value, so ``data.local_crop_scale=[0.05,0.4],[0.1,0.4]`` gives
    two values. At least two distinct values are needed.
    """
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise config_lib.ConfigError(f"--compare {spec!r}: give KEY=V1,V2[,...], e.g. data.multicrop=pil,tensor")
    values, depth, current = [], 0, ""
    for ch in rest:
        depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += ch
    values.append(current.strip())
    if len(values) < 2 or any(not v for v in values) or len(set(values)) != len(values):
        raise config_lib.ConfigError(f"--compare {spec!r}: need two or more distinct, non-empty values of {key}, "
                                     "separated by commas")
    return key, values


def check_not_overridden(key: str, overrides: list[str]) -> None:
    """The compared key may not also be set among the overrides (one of the two would be ignored)."""
    for override in overrides:
        if override.partition("=")[0].strip() == key:
            raise config_lib.ConfigError(f"--compare sets {key}; remove the override {override!r}")


def data_variants(config_file: str, overrides: list[str], key: str, values: list[str]) -> list[DataVariant]:
    """Load every variant's config (all errors before the first run) and its pipeline options."""
    import torch

    from ssl_bench.methods import build_method
    from ssl_bench.run.train import pipeline_options

    check_not_overridden(key, overrides)
    variants = []
    for value in values:
        override = f"{key}={value}"
        cfg = config_lib.load_config(config_file, [*overrides, override])
        with torch.device("meta"):  # the model's shapes only (patch size), no weights
            local, grid = pipeline_options(cfg, build_method(cfg))
        variants.append(DataVariant(override, override, cfg, local, grid))
    return variants


def compare_data(variants: list[DataVariant], workers: list[int], batches: int, warmup: int,
                 repeats: int = 1) -> dict[str, Any]:
    """``bench data`` of every variant at every worker count, interleaved, ``repeats`` rounds.

    The order is: for each repeat, for each worker count, each variant in turn (a fresh loader each
    time). Returns a JSON-ready dict: ``rows`` (every run's :func:`bench_data` row with ``variant`` and
    ``repeat`` added, in run order), ``summary`` (see :func:`summarise_data`), ``variants`` (label,
    override and data settings of each) and the machine figures of :func:`bench_data`.
    """
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    if len(variants) < 2:
        raise ValueError(f"a comparison needs two or more variants, got {len(variants)}")
    rows, last = [], {}
    for repeat in range(repeats):
        for w in workers:
            for v in variants:
                print(f"[bench data] repeat {repeat + 1}/{repeats}, workers={w}: {v.label}", flush=True)
                last = bench_data(v.cfg, [w], batches, warmup, mask_grid=v.mask_grid,
                                  local_crops_number=v.local_crops_number)
                rows.append({"variant": v.label, "repeat": repeat, **last["rows"][0]})
    labels = [v.label for v in variants]
    first_row = {v.label: next(r for r in rows if r["variant"] == v.label) for v in variants}
    machine = {k: last[k] for k in ("threads", "cpu_count", "cpu_affinity", "torch", "hardware")}
    return {"baseline": labels[0], "labels": labels, "workers": workers, "repeats": repeats,
            "batches": batches, "warmup": warmup,
            "variants": [{"label": v.label, "override": v.override,
                          "config": config_summary(v.cfg, first_row[v.label], v.mask_grid, v.local_crops_number)}
                         for v in variants],
            "rows": rows, "summary": summarise_data(rows, labels, workers), **machine}


def summarise_data(rows: list[dict[str, Any]], labels: list[str], workers: list[int]) -> list[dict[str, Any]]:
    """One entry per (worker count, variant): the img/s of its runs (by repeat), their median, the median
    per worker, and the ratio to the first variant at the same worker count (of the medians, and per repeat)."""
    out = []
    for w in workers:
        base = _runs(rows, labels[0], w)
        for label in labels:
            runs = _runs(rows, label, w)
            rates = [r["images_per_s"] for r in runs]
            paired = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs, base)]
            out.append({
                "workers": w, "variant": label, "images_per_s_runs": rates,
                "images_per_s_median": statistics.median(rates),
                "images_per_s_min": min(rates), "images_per_s_max": max(rates),
                "images_per_s_per_worker_median": statistics.median(r["images_per_s_per_worker"] for r in runs),
                "batch_s_median": statistics.median(r["batch_s_median"] for r in runs),
                "ratio_to_baseline": statistics.median(rates) / statistics.median(b["images_per_s"] for b in base),
                "ratio_to_baseline_runs": paired, "ratio_to_baseline_runs_median": statistics.median(paired),
            })
    return out


def _runs(rows: list[dict[str, Any]], label: str, workers: int) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r["variant"] == label and r["workers"] == workers), key=lambda r: r["repeat"])


def format_data_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per (worker count, variant), with its ratio to the baseline variant."""
    lines = [f"| workers | variant | img/s median | img/s per worker | x {result['baseline']} "
             "| x per repeat (min-max) | batch s median | runs |",
             "|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        paired = s["ratio_to_baseline_runs"]
        lines.append(f"| {s['workers']} | {s['variant']} | {s['images_per_s_median']:.1f} "
                     f"| {s['images_per_s_per_worker_median']:.1f} | {s['ratio_to_baseline']:.2f} "
                     f"| {min(paired):.2f}-{max(paired):.2f} | {s['batch_s_median']:.4f} "
                     f"| {', '.join(f'{r:.1f}' for r in s['images_per_s_runs'])} |")
    return "\n".join(lines)


Runner = Callable[[config_lib.Config, int, int, bool], dict[str, Any]]


def compare_train(cfg: config_lib.Config, steps: int, warmup: int, repeats: int, run: Runner) -> dict[str, Any]:
    """``bench train`` of ``cfg`` on synthetic crops and on its real data pipeline, interleaved.

    Each repeat runs ``run(cfg, steps, warmup, synthetic=True)`` then the same with ``False`` (a fresh
    process each with :func:`ssl_bench.bench.train.bench_train_isolated`); each pipeline's runs are summed
    up by :func:`ssl_bench.bench.train.summarise_runs`. Returns ``runs`` (every run's figures with
    ``repeat`` and ``pipeline`` added, in run order), ``summary`` {``synthetic``, ``real``} and the
    ratio ``real / synthetic`` of the median img/s, with the per-repeat ratios.
    """
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    runs = []
    for repeat in range(repeats):
        for synthetic in (True, False):
            pipeline = "synthetic" if synthetic else "real"
            print(f"[bench train] repeat {repeat + 1}/{repeats}: {warmup} warm-up + {steps} timed steps "
                  f"({'synthetic crops' if synthetic else 'real data pipeline'})", flush=True)
            runs.append({"repeat": repeat, "pipeline": pipeline, **run(cfg, steps, warmup, synthetic)})
    by = {p: [r for r in runs if r["pipeline"] == p] for p in ("synthetic", "real")}
    summary = {p: summarise_runs(rs) for p, rs in by.items()}
    paired = [r["images_per_s"] / s["images_per_s"] for r, s in zip(by["real"], by["synthetic"])]
    return {"runs": runs, "summary": summary,
            "ratio_real_to_synthetic": summary["real"]["images_per_s"] / summary["synthetic"]["images_per_s"],
            "ratio_real_to_synthetic_runs": paired, "ratio_real_to_synthetic_runs_median": statistics.median(paired)}


def format_train_table(result: dict[str, Any]) -> str:
    """A Markdown table: one row per run, then the medians and the real/synthetic ratio."""
    lines = ["| repeat | pipeline | img/s | step s median | interval s median | peak memory MiB |",
             "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['repeat'] + 1} | {r['pipeline']} | {r['images_per_s']:.2f} | {r['step_s_median']:.3f} "
                     f"| {r['interval_s_median']:.3f} | {r['peak_memory_mb']:.0f} |")
    for p in ("synthetic", "real"):
        s = result["summary"][p]
        lines.append(f"| median of {s['runs']} | {p} | {s['images_per_s']:.2f} | {s['step_s_median']:.3f} | "
                     f"| {s['peak_memory_mb']:.0f} |")
    paired = result["ratio_real_to_synthetic_runs"]
    lines.append(f"\nreal / synthetic img/s: {result['ratio_real_to_synthetic']:.3f} "
                 f"(per repeat {min(paired):.3f}-{max(paired):.3f})")
    return "\n".join(lines)
