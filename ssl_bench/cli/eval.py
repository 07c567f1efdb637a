"""``ssl-bench eval``: evaluate a run directory or an imported checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from ssl_bench import config as config_lib


def open_eval_target(args: argparse.Namespace, overrides: list[str]):
    from ssl_bench.run import evaluate

    target = evaluate.open_target(args.target, overrides, dataset=args.dataset, key=args.key)
    kind = "run" if target.is_run else f"imported {target.info.format} checkpoint"
    print(f"[ssl-bench] {kind}: {target.info.path} ({target.info.backbone.name}, weights sha256 "
          f"{target.info.weights_sha256[:12]}); data {target.cfg.data.name}, eval preprocessing resize "
          f"{target.cfg.data.eval_resize} / crop {target.cfg.data.eval_crop_size}", flush=True)
    return target, evaluate.device_of(args.device)


def cmd_eval_knn(args: argparse.Namespace) -> int:
    import pandas as pd

    from ssl_bench.run import evaluate

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

    from ssl_bench.run import evaluate

    target, device = open_eval_target(args, args.overrides)
    out = evaluate.eval_linear(target, device)
    grid = pd.DataFrame(out["grid"]).sort_values("val_top1", ascending=False)
    print(grid.head(args.show).to_markdown(index=False, floatfmt=".4g"))
    c = out["chosen"]
    print(f"chosen on the held-out split: {c['name']} (val top-1 {c['val_top1']:.2f}%) -> test top-1 "
          f"{c['test_top1']:.2f}%, top-5 {c['test_top5']:.2f}%; {len(out['grid'])} heads; record: {out['record']}")
    return 0


def cmd_eval_collapse(args: argparse.Namespace) -> int:
    from ssl_bench.run import evaluate

    target, device = open_eval_target(args, args.overrides)
    out = evaluate.eval_collapse(target, device, batches=args.batches)
    for name, value in out["metrics"].items():
        print(f"{name:<20} {'n/a' if value is None else f'{value:.4f}'}")
    if "unavailable" in out["protocol"]:
        print(f"note: {out['protocol']['unavailable']}")
    print(f"record: {out['record']}")
    return 0


def cmd_eval_attention(args: argparse.Namespace) -> int:
    from ssl_bench.run import evaluate

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


