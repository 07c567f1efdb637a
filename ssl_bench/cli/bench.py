"""``ssl-bench bench train|data|compare|knn|make-images``: speed figures as a table and a JSON record in ``results/bench/``.

Each JSON record carries its provenance (git sha and dirty flag, package versions, hardware, the
resolved config and the command line), so figures can be compared across commits and machines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ssl_bench import config as config_lib
from ssl_bench import repro

DEFAULT_OUT_DIR = "results/bench"


def write_record(args: argparse.Namespace, benchmark: str, name: str, **body: Any) -> None:
    """Write a benchmark's JSON record: figures plus where, when and from what they came."""
    from ssl_bench.cli.results import command_line

    git = repro.git_state()
    path = output_path(args, benchmark, name, git)
    if path is None:
        return
    data = {"benchmark": benchmark, "command": command_line(args), "git": git, "versions": repro.package_versions(),
            "hardware": repro.hardware(), "finished_at": repro.utc_now(), **body}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"[ssl-bench] wrote {path}", flush=True)


def output_path(args: argparse.Namespace, benchmark: str, name: str, git: dict[str, Any]) -> Path | None:
    """``--json`` as given, else ``<out-dir>/<benchmark>-<name>-<git sha>.json`` with ``-2``, ``-3``... added
    rather than overwriting an earlier record; None with ``--no-json``."""
    if args.no_json:
        return None
    if args.json_path:
        return Path(args.json_path)
    sha = (git.get("sha") or "nogit")[:7] + ("-dirty" if git.get("dirty") else "")
    base = Path(args.out_dir) / f"{benchmark}-{name}-{sha}"
    path, n = base.with_suffix(".json"), 1
    while path.exists():
        n += 1
        path = base.parent / f"{base.name}-{n}.json"
    return path


def cmd_bench_train(args: argparse.Namespace) -> int:
    from ssl_bench.bench.train import bench_train, bench_train_isolated, format_runs, summarise_runs

    cfg = config_lib.load_config(args.config, args.overrides)
    _check_counts(steps=args.steps, repeats=args.repeats)
    if args.warmup < 0:
        raise config_lib.ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    run = bench_train if args.in_process else bench_train_isolated
    if args.compare_synthetic:
        return _bench_train_compare(args, cfg, run)
    runs = []
    for i in range(args.repeats):
        print(f"[bench train] run {i + 1}/{args.repeats}: {args.warmup} warm-up + {args.steps} timed steps "
              f"({'synthetic crops' if args.synthetic else 'real data pipeline'})", flush=True)
        runs.append(run(cfg, args.steps, args.warmup, args.synthetic))
    summary = summarise_runs(runs)
    print(format_runs(runs, summary))
    name = Path(args.config).stem + ("-synthetic" if args.synthetic else "")
    write_record(args, "train", name, config_file=args.config, overrides=args.overrides,
                 config=config_lib.to_dict(cfg), summary=summary, runs=runs)
    return 0


def _bench_train_compare(args: argparse.Namespace, cfg: config_lib.Config, run: Any) -> int:
    """``--compare-synthetic``: synthetic crops and the real pipeline, interleaved, in one record."""
    import torch

    from ssl_bench.bench.compare import compare_train, format_train_table
    from ssl_bench.methods import build_method

    if args.synthetic:
        raise config_lib.ConfigError("--compare-synthetic runs both pipelines; drop --synthetic")
    with torch.device("meta"):
        if build_method(cfg).uses_masks:
            raise config_lib.ConfigError(f"--compare-synthetic: method.name={cfg.method.name!r} needs iBOT masks, "
                                         "which synthetic crops lack; benchmark its real pipeline alone")
    result = compare_train(cfg, args.steps, args.warmup, args.repeats, run)
    print(format_train_table(result))
    write_record(args, "train", Path(args.config).stem + "-compare-synthetic", config_file=args.config,
                 overrides=args.overrides, config=config_lib.to_dict(cfg), steps=args.steps, warmup=args.warmup,
                 repeats=args.repeats, **result)
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    import torch

    from ssl_bench.bench.data import bench_data, format_table
    from ssl_bench.methods import build_method
    from ssl_bench.run.train import pipeline_options

    cfg = config_lib.load_config(args.config, args.overrides)
    try:
        workers = [int(w) for w in args.workers.split(",") if w.strip()]
    except ValueError as exc:
        raise config_lib.ConfigError(f"--workers {args.workers!r}: give comma-separated worker counts, "
                                     "e.g. 0,1,2") from exc
    _check_counts(repeats=args.repeats)
    warmup = args.warmup if args.warmup is not None else 2 * max(workers, default=0) + 1
    if args.compare:
        return _bench_data_compare(args, workers, warmup)
    if args.repeats != 1:
        raise config_lib.ConfigError("--repeats applies to --compare runs; without --compare give --repeats 1")
    with torch.device("meta"):  # the model's shapes only (patch size), no weights
        local, grid = pipeline_options(cfg, build_method(cfg))
    try:
        result = bench_data(cfg, workers, args.batches, warmup, mask_grid=grid, local_crops_number=local)
    except ValueError as exc:
        raise config_lib.ConfigError(str(exc)) from exc
    print(format_table(result))
    write_record(args, "data", Path(args.config).stem, config_file=args.config, overrides=args.overrides, **result)
    return 0


