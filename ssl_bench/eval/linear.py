"""``ssl-bench eval linear``: the linear probe of a frozen backbone, from a config to its record.

Follows DINO (Caron et al. 2021, Sec. 4.1; facebookresearch/dino ``eval_linear.py``) and DINOv2
(Oquab et al. 2023; facebookresearch/dinov2 ``eval/linear.py``, ``create_linear_input``). This module
owns the data (train split with a held-out part, then test) and the frozen features of one forward
pass per batch; the grid of heads, its training and the choice of a head are ``linear_heads``.
Unlike both reference scripts, which pick the best head on the split they report, the head here is
chosen on a held-out part of the train split and the test split is read only after that choice.
Non-finite frozen features are an error (``NonFiniteFeaturesError``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_bench import dist
from ssl_bench.config import Config
from ssl_bench.data import (build_dataset, dataset_info, eval_transform, linear_train_transform, num_classes,
                            seeded_subset)
from ssl_bench.data.tensor_eval import eval_pipeline
from ssl_bench.eval.features import rank_loader
from ssl_bench.eval.finite import FiniteTally, check_finite
from ssl_bench.eval.linear_heads import (SELECTION_RULE, Batches, FeatureChoice, HeadSpec, Progress, feature_choices,
                                         head_grid, probe_heads, steps_per_epoch)
from ssl_bench.eval.protocol import EvalContext, Outcome, Protocol, arg, check_eval_size, register


class FrozenFeatures(NamedTuple):
    """What every feature choice is built from.

    cls_blocks: (B, n, D) CLS token of each of the last n blocks after the final norm, oldest first.
    mean_patch: (B, D) mean of the normed last-block patch tokens (registers excluded); None for CNNs.
    """

    cls_blocks: Tensor
    mean_patch: Optional[Tensor]


@dataclass
class LinearResult:
    """The chosen head (val-selected, then tested), every head's numbers, the protocol and timings."""

    chosen: dict[str, Any]
    grid: list[dict[str, Any]]
    protocol: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)


# ---- features ----------------------------------------------------------------------------


@torch.no_grad()
def frozen_features(backbone: nn.Module, images: Tensor, n_last_blocks: int) -> FrozenFeatures:
    """Per-block CLS tokens and the mean patch token from one forward pass (DINO ``get_intermediate_layers``).

    Args: backbone: ``Backbone`` in eval mode; images: (B, 3, H, W). timm's ``forward_intermediates``
    with ``norm=True`` applies the final norm to each of the last n block outputs, as DINO does.
    """
    if not backbone.is_vit:
        return FrozenFeatures(backbone(images).cls.float().unsqueeze(1), None)
    outs = backbone.model.forward_intermediates(images, indices=n_last_blocks, norm=True, return_prefix_tokens=True,
                                                output_fmt="NLC", intermediates_only=True)
    cls = torch.stack([prefix[:, 0] for _, prefix in outs], dim=1)
    return FrozenFeatures(cls.float(), outs[-1][0].float().mean(dim=1))


def linear_inputs(feats: FrozenFeatures, choices: Iterable[FeatureChoice]) -> dict[FeatureChoice, Tensor]:
    """Each distinct feature choice built once (DINOv2 ``create_linear_input``): (B, choice.dim(D)) each."""
    out = {}
    for c in dict.fromkeys(choices):
        parts = list(feats.cls_blocks[:, -c.n_last_blocks:].unbind(1))
        if c.avgpool:
            parts.append(feats.mean_patch)
        out[c] = torch.cat(parts, dim=1)
    return out


# ---- from a config: datasets, batch sources, the protocol record ------------------------------


