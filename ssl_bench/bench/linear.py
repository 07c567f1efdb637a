"""Benchmark: a grid of linear heads trained at once vs one head per run, on the same precomputed features.

``python -m ssl_bench.bench.linear [--heads 50] [--n 10000] [--dim 768] [--epochs 10] [--device cpu]``
prints the wall time of (a) ssl-bench's stacked heads (``eval/linear.py``), (b) a DINOv2-style
loop (one ``nn.Linear`` and one param group per head, one pass over the data), (c) separate
single-head runs. Only head training is timed: a real separate run would also repeat the frozen
backbone pass per head, which the grid shares.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from ssl_bench.eval.linear_heads import FeatureChoice, LinearHeads, StackedSGD, head_grid, lr_factor, train_heads

CHOICE = FeatureChoice(1, False)


def make_batches(n: int, dim: int, classes: int, batch: int, device: str
                 ) -> tuple[Callable[[int], Iterator], int]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, dim, generator=g).to(device)
    y = torch.randint(0, classes, (n,), generator=g).to(device)
    steps = n // batch

    def batches(epoch: int):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).to(device)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            yield {CHOICE: x[idx]}, y[idx]

    return batches, steps


def stacked(lrs, dim, classes, batch, epochs, batches, steps, device) -> None:
    heads = LinearHeads(head_grid(lrs, [CHOICE], batch), {CHOICE: dim}, classes).to(device)
    train_heads(heads, StackedSGD(heads), batches, epochs, steps)


def one_pass_loop(lrs, dim, classes, batch, epochs, batches, steps, device) -> None:
    specs = head_grid(lrs, [CHOICE], batch)
    heads = [torch.nn.Linear(dim, classes).to(device) for _ in specs]
    opt = torch.optim.SGD([{"params": h.parameters(), "lr": s.scaled_lr} for h, s in zip(heads, specs)],
                          momentum=0.9)
    t = 0
    for epoch in range(epochs):
        for inputs, labels in batches(epoch):
            for group, spec in zip(opt.param_groups, specs):
                group["lr"] = spec.scaled_lr * lr_factor(t, epochs * steps)
            opt.zero_grad()
            sum(F.cross_entropy(h(inputs[CHOICE]), labels) for h in heads).backward()
            opt.step()
            t += 1


def separate_runs(lrs, dim, classes, batch, epochs, batches, steps, device) -> None:
    for spec in head_grid(lrs, [CHOICE], batch):
        head = torch.nn.Linear(dim, classes).to(device)
        opt = torch.optim.SGD(head.parameters(), lr=spec.scaled_lr, momentum=0.9)
        t = 0
        for epoch in range(epochs):
            for inputs, labels in batches(epoch):
                opt.param_groups[0]["lr"] = spec.scaled_lr * lr_factor(t, epochs * steps)
                opt.zero_grad()
                F.cross_entropy(head(inputs[CHOICE]), labels).backward()
                opt.step()
                t += 1


def bench_linear(heads: int = 50, n: int = 10_000, dim: int = 768, classes: int = 10, epochs: int = 10,
                 batch: int = 256, device: str = "cpu", repeats: int = 1,
                 variants: Sequence[str] = ("stacked", "one_pass", "separate")) -> dict:
    """Best-of-``repeats`` seconds per variant, with the setup."""
    lrs = [10 ** (-5 + 4 * i / max(heads - 1, 1)) for i in range(heads)]
    batches, steps = make_batches(n, dim, classes, batch, device)
    funcs = {"stacked": stacked, "one_pass": one_pass_loop, "separate": separate_runs}
    out = {"setup": {"heads": heads, "n": n, "dim": dim, "classes": classes, "epochs": epochs, "batch": batch,
                     "steps_per_epoch": steps, "device": device, "threads": torch.get_num_threads()}}
    for name in variants:
        times = []
        for _ in range(repeats):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            funcs[name](lrs, dim, classes, batch, epochs, batches, steps, device)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[name] = {"best_s": round(min(times), 3), "all_s": [round(t, 3) for t in times]}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--heads", type=int, default=50)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = bench_linear(args.heads, args.n, args.dim, epochs=args.epochs, device=args.device, repeats=args.repeats)
    print(f"| variant ({args.heads} heads, {args.n} x {args.dim}, {args.epochs} epochs) | best s |")
    print("|---|---|")
    for name in ("stacked", "one_pass", "separate"):
        print(f"| {name} | {out[name]['best_s']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
