"""``ssl-bench methods``, ``datasets`` and ``train``: list the registries, train one config."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_bench import config as config_lib


def cmd_methods(args: argparse.Namespace) -> int:
    from ssl_bench.methods import METHODS

    width = max(len(e.name) for e in METHODS)
    for entry in METHODS:
        print(f"{entry.name:<{width}}  {entry.description}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from ssl_bench.data import DATASETS

    width = max(len(e.name) for e in DATASETS)
    for entry in DATASETS:
        print(f"{entry.name:<{width}}  {entry.description}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ssl_bench import repro
    from ssl_bench.run import train
    from ssl_bench.methods.finite import NonFiniteError

    tree = config_lib.load_config_tree(args.config)
    tree.setdefault("study", Path(args.config).stem)
    cfg = config_lib.build_config(tree, config_lib.parse_overrides(args.overrides), source=args.config)
    run_id = config_lib.run_id(cfg)
    train.validate_config(cfg, f"run {run_id}")
    train.check_local_devices(cfg, f"run {run_id}")  # `ssl-bench train` always runs here
    print(f"[ssl-bench] run {run_id} -> {config_lib.run_dir(cfg)}", flush=True)  # run_dir refuses unsafe names
    try:
        result = train.run(cfg, force=args.force)
    except NonFiniteError as exc:  # recorded in result.json; no traceback for a diverged run
        if repro.launch_rank(cfg.trainer.devices) == 0:
            print(f"[ssl-bench] {run_id}: failed: {exc}; no accuracy is reported "
                  f"({config_lib.run_dir(cfg) / 'result.json'})", flush=True)
        return 1
    if not result.is_main:
        return 0  # rank 0 reports for the whole DDP run
    if result.skipped:
        print(f"[ssl-bench] {run_id} already completed; nothing recomputed (use --force to run it again; "
              f"the earlier attempt is kept under attempts/)")
    print(f"[ssl-bench] {run_id}: {result.status}; k-NN top-1 {fmt(result.metrics.get('knn_top1'))}%, "
          f"at init {fmt(result.metrics.get('knn_top1_init'))}%; {result.run_dir}")
    return 0


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def add_train_parsers(sub) -> None:
    sub.add_parser("methods", help="list registered methods").set_defaults(func=cmd_methods)
    sub.add_parser("datasets", help="list registered datasets").set_defaults(func=cmd_datasets)
    train = sub.add_parser("train", help="train one config and evaluate it")
    train.add_argument("config", help="config YAML file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=2")
    train.add_argument("--force", action="store_true", help="rerun even if this run id already completed")
    train.set_defaults(func=cmd_train)
