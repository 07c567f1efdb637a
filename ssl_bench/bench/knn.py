"""Benchmark of the DINO k-NN search (Caron et al. 2021 Sec. 4.1): test images/s and peak memory.

Compares the straightforward full-matrix computation (all test x all bank similarities, then topk,
as facebookresearch/dino ``eval_knn.knn_classifier`` does per test chunk but here for the whole test
set at once) with ``ssl_bench.eval.knn.knn_accuracies`` chunked, bank-blocked and with an fp16 bank.
Each configuration runs in a fresh subprocess so that its peak RSS (``VmHWM``, ``repro.peak_rss_mb``) is its own.

    python -m ssl_bench.bench.knn --bank 100000 --dim 384 --test 10000 --json knn.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from ssl_bench import repro
from ssl_bench.eval.knn import knn_accuracies, vote

CONFIGS = {  # name -> (method, use --bank-block, fp16 bank)
    "full": ("full", False, False),
    "chunked": ("ours", False, False),
    "blocked": ("ours", True, False),
    "fp16": ("ours", True, True),
}
_GEN_BLOCK = 16384
_NOISE = 3.5  # noise norm ~3.5 around unit centres: top-1 below 100 %, so agreement between configs means something


def clustered_features(n: int, centres: torch.Tensor, gen: torch.Generator,
                       dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, D) features around the (C, D) unit ``centres`` and their (n,) labels (noise norm ~3.5).

    Filled block by block so generating them needs no full-size temporaries (keeps the RSS honest).
    """
    classes, dim = centres.shape
    labels = torch.randint(0, classes, (n,), generator=gen)
    out = torch.empty(n, dim, dtype=dtype)
    for start in range(0, n, _GEN_BLOCK):
        rows = labels[start:start + _GEN_BLOCK]
        noise = torch.randn(rows.shape[0], dim, generator=gen) / dim ** 0.5
        out[start:start + _GEN_BLOCK] = centres[rows] + _NOISE * noise
    return out, labels


def full_matrix_top1(bank: torch.Tensor, bank_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                     k: int, temperature: float, classes: int) -> float:
    """Baseline: the whole (M, N) similarity matrix at once, topk, weighted vote, top-1 (%)."""
    sims = F.normalize(test.float(), dim=1) @ F.normalize(bank.float(), dim=1).T
    top_sims, top_idx = sims.topk(min(k, bank.shape[0]), dim=1)
    del sims
    scores = vote(top_sims, bank_labels[top_idx], temperature, classes)
    return 100.0 * (scores.argmax(dim=1) == test_labels).float().mean().item()


def bench_knn(bank: int, dim: int, test: int, k: int, chunk_size: int, bank_block: int | None, fp16_bank: bool,
              classes: int, repeats: int, *, method: str = "ours", temperature: float = 0.07, seed: int = 0,
              threads: int = 2) -> dict[str, Any]:
    """Time ``repeats`` k-NN evaluations (one top-k search) in this process; figures as a dict.

    ``method`` is "ours" (``knn_accuracies``) or "full" (``full_matrix_top1``; ignores chunk_size,
    bank_block and fp16_bank). With ``fp16_bank`` the raw bank is also generated in float16, as a
    pipeline that wants the memory saving would store it. Peak RSS covers this whole process; run one
    configuration per process (``main`` does) for per-configuration figures.
    """
    if method not in ("ours", "full"):
        raise ValueError(f"method must be 'ours' or 'full', got {method!r}")
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    store = torch.float16 if (fp16_bank and method == "ours") else torch.float32
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    bank_x, bank_y = clustered_features(bank, centres, gen, store)
    test_x, test_y = clustered_features(test, centres, gen)
    data_rss = repro.peak_rss_mb()
    times, top1 = [], float("nan")
    for _ in range(repeats):
        t0 = time.perf_counter()
        if method == "full":
            top1 = full_matrix_top1(bank_x, bank_y, test_x, test_y, k, temperature, classes)
        else:
            top1 = knn_accuracies(bank_x, bank_y, test_x, test_y, [k], temperature, classes, chunk_size,
                                  bank_block=bank_block, fp16_bank=fp16_bank)[k]["top1"]
        times.append(time.perf_counter() - t0)
    best = min(times)
    bank_bytes = (2 if store == torch.float16 else 4) * bank * dim  # the normalised copy that is searched
    peak = repro.peak_rss_mb()
    return {"method": method, "seconds": best, "seconds_all": times, "images_per_s": test / best,
            "peak_rss_mb": peak, "data_rss_mb": data_rss, "search_extra_mb": peak - data_rss,
            "normalised_bank_mb": bank_bytes / 2 ** 20, "top1": top1, "threads": threads,
            "config": {"bank": bank, "dim": dim, "test": test, "k": k, "chunk_size": chunk_size,
                       "bank_block": bank_block, "fp16_bank": fp16_bank, "classes": classes, "repeats": repeats}}


def _run_in_subprocess(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``bench_knn(**kwargs)`` in a fresh interpreter, so its peak RSS is this configuration's alone."""
    cmd = [sys.executable, "-m", "ssl_bench.bench.knn", "--one", json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the figures, one row per configuration."""
    head = ("| config | bank dtype | bank_block | s (best) | test img/s | peak RSS MiB "
            "| search extra MiB | top-1 % |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        c = r["config"]
        dtype = "float16" if c["fp16_bank"] and r["method"] == "ours" else "float32"
        block = c["bank_block"] if r["method"] == "ours" else "-"
        lines.append(f"| {r['name']} | {dtype} | {block} | {r['seconds']:.2f} | {r['images_per_s']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['search_extra_mb']:.0f} | {r['top1']:.2f} |")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``python -m ssl_bench.bench.knn`` and ``ssl-bench bench knn``)."""
    p.add_argument("--bank", type=int, default=100_000, help="bank size (train features)")
    p.add_argument("--dim", type=int, default=384, help="feature dimension")
    p.add_argument("--test", type=int, default=10_000, help="test features scored")
    p.add_argument("--k", type=int, default=200, help="neighbours searched (DINO searches max(ks) = 200)")
    p.add_argument("--chunk-size", type=int, default=1024)
    p.add_argument("--bank-block", type=int, default=16384, help="used by the 'blocked' and 'fp16' configs")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ssl_bench.bench.knn", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--json", dest="json_path", default=None, help="also write the figures to this JSON file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    return p


def run_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every selected configuration, each in its own subprocess, with a progress line per configuration."""
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown or not names:
        raise ValueError(f"--configs: unknown config(s) {unknown or names}; choose from {list(CONFIGS)}")
    rows = []
    for name in names:
        method, blocked, fp16 = CONFIGS[name]
        kwargs = {"bank": args.bank, "dim": args.dim, "test": args.test, "k": args.k, "chunk_size": args.chunk_size,
                  "bank_block": args.bank_block if blocked else None, "fp16_bank": fp16, "classes": args.classes,
                  "repeats": args.repeats, "method": method, "threads": args.threads}
        rows.append({"name": name, **_run_in_subprocess(kwargs)})
        print(f"[bench knn] {name}: {rows[-1]['images_per_s']:.0f} test img/s, "
              f"peak RSS {rows[-1]['peak_rss_mb']:.0f} MiB", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    """Run every selected configuration in its own subprocess, print a table, optionally write JSON."""
    args = _parser().parse_args(argv)
    if args.one is not None:
        print(json.dumps(bench_knn(**json.loads(args.one))))
        return 0
    try:
        rows = run_configs(args)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    print(format_table(rows))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"rows": rows, "torch": torch.__version__}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
