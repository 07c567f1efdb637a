"""Frozen-backbone feature extraction: per-rank shards under DDP, and an on-disk cache keyed by the weights."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ssl_bench import dist
from ssl_bench.backbones.checkpoints import weights_sha256 as checkpoint_sha256

CACHE_VERSION = 1  # bump when the stored layout changes, so old files are not misread


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features (N, D) and labels (N,) of every batch; the backbone is put in eval mode.

    The backbone must return an object with a ``cls`` field (``Features``).
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else -1
    for i, (images, targets) in enumerate(loader):
        feats.append(backbone(images.to(device, non_blocking=True)).cls.float().cpu())
        labels.append(torch.as_tensor(targets))
        if progress is not None:
            progress(i + 1, total)
    backbone.train(was_training)
    if not feats:
        return torch.zeros(0, getattr(backbone, "embed_dim", 0)), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def rank_shard(dataset: Dataset) -> tuple[Dataset, int]:
    """This rank's contiguous share of ``dataset`` and the global index of its first row."""
    world = dist.world_size()
    if world == 1:
        return dataset, 0
    start, stop = dist.shard_range(len(dataset), dist.rank(), world)
    return Subset(dataset, range(start, stop)), start


def loader_like(loader: DataLoader, dataset: Dataset) -> DataLoader:
    """The same loader settings (collate function included) over another dataset (a rank's shard)."""
    return DataLoader(dataset, batch_size=loader.batch_size, shuffle=False, drop_last=False,
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn)


class RankSlices(Sampler):
    """This rank's contiguous slice of every batch of ``batches`` (a batch sampler, the same on every rank).

    Every rank draws the same global batches (the same seeded shuffle) and loads only its rows of each,
    so the batches all-gathered back in rank order are the single process's batches, image for image.
    A slice may be empty (a last batch smaller than the world).
    """

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            start, stop = dist.shard_range(len(batch), self.rank, self.world)
            yield list(batch)[start:stop]

    def __len__(self) -> int:
        return len(self.batches)


class _NoneWhenEmpty:
    """A collate function that gives None for an empty slice instead of failing on it."""

    def __init__(self, collate: Callable) -> None:
        self.collate = collate

    def __call__(self, samples: list) -> Any:
        return self.collate(samples) if samples else None


def rank_loader(loader: DataLoader) -> DataLoader:
    """``loader`` itself in one process; under DDP the same settings loading this rank's slice of each
    batch (an empty slice is None)."""
    world = dist.world_size()
    if world == 1:
        return loader
    return DataLoader(loader.dataset, batch_sampler=RankSlices(loader.batch_sampler, dist.rank(), world),
                      num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                      collate_fn=_NoneWhenEmpty(loader.collate_fn))


def weights_sha256(module: nn.Module) -> str:
    """The feature cache's model key: :func:`ssl_bench.backbones.checkpoints.weights_sha256` of its state."""
    return checkpoint_sha256(module.state_dict())


class FeatureCache:
    """Extracted features on disk, one file per (weights, data, preprocessing, feature kind, shard).

    ``directory`` is ``<run_dir>/features`` for runs and a user cache for imported checkpoints.
    Files are written atomically (temp + rename); an unreadable file is ignored and rewritten.
    """

    def __init__(self, directory: Path | str | None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.hits = 0

    def key(self, weights: str, spec: dict[str, Any]) -> str:
        blob = json.dumps({"v": CACHE_VERSION, "weights": weights, **spec}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def path(self, weights: str, spec: dict[str, Any]) -> Path | None:
        return None if self.directory is None else self.directory / f"{self.key(weights, spec)}.pt"

    def load(self, weights: str, spec: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        path = self.path(weights, spec)
        if path is None or not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
            features, labels = stored["features"], stored["labels"]
        except Exception as exc:  # a truncated file from a killed job: recompute rather than fail
            print(f"[ssl-bench] feature cache {path} unreadable ({type(exc).__name__}); recomputing", flush=True)
            return None
        self.hits += 1
        return features, labels

    def save(self, weights: str, spec: dict[str, Any], features: torch.Tensor, labels: torch.Tensor) -> None:
        path = self.path(weights, spec)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"features": features, "labels": labels, "spec": json.dumps(spec, sort_keys=True, default=str),
                    "weights": weights}, tmp)
        os.replace(tmp, path)


def cached_features(backbone: nn.Module, loader: DataLoader, spec: dict[str, Any], cache: FeatureCache | None,
                    weights: str | None, device: torch.device | str = "cpu",
                    progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """This rank's shard of the loader's features and labels, from the cache when present.

    Returns (features (n, D), labels (n,), global index of the first row).
    """
    shard, offset = rank_shard(loader.dataset)
    spec = {**spec, "rows": [offset, offset + len(shard)], "of": len(loader.dataset)}
    use_cache = cache is not None and weights is not None
    if use_cache and (hit := cache.load(weights, spec)) is not None:
        return hit[0], hit[1], offset
    features, labels = extract_features(backbone, loader_like(loader, shard), device, progress)
    if use_cache:
        cache.save(weights, spec, features, labels)
    return features, labels, offset
