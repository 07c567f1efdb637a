"""``ssl-bench`` command line: methods, train, grid plan|launch, eval knn|linear|attention|collapse, results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from ssl_bench import config as config_lib
from ssl_bench.bench_cli import add_bench_parser
from ssl_bench.grid_cli import add_grid_parser
from ssl_bench.results_cli import add_results_parser


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
    from ssl_bench import repro, train
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


def open_eval_target(args: argparse.Namespace, overrides: list[str]):
    from ssl_bench import evaluate

    target = evaluate.open_target(args.target, overrides, dataset=args.dataset, key=args.key)
    kind = "run" if target.is_run else f"imported {target.info.format} checkpoint"
    print(f"[ssl-bench] {kind}: {target.info.path} ({target.info.backbone.name}, weights sha256 "
          f"{target.info.weights_sha256[:12]}); data {target.cfg.data.name}, eval preprocessing resize "
          f"{target.cfg.data.eval_resize} / crop {target.cfg.data.eval_crop_size}", flush=True)
    return target, evaluate.device_of(args.device)


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import pandas as pd

    from ssl_bench import evaluate

    target, device = open_eval_target(args, args.overrides)
    out = evaluate.eval_knn(target, device, use_cache=not args.no_cache)
    m, ks = out["metrics"], out["protocol"]["ks"]
    rows = [{"k": str(k), "top-1 (%)": m[f"knn_k{k}_top1"]} for k in ks]
    print(pd.DataFrame(rows).to_markdown(index=False, floatfmt=".2f"))
    print(f"k={out['protocol']['k']}: top-1 {m['knn_top1']:.2f}%, top-5 {m['knn_top5']:.2f}% "
          f"(T={out['protocol']['temperature']}); record: {out['record']}")
    return 0


def cmd_eval_linear(args: argparse.Namespace) -> int:
    import pandas as pd

    from ssl_bench import evaluate

    target, device = open_eval_target(args, args.overrides)
    out = evaluate.eval_linear(target, device)
    grid = pd.DataFrame(out["grid"]).sort_values("val_top1", ascending=False)
    print(grid.head(args.show).to_markdown(index=False, floatfmt=".4g"))
    c = out["chosen"]
    print(f"chosen on the held-out split: {c['name']} (val top-1 {c['val_top1']:.2f}%) -> test top-1 "
          f"{c['test_top1']:.2f}%, top-5 {c['test_top5']:.2f}%; {len(out['grid'])} heads; record: {out['record']}")
    return 0


def cmd_eval_collapse(args: argparse.Namespace) -> int:
    from ssl_bench import evaluate

    target, device = open_eval_target(args, args.overrides)
    out = evaluate.eval_collapse(target, device, batches=args.batches)
    for name, value in out["metrics"].items():
        print(f"{name:<20} {'n/a' if value is None else f'{value:.4f}'}")
    if "unavailable" in out["protocol"]:
        print(f"note: {out['protocol']['unavailable']}")
    print(f"record: {out['record']}")
    return 0


def cmd_eval_attention(args: argparse.Namespace) -> int:
    from ssl_bench import evaluate

    overrides = [a for a in args.inputs if "=" in a]
    images = [a for a in args.inputs if "=" not in a]
    if not images:
        raise config_lib.ConfigError("eval attention: name at least one image file")
    target, device = open_eval_target(args, overrides)
    out = evaluate.eval_attention(target, images, device, args.output, args.image_size, args.threshold)
    print(f"{len(out['files'])} PNG files ({out['protocol']['heads']} heads x {len(images)} image(s)) in "
          f"{Path(out['files'][0]).parent}")
    return 0


def add_eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a run directory or a checkpoint (ssl-bench, DINO, DINOv2)")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    specs = (("knn", cmd_eval_knn, "weighted k-NN (DINO protocol)"),
             ("linear", cmd_eval_linear, "linear-probe grid, head chosen on a held-out train split"),
             ("collapse", cmd_eval_collapse, "teacher entropy, KL, RankMe, feature std"),
             ("attention", cmd_eval_attention, "PNGs of the last block's CLS attention per head"))
    for name, func, text in specs:
        p = ev_sub.add_parser(name, help=text)
        p.add_argument("target", help="run directory, its checkpoints/last.ckpt, or an official DINO/DINOv2 "
                                      "checkpoint (.pth)")
        if name == "attention":
            p.add_argument("inputs", nargs="+", help="image files, then optional key=value overrides")
            p.add_argument("--output", help="folder for the PNGs (default: <record dir>/attention)")
            p.add_argument("--image-size", type=int, help="square input size (default: data.eval_crop_size)")
            p.add_argument("--threshold", type=float, help="also keep only the patches holding this share of "
                                                           "each head's attention mass (DINO: 0.6)")
        else:
            p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. eval.knn_k=[10,20]")
        p.add_argument("--dataset", help="dataset to evaluate on (default: the run's, or fashion_mnist)")
        p.add_argument("--key", default="teacher", help="which network of a training checkpoint (teacher|student)")
        p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
        if name == "knn":
            p.add_argument("--no-cache", action="store_true", help="neither read nor write the feature cache")
        if name == "linear":
            p.add_argument("--show", type=int, default=10, help="grid rows to print (best validation first)")
        if name == "collapse":
            p.add_argument("--batches", type=int, default=4, help="training batches to measure (runs only)")
        p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list registered methods").set_defaults(func=cmd_methods)
    sub.add_parser("datasets", help="list registered datasets").set_defaults(func=cmd_datasets)

    train = sub.add_parser("train", help="train one config and evaluate it")
    train.add_argument("config", help="config YAML file")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.epochs=2")
    train.add_argument("--force", action="store_true", help="rerun even if this run id already completed")
    train.set_defaults(func=cmd_train)

    add_grid_parser(sub)
    add_eval_parser(sub)

    add_results_parser(sub)
    add_bench_parser(sub)
    return parser


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, letting key=value overrides follow options too (``eval knn RUN --device cpu k=v``)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if "=" not in a or a.startswith("-")]
    bucket = "overrides" if hasattr(args, "overrides") else "inputs" if hasattr(args, "inputs") else None
    if stray or (extra and bucket is None):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        setattr(args, bucket, [*getattr(args, bucket), *extra])
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for provenance footers
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    try:
        return args.func(args)
    except (config_lib.ConfigError, config_lib.CorruptRecordError) as exc:  # user errors: one line, no traceback
        print(f"ssl-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
