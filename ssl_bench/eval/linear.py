"""Linear probe on a frozen backbone: a grid of heads trained from one forward pass, chosen on held-out data.

Follows DINO (Caron et al. 2021, Sec. 4.1; facebookresearch/dino ``eval_linear.py``) and DINOv2
(Oquab et al. 2023; facebookresearch/dinov2 ``eval/linear.py``: ``create_linear_input``, the lr x
n_last_blocks x avgpool grid, SGD momentum 0.9, lr * batch / 256, per-iteration cosine to 0).
Unlike both reference scripts, which pick the best head on the split they report, the head here is
chosen on a held-out part of the train split and the test split is read only after that choice.
Heads that read the same feature choice are one stacked weight tensor and one matmul; a small SGD
step with a per-head lr vector gives each head the update ``torch.optim.SGD`` would.
Non-finite frozen features are an error (``NonFiniteFeaturesError``); a head whose logits are not
finite gets NaN accuracies and is never chosen, and the chosen head must score the test split finitely.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ssl_bench.config import Config, LinearConfig
from ssl_bench.data import (build_dataset, dataset_info, eval_transform, linear_train_transform, num_classes,
                            seeded_subset)
from ssl_bench.eval.finite import FiniteTally, NonFiniteFeaturesError, check_finite
from ssl_bench.schedules import cosine

SELECTION_RULE = ("best val top-1 on a held-out split of train (ties: smaller lr, then fewer blocks, then no "
                  "avgpool; heads with non-finite logits are never chosen); test never used for selection")
Progress = Optional[Callable[[str], None]]
Batches = Iterable[tuple[dict["FeatureChoice", Tensor], Tensor]]


class FeatureChoice(NamedTuple):
    """CLS tokens of the last ``n_last_blocks`` blocks, plus the mean last-block patch token if ``avgpool``."""

    n_last_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"blocks{self.n_last_blocks}_avgpool{int(self.avgpool)}"

    def dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_last_blocks + int(self.avgpool))


class FrozenFeatures(NamedTuple):
    """What every feature choice is built from.

    cls_blocks: (B, n, D) CLS token of each of the last n blocks after the final norm, oldest first.
    mean_patch: (B, D) mean of the normed last-block patch tokens (registers excluded); None for CNNs.
    """

    cls_blocks: Tensor
    mean_patch: Optional[Tensor]


@dataclass(frozen=True)
class HeadSpec:
    """One linear head: its base lr (at batch 256), the lr it trains with, and its feature choice."""

    lr: float
    scaled_lr: float
    choice: FeatureChoice

    @property
    def name(self) -> str:
        return f"{self.choice.name}_lr{self.lr:g}"


@dataclass
class LinearResult:
    """The chosen head (val-selected, then tested), every head's numbers, the protocol and timings."""

    chosen: dict[str, Any]
    grid: list[dict[str, Any]]
    protocol: dict[str, Any]
    timing: dict[str, float] = field(default_factory=dict)


# ---- the grid ----------------------------------------------------------------------------


def feature_choices(lin: LinearConfig, is_vit: bool, depth: int) -> tuple[list[FeatureChoice], str]:
    """The valid (n_last_blocks, avgpool) pairs for this backbone, and a note on what was dropped.

    CNNs have one pooled feature, so their grid collapses to n_last_blocks=1 without avgpool.
    """
    if not is_vit:
        return [FeatureChoice(1, False)], "CNN: pooled feature only (n_last_blocks=1, no avgpool)"
    ns = sorted({n for n in lin.n_last_blocks if n <= depth})
    if not ns:
        raise ValueError(f"linear.n_last_blocks={lin.n_last_blocks}: the backbone has only {depth} blocks")
    dropped = sorted({n for n in lin.n_last_blocks if n > depth})
    note = f"n_last_blocks {dropped} dropped: the backbone has {depth} blocks" if dropped else ""
    return [FeatureChoice(n, a) for n in ns for a in sorted(set(lin.avgpool))], note


def head_grid(lrs: Sequence[float], choices: Sequence[FeatureChoice], batch_size: int) -> list[HeadSpec]:
    """Every (feature choice, lr) head, lrs scaled by ``batch_size / 256`` as DINOv2's ``scale_lr``."""
    unique = list(dict.fromkeys(float(lr) for lr in lrs))
    return [HeadSpec(lr, lr * batch_size / 256.0, c) for c in choices for lr in unique]


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


