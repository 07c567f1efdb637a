"""The linear-probe grid: heads trained together on frozen features, scored, and one chosen on held-out data.

Follows DINOv2 (Oquab et al. 2023; facebookresearch/dinov2 ``eval/linear.py``: the lr x n_last_blocks x
avgpool grid, SGD momentum 0.9, lr * batch / 256, per-iteration cosine to 0). Heads that read the same
feature choice are one stacked weight tensor and one matmul; a small SGD step with a per-head lr
vector gives each head the update ``torch.optim.SGD`` would. A head whose logits are not finite gets
NaN accuracies and is never chosen, and the chosen head must score the test split finitely.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_bench.config import LinearConfig
from ssl_bench.eval.finite import NonFiniteFeaturesError
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


@dataclass(frozen=True)
class HeadSpec:
    """One linear head: its base lr (at batch 256), the lr it trains with, and its feature choice."""

    lr: float
    scaled_lr: float
    choice: FeatureChoice

    @property
    def name(self) -> str:
        return f"{self.choice.name}_lr{self.lr:g}"


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