def held_out_split(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, val) positions from a seeded permutation; val gets round(n * fraction), at least 1."""
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def probe_datasets(cfg: Config) -> tuple[Dataset, Dataset]:
    """(train part with the training transform, held-out val part with the eval transform) of the train split."""
    lin, info = cfg.linear, dataset_info(cfg.data.name)
    evaluate = eval_transform(cfg.data, info.mean, info.std)
    fit = linear_train_transform(cfg.data, info.mean, info.std) if lin.augment else evaluate
    as_tensor, _ = eval_pipeline(cfg.data, info.mean, info.std)
    if as_tensor is not None:  # data.multicrop=tensor: uint8 samples, the loader's collate_fn preprocesses
        evaluate = fit = as_tensor
    pool_fit = seeded_subset(build_dataset(cfg.data, "train", fit), lin.train_subset, cfg.seed)
    pool_eval = seeded_subset(build_dataset(cfg.data, "train", evaluate), lin.train_subset, cfg.seed)
    train_idx, val_idx = held_out_split(len(pool_eval), lin.val_fraction, cfg.seed)
    return Subset(pool_fit, train_idx), Subset(pool_eval, val_idx)


def probe_test_set(cfg: Config) -> Dataset:
    """The (seeded subset of the) test split with the eval transform; linear_probe builds it after selection."""
    info = dataset_info(cfg.data.name)
    as_tensor, _ = eval_pipeline(cfg.data, info.mean, info.std)
    test = build_dataset(cfg.data, "test", as_tensor or eval_transform(cfg.data, info.mean, info.std))
    return seeded_subset(test, cfg.linear.test_subset, cfg.seed)


def frozen_batches(backbone: nn.Module, loader: DataLoader, n_last_blocks: int,
                   device: str | torch.device) -> Iterator[tuple[FrozenFeatures, Tensor]]:
    """(frozen features, labels) of every batch of ``loader``, on ``device``.

    Under DDP each rank loads and forwards its slice of every batch (``rank_loader``) and the slices
    are all-gathered in rank order (one collective per batch), so every rank gets the single process's
    batches. Every rank must iterate to the end.
    """
    if dist.world_size() == 1:
        for images, labels in loader:
            yield frozen_features(backbone, images.to(device, non_blocking=True), n_last_blocks), labels.to(device)
        return
    n, dim = (n_last_blocks if backbone.is_vit else 1), backbone.embed_dim
    for batch in rank_loader(loader):
        if batch is None:  # an empty slice (a last batch smaller than the world): rows of the right width
            packed = torch.zeros(0, n * dim + (dim if backbone.is_vit else 0) + 1, device=device)
        else:
            feats = frozen_features(backbone, batch[0].to(device, non_blocking=True), n_last_blocks)
            parts = [feats.cls_blocks.flatten(1), *([] if feats.mean_patch is None else [feats.mean_patch])]
            packed = torch.cat([*parts, torch.as_tensor(batch[1]).to(device).float().unsqueeze(1)], dim=1)
        whole = dist.all_gather_cat(packed)  # labels ride along as floats: exact below 2^24 classes
        mean = whole[:, n * dim:-1] if backbone.is_vit else None
        yield FrozenFeatures(whole[:, :n * dim].reshape(-1, n, dim), mean), whole[:, -1].long()


def backbone_batches(backbone: nn.Module, loader: DataLoader, choices: Sequence[FeatureChoice],
                     device: str | torch.device, what: str = "linear-probe features") -> Batches:
    """One frozen forward pass per image batch (sharded over DDP ranks), every feature choice built from it.

    Non-finite features are counted on the device batch by batch and raise (``NonFiniteFeaturesError``,
    one host sync) when the pass ends, before its consumer reports an epoch or an accuracy.
    """
    n_max, tally = max(c.n_last_blocks for c in choices), FiniteTally(what)
    for feats, labels in frozen_batches(backbone, loader, n_max, device):
        tally.add(feats.cls_blocks, feats.mean_patch)
        yield linear_inputs(feats, choices), labels
    tally.check()


def extract_all(backbone: nn.Module, loader: DataLoader, choices: Sequence[FeatureChoice],
                device: str | torch.device) -> tuple[FrozenFeatures, Tensor]:
    """Fast mode: the frozen features of every image once (sharded over DDP ranks), kept on the CPU."""
    n_max, parts, labels = max(c.n_last_blocks for c in choices), [], []
    for feats, targets in frozen_batches(backbone, loader, n_max, device):
        mean = None if feats.mean_patch is None else feats.mean_patch.cpu()
        parts.append(FrozenFeatures(feats.cls_blocks.cpu(), mean))
        labels.append(targets.cpu())
    cls = torch.cat([p.cls_blocks for p in parts])
    mean = None if parts[0].mean_patch is None else torch.cat([p.mean_patch for p in parts])
    check_finite((cls, mean), "linear-probe train features")
    return FrozenFeatures(cls, mean), torch.cat(labels)


def tensor_batches(feats: FrozenFeatures, labels: Tensor, choices: Sequence[FeatureChoice], batch_size: int,
                   n_steps: int, generator: torch.Generator, device: str | torch.device) -> Batches:
    """``n_steps`` shuffled batches of precomputed features (one epoch of fast mode)."""
    perm = torch.randperm(len(labels), generator=generator)
    for i in range(n_steps):
        idx = perm[i * batch_size:(i + 1) * batch_size]
        part = FrozenFeatures(feats.cls_blocks[idx].to(device),
                              None if feats.mean_patch is None else feats.mean_patch[idx].to(device))
        yield linear_inputs(part, choices), labels[idx].to(device)


def _loader(cfg: Config, dataset: Dataset, train: bool) -> DataLoader:
    """Shuffled, seeded and augmented (``linear.augment``) batches when ``train``; with
    ``data.multicrop=tensor`` the preprocessing is the collate function's (data/tensor_eval.py)."""
    b, info = cfg.linear.batch_size, dataset_info(cfg.data.name)
    gen = torch.Generator().manual_seed(cfg.seed) if train else None
    _, collate = eval_pipeline(cfg.data, info.mean, info.std, train=train, augment=cfg.linear.augment)
    return DataLoader(dataset, batch_size=b, shuffle=train, drop_last=train and len(dataset) >= b,
                      generator=gen, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(),
                      collate_fn=collate)