def _bench_data_compare(args: argparse.Namespace, workers: list[int], warmup: int) -> int:
    """``--compare KEY=V1,V2``: every variant at every worker count, interleaved, in one record."""
    from ssl_bench.bench.compare import compare_data, data_variants, format_data_table, parse_compare

    key, values = parse_compare(args.compare)
    variants = data_variants(args.config, args.overrides, key, values)
    try:
        result = compare_data(variants, workers, args.batches, warmup, args.repeats)
    except ValueError as exc:
        raise config_lib.ConfigError(str(exc)) from exc
    print(format_data_table(result))
    name = f"{Path(args.config).stem}-compare-{key.rsplit('.', 1)[-1]}"
    write_record(args, "data", name, config_file=args.config, overrides=args.overrides, compare=args.compare,
                 configs={v.label: config_lib.to_dict(v.cfg) for v in variants}, **result)
    return 0


def cmd_bench_compare(args: argparse.Namespace) -> int:
    """ssl-bench beside the official DINO loop and lightly, interleaved; one record for the pass."""
    import os

    from ssl_bench.bench import side_by_side as sbs
    from ssl_bench.bench.reference_loops import run_isolated
    from ssl_bench.bench.train import bench_train_isolated

    _check_counts(steps=args.steps, repeats=args.repeats)
    if args.warmup < 0:
        raise config_lib.ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    bad = [p for p in precisions if p not in config_lib.PRECISIONS]
    if bad or not precisions:
        raise config_lib.ConfigError(f"--precisions: {', '.join(map(repr, bad)) or 'none given'}; choose from "
                                     f"{', '.join(config_lib.PRECISIONS)}")
    dino_src = args.dino_src or os.environ.get("DINO_SRC") or None
    wanted_references = set(loops) - {"ssl-bench"}
    loops, skipped = sbs.available_loops(loops, dino_src)
    if args.real_data and "ssl-bench" not in loops:
        raise config_lib.ConfigError("--real-data runs ssl-bench on its data pipeline; add ssl-bench to --loops")
    for loop, reason in skipped.items():
        print(f"[bench compare] skipping {loop}: {reason}", flush=True)
    if not loops:
        raise config_lib.ConfigError("--loops: nothing left to run (" + "; ".join(skipped.values()) + ")")
    entries = []
    for path in args.configs:  # every config, precision and reference job checked before the first run
        cfgs = {p: config_lib.load_config(path, [*args.overrides, f"trainer.precision={p}"]) for p in precisions}
        sbs.check_synthetic(cfgs[precisions[0]], path)
        job = sbs.reference_job(cfgs[precisions[0]], args.steps, args.warmup) if wanted_references else None
        entries.append(sbs.Entry(Path(path).stem, cfgs, job))
    result = sbs.compare_loops(entries, loops, precisions, args.steps, args.warmup, args.repeats,
                               bench_train_isolated, run_isolated, dino_src, profile=args.profile,
                               real_data=args.real_data)
    result["skipped"] = skipped
    print(sbs.format_table(result))
    write_record(args, "compare", "+".join(e.name for e in entries), config_files=args.configs,
                 overrides=args.overrides, loops=loops, precisions=precisions, steps=args.steps, warmup=args.warmup,
                 repeats=args.repeats, configs={e.name: config_lib.to_dict(e.cfgs[precisions[0]]) for e in entries},
                 reference_jobs={e.name: e.job for e in entries}, **result)
    return 0


def cmd_bench_make_images(args: argparse.Namespace) -> int:
    from ssl_bench.bench.images import make_images, parse_size

    try:
        manifest = make_images(args.root, args.count, parse_size(args.size), args.classes, args.seed,
                               val_count=args.val_count, quality=args.quality)
    except (ValueError, FileExistsError) as exc:
        raise config_lib.ConfigError(f"bench make-images: {exc}") from exc
    files = manifest["files"]
    print(f"[ssl-bench] wrote {files['train']} train and {files['val']} val JPEGs "
          f"({args.size}, {args.classes} classes, seed {args.seed}) under {args.root}", flush=True)
    return 0


