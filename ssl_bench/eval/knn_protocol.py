"""The DINO k-NN protocol end to end: eval preprocessing, frozen features, weighted vote, protocol record.

Caron et al. 2021 Sec. 4.1 and facebookresearch/dino ``eval_knn.py``: resize + centre crop, final CLS
after norm (pooled features for ResNets), L2 normalisation, vote weight exp(sim / T), T = 0.07,
k in {10, 20, 100, 200}. Under DDP every rank extracts its share of the bank and of the test set;
the test features are all-gathered and the bank stays sharded (``knn_accuracies(sharded=True)``).
Registered as the ``knn`` evaluation (settings: the ``eval`` section); training's k-NN calls ``run_knn``.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from ssl_bench import dist
from ssl_bench.config import Config
from ssl_bench.data import dataset_info, eval_loaders, num_classes
from ssl_bench.eval.features import FeatureCache, cached_features
from ssl_bench.eval.knn import knn_accuracies
from ssl_bench.eval.protocol import EvalContext, Outcome, Protocol, arg, check_eval_size, register

KNN_TOP1 = "knn_top1"


def feature_spec(cfg: Config, split: str, subset: int | None) -> dict[str, Any]:
    """What determines the extracted features besides the weights (the feature cache key)."""
    info = dataset_info(cfg.data.name)
    return {"dataset": cfg.data.name, "root": cfg.data.root, "split": split, "subset": subset,
            "subset_seed": cfg.seed, "eval_resize": cfg.data.eval_resize, "eval_crop_size": cfg.data.eval_crop_size,
            "mean": list(info.mean), "std": list(info.std), "features": "cls"}


def knn_protocol(cfg: Config, feature_description: str = "teacher backbone CLS after norm (pooled for CNNs)"
                 ) -> dict[str, Any]:
    """How the k-NN numbers were computed, stored next to them."""
    e = cfg.eval
    return {"k": e.knn_report_k, "ks": list(e.knn_k), "temperature": e.knn_temperature,
            "features": f"{feature_description}, L2-normalised", "vote": "sum of exp(cos_sim / T) per class",
            "bank": f"{cfg.data.name} train" + (f" subset {e.bank_subset} (seed {cfg.seed})" if e.bank_subset else ""),
            "test": f"{cfg.data.name} test" + (f" subset {e.test_subset} (seed {cfg.seed})" if e.test_subset else ""),
            "eval_resize": cfg.data.eval_resize, "eval_crop_size": cfg.data.eval_crop_size,
            "bank_dtype": "float16" if e.knn_fp16_bank else "float32", "bank_block": e.knn_bank_block,
            "chunk_size": e.chunk_size, "ranks": dist.world_size(), "follows": "DINO (Caron et al. 2021) Sec. 4.1"}


def run_knn(cfg: Config, backbone: nn.Module, suffix: str = "", cache: FeatureCache | None = None,
            weights: str | None = None, device: torch.device | str = "cpu",
            progress: Callable[[str], Callable[[int, int], None] | None] | None = None,
            log: Callable[[str], None] = print) -> Outcome:
    """k-NN top-1/top-5 for every k in ``cfg.eval.knn_k``; ``knn_top1{suffix}`` is at ``eval.knn_report_k``.

    Every rank of a DDP job must call this (collectives); all ranks return the same numbers.
    ``cache``/``weights`` (a hash of the backbone) enable the on-disk feature cache; the outcome's
    ``extra["feature_cache_hits"]`` counts the feature sets read from it (bank, test).
    """
    bank_loader, test_loader = eval_loaders(cfg)
    e = cfg.eval
    log(f"[ssl-bench] k-NN{' (' + suffix.strip('_') + ')' if suffix else ''}: {len(bank_loader.dataset)} bank / "
        f"{len(test_loader.dataset)} test images, {dist.world_size()} rank(s)")
    t0 = time.time()
    hits_before = cache.hits if cache is not None else 0
    bar = progress or (lambda label: None)
    bank, bank_labels, _ = cached_features(backbone, bank_loader, feature_spec(cfg, "train", e.bank_subset),
                                           cache, weights, device, bar("bank features"))
    test, test_labels, _ = cached_features(backbone, test_loader, feature_spec(cfg, "test", e.test_subset),
                                           cache, weights, device, bar("test features"))
    test, test_labels = dist.all_gather_cat(test), dist.all_gather_cat(test_labels)
    extract_s = time.time() - t0
    accs = knn_accuracies(bank, bank_labels, test, test_labels, list(e.knn_k), e.knn_temperature,
                          num_classes(cfg.data), e.chunk_size, bank_block=e.knn_bank_block,
                          fp16_bank=e.knn_fp16_bank, sharded=dist.world_size() > 1)
    metrics = {f"{KNN_TOP1}{suffix}": accs[e.knn_report_k]["top1"], f"knn_top5{suffix}": accs[e.knn_report_k]["top5"]}
    for k, acc in accs.items():
        metrics[f"knn_k{k}_top1{suffix}"] = acc["top1"]
    hits = (cache.hits - hits_before) if cache is not None else 0
    log(f"[ssl-bench] k-NN k={e.knn_report_k} top-1 = {metrics[KNN_TOP1 + suffix]:.2f}% "
        f"(features {extract_s:.1f} s{', from cache' if hits == 2 else ''}, "
        f"scoring {time.time() - t0 - extract_s:.1f} s)")
    return Outcome(metrics, knn_protocol(cfg), {"extract_s": round(extract_s, 2),
                                                "total_s": round(time.time() - t0, 2)}, {"feature_cache_hits": hits})


def _run(ctx: EvalContext, opts: SimpleNamespace) -> Outcome:
    check_eval_size(ctx)
    return run_knn(ctx.cfg, ctx.backbone, cache=None if opts.no_cache else ctx.cache, weights=ctx.weights,
                   device=ctx.device, progress=ctx.progress, log=ctx.log)


def _show(out: Outcome, opts: SimpleNamespace) -> None:
    import pandas as pd

    m, p = out.metrics, out.protocol
    print(pd.DataFrame([{"k": str(k), "top-1 (%)": m[f"knn_k{k}_top1"]} for k in p["ks"]]).to_markdown(
        index=False, floatfmt=".2f"))
    print(f"k={p['k']}: top-1 {m[KNN_TOP1]:.2f}%, top-5 {m['knn_top5']:.2f}% (T={p['temperature']}); "
          f"record: {out.record}")


register(Protocol("knn", "weighted k-NN (DINO protocol)", _run, _show, section="eval", sharded=True,
                  arguments=(arg("--no-cache", action="store_true",
                                 help="neither read nor write the feature cache"),)))