def linear_probe(backbone: nn.Module, cfg: Config, device: str | torch.device = "cpu",
                 progress: Progress = None) -> LinearResult:
    """The whole protocol on ``cfg.data``: grid of heads, held-out selection, then the test split.

    ``backbone`` is a ``Backbone``; it is frozen (eval mode, no grad) and its mode restored after.
    Under DDP every rank must call it: each extracts its slice of every batch, the slices are
    all-gathered, and every rank trains the same heads on the same features.
    """
    was_training = backbone.training
    backbone.eval()
    try:
        return _linear_probe(backbone, cfg, device, progress)
    finally:
        backbone.train(was_training)


def _linear_probe(backbone: nn.Module, cfg: Config, device: str | torch.device, progress: Progress) -> LinearResult:
    lin, start = cfg.linear, time.time()
    depth = len(backbone.model.blocks) if backbone.is_vit else 1
    choices, note = feature_choices(lin, backbone.is_vit, depth)
    specs = head_grid(lin.lrs, choices, lin.batch_size)
    train_set, val_set = probe_datasets(cfg)
    n_steps = steps_per_epoch(len(train_set), lin.batch_size)
    train, extract_s = _train_source(backbone, cfg, train_set, choices, n_steps, device, progress)
    sizes: dict[str, int] = {"train_size": len(train_set), "val_size": len(val_set)}

    def test() -> Batches:  # built on demand: probe_heads calls it after the head is chosen
        test_set = probe_test_set(cfg)
        sizes["test_size"] = len(test_set)
        return backbone_batches(backbone, _loader(cfg, test_set, False), choices, device,
                                "linear-probe test features")

    dims = {c: c.dim(backbone.embed_dim) for c in choices}
    val = lambda: backbone_batches(backbone, _loader(cfg, val_set, False), choices, device,  # noqa: E731
                                   "linear-probe val features")
    chosen, grid, timing = probe_heads(specs, dims, num_classes(cfg.data), train, val, test, lin, n_steps,
                                       device, cfg.seed, progress)
    timing = {**timing, "extract_s": extract_s, "total_s": time.time() - start}
    protocol = linear_protocol(cfg, specs, choices, note, n_steps, sizes, backbone.is_vit)
    if progress is not None:
        progress(f"[ssl-bench] linear: chose {chosen['name']} (val top-1 {chosen['val_top1']:.2f}%), "
                 f"test top-1 {chosen['test_top1']:.2f}%, top-5 {chosen['test_top5']:.2f}%")
    return LinearResult(chosen, grid, protocol, {k: round(v, 3) for k, v in timing.items()})