def cmd_bench_knn(args: argparse.Namespace) -> int:
    from ssl_bench.bench.knn import format_table, run_configs

    _check_counts(bank=args.bank, dim=args.dim, test=args.test, k=args.k, repeats=args.repeats)
    try:
        rows = run_configs(args)
    except ValueError as exc:
        raise config_lib.ConfigError(str(exc)) from exc
    print(format_table(rows))
    write_record(args, "knn", f"bank{args.bank}-dim{args.dim}", rows=rows)
    return 0


def _check_counts(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise config_lib.ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {value}")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", dest="json_path", default=None,
                   help=f"write the JSON record here (default: {DEFAULT_OUT_DIR}/<benchmark>-<name>-<git sha>.json)")
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help="folder of the default JSON file name")
    p.add_argument("--no-json", action="store_true", help="print the table only")


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks: training step, data pipeline, k-NN; test JPEGs")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)

    p = bench_sub.add_parser("train", help="training-step throughput, step time, peak memory, FLOPs, MFU")
    p.add_argument("config", help="config YAML file (e.g. experiments/bench/tiny_cpu_vit.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. speed.compile=true")
    p.add_argument("--synthetic", action="store_true", help="pre-made crops from memory: the model step alone")
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, allocator)")
    p.add_argument("--repeats", type=int, default=1, help="runs, each in a fresh process; the median is reported")
    p.add_argument("--in-process", action="store_true", help="run in this process (peak RSS then includes it)")
    p.add_argument("--compare-synthetic", action="store_true",
                   help="time synthetic crops and the real data pipeline, interleaved (--repeats rounds), one record "
                        "with both medians and their ratio")
    _output_args(p)
    p.set_defaults(func=cmd_bench_train)

    p = bench_sub.add_parser("data", help="multi-crop pipeline throughput per worker count")
    p.add_argument("config", help="config YAML file")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=64")
    p.add_argument("--workers", default="0,1,2", help="comma-separated worker counts")
    p.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed batches first (default 2 x the largest worker count + 1: the prefetched ones)")
    p.add_argument("--compare", default=None, metavar="KEY=V1,V2",
                   help="time each value of KEY at each worker count, interleaved; the record holds the ratio of "
                        "each to the first (e.g. data.multicrop=pil,tensor)")
    p.add_argument("--repeats", type=int, default=1, help="with --compare: rounds, each a fresh loader per variant")
    _output_args(p)
    p.set_defaults(func=cmd_bench_data)

    p = bench_sub.add_parser("compare", help="ssl-bench beside the official DINO loop and lightly, interleaved, "
                                             "fresh processes, medians; one JSON record")
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="DINO config YAML files (experiments/bench/tiny_cpu_*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override applied to every config (repeatable)")
    p.add_argument("--loops", default="ssl-bench,official,lightly",
                   help="comma-separated, from ssl-bench, official (needs --dino-src or DINO_SRC), lightly (if installed)")
    p.add_argument("--precisions", default="32-true",
                   help="ssl-bench's trainer.precision values, e.g. 32-true,bf16-mixed (the references run fp32)")
    p.add_argument("--dino-src", default=None, help="a facebookresearch/dino checkout (default: $DINO_SRC)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each loop runs once per round, in a fresh process")
    p.add_argument("--real-data", action="store_true",
                   help="also run ssl-bench on each config's own data pipeline (end to end), in every precision")
    p.add_argument("--profile", action="store_true",
                   help="one more round under torch's profiler: self CPU ms per step by op, per loop (not in the medians)")
    _output_args(p)
    p.set_defaults(func=cmd_bench_compare)

    p = bench_sub.add_parser("make-images", help="generated test JPEGs in ImageNet layout DIR/{train,val}/<class>/")
    p.add_argument("root", metavar="DIR", help="output folder (train/ and val/ must be new or empty)")
    p.add_argument("--count", type=int, default=1000, help="train images")
    p.add_argument("--val-count", type=int, default=None, help="val images (default max(classes, count // 10))")
    p.add_argument("--size", default="500x375", help="WIDTHxHEIGHT")
    p.add_argument("--classes", type=int, default=10, help="class folders")
    p.add_argument("--seed", type=int, default=0, help="content seed (same seed, same files)")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.set_defaults(func=cmd_bench_make_images)

    from ssl_bench.bench.knn import add_arguments

    p = bench_sub.add_parser("knn", help="k-NN search throughput and peak memory for a bank size")
    add_arguments(p)
    _output_args(p)
    p.set_defaults(func=cmd_bench_knn)