# ---- heads and their optimiser -------------------------------------------------------------


class LinearHeads(nn.Module):
    """All heads; those sharing a feature choice are one (H_g, C, D_g) weight and (H_g, C) bias.

    Init as DINO/DINOv2 ``LinearClassifier``: weight ~ N(0, 0.01), bias 0.
    """

    def __init__(self, specs: Sequence[HeadSpec], dims: dict[FeatureChoice, int], num_classes: int,
                 seed: int = 0) -> None:
        super().__init__()
        self.choices = list(dict.fromkeys(s.choice for s in specs))
        members = [[i for i, s in enumerate(specs) if s.choice == c] for c in self.choices]
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList(torch.randn(len(m), num_classes, dims[c], generator=gen) * 0.01
                                        for m, c in zip(members, self.choices))
        self.biases = nn.ParameterList(torch.zeros(len(m), num_classes) for m in members)
        # Heads are stored group-major; ``order`` maps back so callers index heads as they index specs.
        self.register_buffer("spec_index", torch.tensor([i for m in members for i in m]))
        self.register_buffer("order", torch.argsort(self.spec_index))
        self.register_buffer("lrs", torch.tensor([s.scaled_lr for s in specs]))
        self.grouped_in_order = self.spec_index.equal(torch.arange(len(specs)))  # head_grid's order: no reindexing

    def forward(self, inputs: dict[FeatureChoice, Tensor]) -> Tensor:
        """Args: inputs: (B, D_g) per feature choice. Returns logits (B, H, C) in spec order."""
        logits = []
        for c, w, b in zip(self.choices, self.weights, self.biases):
            h, k, d = w.shape  # one GEMM for the group: (B, D) x (D, H*C)
            logits.append(torch.addmm(b.reshape(-1), inputs[c], w.reshape(h * k, d).T).view(-1, h, k))
        logits = torch.cat(logits, dim=1)
        return logits if self.grouped_in_order else logits[:, self.order]

    def per_head(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(weight (C, D), bias (C,)) of each head in spec order (views)."""
        flat = [(w[j], b[j]) for w, b in zip(self.weights, self.biases) for j in range(w.shape[0])]
        for i in self.order.tolist():
            yield flat[i]


class StackedSGD:
    """``torch.optim.SGD`` (momentum, weight decay, no dampening/nesterov) with a per-head lr.

    ``step(factor)`` uses lr = head lr * factor, so the schedule stays a function of the global step.
    """

    def __init__(self, heads: LinearHeads, momentum: float = 0.9, weight_decay: float = 0.0) -> None:
        self.momentum, self.weight_decay = momentum, weight_decay
        self.params = list(heads.weights) + list(heads.biases)
        self.bufs = [torch.zeros_like(p) for p in self.params]
        sizes = [w.shape[0] for w in heads.weights]
        group_lrs = heads.lrs[heads.spec_index].split(sizes)
        self.lrs = [lr.view(-1, 1, 1) for lr in group_lrs] + [lr.view(-1, 1) for lr in group_lrs]

    @torch.no_grad()
    def step(self, factor: float = 1.0) -> None:
        for p, buf, lr in zip(self.params, self.bufs, self.lrs):
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            buf.mul_(self.momentum).add_(grad)  # zero buffer at step 0 = torch's clone of the first grad
            p.sub_(buf * (lr * factor))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None


def lr_factor(step: int, total_steps: int) -> float:
    """Per-iteration cosine from 1 to 0 (DINOv2: ``CosineAnnealingLR(max_iter, eta_min=0)``)."""
    return cosine(step, total_steps, 1.0, 0.0)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Full batches only (DINOv2 drops the last), but one partial batch if the set is smaller than one."""
    return max(n // batch_size, 1) if n else 0


# ---- train, evaluate, select ----------------------------------------------------------------


def train_heads(heads: LinearHeads, opt: StackedSGD, batches: Callable[[int], Batches], epochs: int,
                n_steps: int, progress: Progress = None) -> list[Tensor]:
    """Train every head on ``batches(epoch)``; the loss is the sum of the heads' mean cross-entropies.

    ``n_steps`` per epoch sets the cosine horizon. Returns each epoch's mean loss per head, (H,) each.
    """
    total, step, start, history = epochs * n_steps, 0, time.time(), []
    for epoch in range(epochs):
        loss_sum, count = heads.lrs.new_zeros(len(heads.lrs)), 0
        for inputs, labels in batches(epoch):
            logits = heads(inputs)
            targets = labels.view(-1, 1).expand(-1, logits.shape[1])
            per_head = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(0)
            opt.zero_grad()
            per_head.sum().backward()
            opt.step(lr_factor(step, total))
            loss_sum, count, step = loss_sum + per_head.detach(), count + 1, step + 1
        history.append(loss_sum / max(count, 1))
        _report_epoch(progress, epoch, epochs, history[-1], time.time() - start)
    return history


def _report_epoch(progress: Progress, epoch: int, epochs: int, loss: Tensor, elapsed: float) -> None:
    if progress is not None:
        eta = elapsed / (epoch + 1) * (epochs - epoch - 1)
        progress(f"[ssl-bench] linear epoch {epoch + 1}/{epochs}: loss best head {loss.min().item():.4f}, "
                 f"mean of {len(loss)} heads {loss.mean().item():.4f}, {elapsed:.1f} s, ETA {eta:.1f} s")


class HeadScores(NamedTuple):
    """Top-1/top-5 accuracy (%) per head, (H,) each in spec order, NaN for a head with a non-finite logit.

    nonfinite: (H, 3) long per head: samples with a non-finite logit, NaN logits, inf logits.
    """

    top1: Tensor
    top5: Tensor
    nonfinite: Tensor
    samples: int
    classes: int

    def error(self, head: int, what: str) -> NonFiniteFeaturesError:
        bad_rows, nan, inf = self.nonfinite[head].tolist()
        return NonFiniteFeaturesError(what, bad_rows, self.samples, nan, inf, self.samples * self.classes)


@torch.no_grad()
def evaluate_heads(heads: LinearHeads, batches: Batches) -> HeadScores:
    """Accuracies of every head; a NaN logit would rank first (``topk``), so such a head scores NaN."""
    top1 = top5 = heads.lrs.new_zeros(len(heads.lrs))
    bad = torch.zeros(len(heads.lrs), 3, dtype=torch.long, device=heads.lrs.device)
    n = classes = 0
    for inputs, labels in batches:
        logits = heads(inputs)
        bad += torch.stack([(~torch.isfinite(logits).all(2)).sum(0), logits.isnan().sum((0, 2)),
                            logits.isinf().sum((0, 2))], dim=1)
        ranked = logits.topk(min(5, logits.shape[2]), dim=2).indices
        hits = ranked == labels.view(-1, 1, 1)
        top1, top5, n, classes = top1 + hits[..., 0].sum(0), top5 + hits.any(2).sum(0), n + len(labels), logits.shape[2]
    if n == 0:
        raise ValueError("evaluate_heads: no data")
    diverged = bad[:, 0] > 0
    return HeadScores((100.0 * top1 / n).masked_fill(diverged, math.nan),
                      (100.0 * top5 / n).masked_fill(diverged, math.nan), bad, n, classes)


def select_head(specs: Sequence[HeadSpec], val_top1: Sequence[float]) -> int:
    """Index of the best val top-1; ties go to the smaller lr, then fewer blocks, then no avgpool; NaN last."""
    keys = [(math.isnan(acc), 0.0 if math.isnan(acc) else -float(acc), s.lr, s.choice.n_last_blocks,
             s.choice.avgpool) for s, acc in zip(specs, val_top1)]
    return min(range(len(specs)), key=keys.__getitem__)


def probe_heads(specs: Sequence[HeadSpec], dims: dict[FeatureChoice, int], n_classes: int,
                train: Callable[[int], Batches], val: Callable[[], Batches], test: Callable[[], Batches],
                lin: LinearConfig, n_steps: int, device: str | torch.device = "cpu", seed: int = 0,
                progress: Progress = None) -> tuple[dict, list[dict], dict]:
    """Train the grid, choose on ``val()``, and only then call ``test()``: (chosen, grid, timing)."""
    t0 = time.time()
    heads = LinearHeads(specs, dims, n_classes, seed).to(device)
    train_heads(heads, StackedSGD(heads, lin.momentum, lin.weight_decay), train, lin.epochs, n_steps, progress)
    t1 = time.time()
    val_scores = evaluate_heads(heads, val())
    val_top1 = val_scores.top1.tolist()
    if all(math.isnan(acc) for acc in val_top1):
        least = int(val_scores.nonfinite[:, 0].argmin())
        raise val_scores.error(least, f"linear-probe val logits: all {len(specs)} heads are non-finite; the least "
                                      f"affected, {specs[least].name}")
    best = select_head(specs, val_top1)
    t2 = time.time()
    test_scores = evaluate_heads(heads, test())  # first read of the test split
    test_top1, test_top5 = test_scores.top1.tolist(), test_scores.top5.tolist()
    if math.isnan(test_top1[best]):
        raise test_scores.error(best, f"linear-probe test logits of the chosen head {specs[best].name}")
    grid = [{"name": s.name, "lr": s.lr, "scaled_lr": s.scaled_lr, "n_last_blocks": s.choice.n_last_blocks,
             "avgpool": s.choice.avgpool, "val_top1": val_top1[i], "test_top1": test_top1[i]}
            for i, s in enumerate(specs)]
    chosen = {**grid[best], "test_top5": test_top5[best]}
    timing = {"train_s": t1 - t0, "val_s": t2 - t1, "test_s": time.time() - t2, "steps": lin.epochs * n_steps}
    return chosen, grid, timing


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
    pool_fit = seeded_subset(build_dataset(cfg.data, "train", fit), lin.train_subset, cfg.seed)
    pool_eval = seeded_subset(build_dataset(cfg.data, "train", evaluate), lin.train_subset, cfg.seed)
    train_idx, val_idx = held_out_split(len(pool_eval), lin.val_fraction, cfg.seed)
    return Subset(pool_fit, train_idx), Subset(pool_eval, val_idx)


def probe_test_set(cfg: Config) -> Dataset:
    """The (seeded subset of the) test split with the eval transform; linear_probe builds it after selection."""
    info = dataset_info(cfg.data.name)
    test = build_dataset(cfg.data, "test", eval_transform(cfg.data, info.mean, info.std))
    return seeded_subset(test, cfg.linear.test_subset, cfg.seed)


def backbone_batches(backbone: nn.Module, loader: Iterable, choices: Sequence[FeatureChoice],
                     device: str | torch.device, what: str = "linear-probe features") -> Batches:
    """One frozen forward pass per image batch, every feature choice built from it.

    Non-finite features are counted on the device batch by batch and raise (``NonFiniteFeaturesError``,
    one host sync) when the pass ends, before its consumer reports an epoch or an accuracy.
    """
    n_max, tally = max(c.n_last_blocks for c in choices), FiniteTally(what)
    for images, labels in loader:
        feats = frozen_features(backbone, images.to(device, non_blocking=True), n_max)
        tally.add(feats.cls_blocks, feats.mean_patch)
        yield linear_inputs(feats, choices), labels.to(device)
    tally.check()


def extract_all(backbone: nn.Module, loader: Iterable, choices: Sequence[FeatureChoice],
                device: str | torch.device) -> tuple[FrozenFeatures, Tensor]:
    """Fast mode: the frozen features of every image once, kept on the CPU."""
    n_max, parts, labels = max(c.n_last_blocks for c in choices), [], []
    for images, targets in loader:
        parts.append(frozen_features(backbone, images.to(device, non_blocking=True), n_max))
        labels.append(torch.as_tensor(targets))
    cls = torch.cat([p.cls_blocks.cpu() for p in parts])
    mean = None if parts[0].mean_patch is None else torch.cat([p.mean_patch.cpu() for p in parts])
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
    b = cfg.linear.batch_size
    gen = torch.Generator().manual_seed(cfg.seed) if train else None
    return DataLoader(dataset, batch_size=b, shuffle=train, drop_last=train and len(dataset) >= b,
                      generator=gen, num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())


def linear_probe(backbone: nn.Module, cfg: Config, device: str | torch.device = "cpu",
                 progress: Progress = None) -> LinearResult:
    """The whole protocol on ``cfg.data``: grid of heads, held-out selection, then the test split.

    ``backbone`` is a ``Backbone``; it is frozen (eval mode, no grad) and its mode restored after.
    Single process: under DDP call it on one rank.
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
        "selection": SELECTION_RULE, "ranks": 1,
    }