def _train_source(backbone: nn.Module, cfg: Config, train_set: Dataset, choices: Sequence[FeatureChoice],
                  n_steps: int, device: str | torch.device,
                  progress: Progress) -> tuple[Callable[[int], Batches], float]:
    """Augment mode: a fresh frozen pass over augmented images each epoch. Fast mode: features once."""
    if cfg.linear.augment:
        loader = _loader(cfg, train_set, True)
        return (lambda epoch: backbone_batches(backbone, loader, choices, device,
                                               f"linear-probe train features (epoch {epoch + 1})")), 0.0
    t0 = time.time()
    if progress is not None:
        progress(f"[ssl-bench] linear (fast mode): extracting features of {len(train_set)} train images once")
    feats, labels = extract_all(backbone, _loader(cfg, train_set, False), choices, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    b = cfg.linear.batch_size
    return (lambda epoch: tensor_batches(feats, labels, choices, b, n_steps, gen, device)), time.time() - t0


def linear_protocol(cfg: Config, specs: Sequence[HeadSpec], choices: Sequence[FeatureChoice], note: str,
                    n_steps: int, sizes: dict[str, int], is_vit: bool) -> dict[str, Any]:
    """Everything needed to reproduce the linear numbers, stored next to them."""
    lin, crop = cfg.linear, cfg.data.eval_crop_size
    lrs = list(dict.fromkeys(s.lr for s in specs))
    features = ("concatenated CLS tokens of the last n blocks, each after the final norm, + (avgpool) mean of the "
                "normed last-block patch tokens" if is_vit else "pooled final feature map")
    return {
        "follows": "DINO (Caron et al. 2021) Sec. 4.1 eval_linear.py; DINOv2 (Oquab et al. 2023) eval/linear.py",
        "lrs": lrs, "scaled_lrs": [lr * lin.batch_size / 256.0 for lr in lrs], "lr_scaling": "lr * batch_size / 256",
        "n_last_blocks": sorted({c.n_last_blocks for c in choices}),
        "avgpool": sorted({c.avgpool for c in choices}), "grid_note": note, "heads": len(specs),
        "epochs": lin.epochs, "batch_size": lin.batch_size, "steps_per_epoch": n_steps,
        "total_steps": lin.epochs * n_steps, "optimizer": "SGD", "momentum": lin.momentum,
        "weight_decay": lin.weight_decay, "schedule": "cosine",
        "schedule_detail": "per step t of T = epochs * steps_per_epoch: lr * (1 + cos(pi t / T)) / 2",
        "init": "weight ~ N(0, 0.01), bias 0", "loss": "cross-entropy per head, summed over heads",
        "augment": lin.augment, "mode": "augment" if lin.augment else "fast",
        "train_transform": (f"RandomResizedCrop({crop}, scale (0.08, 1), bicubic) + horizontal flip, through "
                            f"the frozen backbone every epoch" if lin.augment else
                            "fast mode: frozen features of the eval-transformed train images, extracted once"),
        "eval_transform": f"resize {cfg.data.eval_resize} (bicubic) + centre crop {crop}",
        "image_size": crop, "features": features, "dataset": cfg.data.name, "val_fraction": lin.val_fraction,
        **sizes, "train_subset": lin.train_subset, "test_subset": lin.test_subset, "seed": cfg.seed,
        "selection": SELECTION_RULE, "ranks": dist.world_size(),
    }


def _run(ctx: EvalContext, opts: SimpleNamespace) -> Outcome:
    check_eval_size(ctx)
    result = linear_probe(ctx.backbone, ctx.cfg, device=ctx.device, progress=ctx.log)
    chosen = result.chosen
    metrics = {"linear_top1": chosen["test_top1"], "linear_top5": chosen["test_top5"],
               "linear_val_top1": chosen["val_top1"]}
    return Outcome(metrics, result.protocol, result.timing, {"chosen": chosen, "grid": result.grid})


def _show(out: Outcome, opts: SimpleNamespace) -> None:
    import pandas as pd

    grid, c = out.extra["grid"], out.extra["chosen"]
    print(pd.DataFrame(grid).sort_values("val_top1", ascending=False).head(opts.show).to_markdown(
        index=False, floatfmt=".4g"))
    print(f"chosen on the held-out split: {c['name']} (val top-1 {c['val_top1']:.2f}%) -> test top-1 "
          f"{c['test_top1']:.2f}%, top-5 {c['test_top5']:.2f}%; {len(grid)} heads; record: {out.record}")


register(Protocol("linear", "linear-probe grid, head chosen on a held-out train split", _run, _show,
                  section="linear", sharded=True, arguments=(arg("--show", type=int, default=10,
                                                   help="grid rows to print (best validation first)"),)))
