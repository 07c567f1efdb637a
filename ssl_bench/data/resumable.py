"""Deterministic, resumable training data: the batch at (epoch, batch, rank, world) is a pure function of the seed.

The official DINO loop (facebookresearch/dino ``main_dino.py``) shuffles with a
``DistributedSampler`` and lets each DataLoader worker draw augmentations from its
own seeded stream, so a batch depends on ``num_workers`` and a run restarted in the
middle of an epoch replays it from the start. Here:

- ``EpochShardSampler`` orders the set by a permutation seeded from (seed, epoch),
  padded and sharded across ranks exactly as ``torch.utils.data.DistributedSampler``
  (drop_last=False), and yields ``SampleKey(epoch, position, index)``;
- ``SeededSamples`` loads each sample with torch's, Python's and NumPy's global RNGs
  seeded from (seed, epoch, position) and restores them afterwards, so augmentations
  no longer depend on which worker (or the main process) loads the sample;
- ``SeededCollate`` does the same per batch, seeded from (seed, epoch, position of the
  batch's first sample, which names its rank and batch index), for iBOT masks;
- ``ResumableLoader`` is a DataLoader whose ``state_dict()`` is (epoch, batches
  yielded). Lightning stores it in checkpoints and hands it back on resume
  (``FitLoop.on_save_checkpoint`` / ``_load_combined_loader_states``); the loader then
  skips the finished batches without loading them while ``len()`` stays the full epoch,
  which Lightning's progress counters need.
"""

from __future__ import annotations

import hashlib
import math
import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ints and tags, the same on every platform and Python run (unlike ``hash``)."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU, Python's and NumPy's global RNGs for the block, then put their states back.

    Restoring matters with ``num_workers=0``: samples are then loaded in the training
    process, whose RNG streams (drop path) must not depend on how the data was loaded.
    CUDA generators are left alone (``torch.manual_seed`` would reseed them).
    """
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class SampleKey(NamedTuple):
    """What the sampler yields for one sample: its epoch, its slot in the epoch's padded order, its index."""

    epoch: int
    position: int
    index: int


class EpochShardSampler(Sampler[SampleKey]):
    """This rank's share of an epoch-seeded permutation, padded and strided like DistributedSampler.

    The permutation of ``range(size)`` is drawn from a generator seeded by (seed, epoch);
    it is repeated cyclically up to ``ceil(size / world) * world`` slots and rank r takes
    slots r, r + world, ... (``DistributedSampler(shuffle=True, drop_last=False)``, whose
    ``steps_per_epoch`` arithmetic SSLDataModule keeps).

    Args:
        size: number of samples in the dataset.
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if size < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need size >= 0 and 0 <= rank < world_size, got {size}, {rank}, {world_size}")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.epoch = 0
        self.start = 0  # leading samples of the shard to skip on the next iteration only (resume)

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at every epoch start (and by ResumableLoader.load_state_dict)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def global_order(self, epoch: int) -> list[int]:
        """Dataset indices of every slot of ``epoch``, all ranks, padding included."""
        if self.size == 0:
            return []
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        total = len(self) * self.world_size
        return (order * math.ceil(total / self.size))[:total]

    def shard(self, epoch: int) -> list[SampleKey]:
        """This rank's keys of ``epoch`` in the order they are yielded."""
        order = self.global_order(epoch)
        return [SampleKey(epoch, p, order[p]) for p in range(self.rank, len(order), self.world_size)]

    def __iter__(self) -> Iterator[SampleKey]:
        start, self.start = self.start, 0
        return iter(self.shard(self.epoch)[start:])


class SeededSamples(Dataset):
    """Wraps a map-style dataset: ``SampleKey -> (key, dataset[key.index])`` under RNGs seeded by the key.

    Args:
        dataset: returns e.g. ``(list of crops, label)``; its transforms may use torch's,
            Python's or NumPy's global RNG (torchvision uses torch's).
        seed: the run's seed.
        seeded: False when loading a sample draws nothing at random (the tensor pipelines, whose
            randomness is the collate function's): skips the four RNG state swaps per sample.
    """

    def __init__(self, dataset: Dataset, seed: int, seeded: bool = True) -> None:
        self.dataset = dataset
        self.seed = seed
        self.seeded = seeded

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> tuple[SampleKey, Any]:
        if not self.seeded:
            return key, self.dataset[key.index]
        with seeded_rngs(derive_seed(self.seed, "sample", key.epoch, key.position)):
            return key, self.dataset[key.index]


class SeededCollate:
    """``collate_fn`` for SeededSamples: drops the keys and runs ``collate_fn`` under RNGs seeded per batch.

    The seed comes from (seed, epoch, position of the batch's first sample); that position
    is ``rank + batch_index * batch_size * world`` and so names the batch. MaskingCollate
    draws its masks from Python's global ``random``, which this seeds.
    """

    def __init__(self, seed: int, collate_fn: Optional[Callable] = None) -> None:
        self.seed = seed
        self.collate_fn = collate_fn if collate_fn is not None else default_collate

    def __call__(self, items: list[tuple[SampleKey, Any]]) -> Any:
        first = items[0][0]
        with seeded_rngs(derive_seed(self.seed, "batch", first.epoch, first.position)):
            return self.collate_fn([sample for _, sample in items])


class ResumableLoader(DataLoader):
    """DataLoader of full batches over an EpochShardSampler whose position Lightning checkpoints.

    ``state_dict()`` is ``{"epoch", "batches"}`` (batches of that epoch already handed
    out) plus the seed and layout it is valid for. After ``load_state_dict`` the next
    iteration of that epoch skips the finished batches (their samples are never loaded);
    a position at the end of an epoch means the start of the next one.
    ``__iter__`` is lazy: nothing (no worker, no epoch lookup) starts before the first
    batch is asked for, i.e. after Lightning's ``set_epoch``.

    Args:
        dataset: map-style dataset of samples.
        batch_size: per process; the last partial batch is dropped (as DINO).
        seed: the run's seed.
        rank, world_size: this process and the number of processes.
        collate_fn: applied to a list of samples (None = default_collate).
        seed_samples: seed the global RNGs per sample (SeededSamples); False when samples are not random.
        **kwargs: further DataLoader arguments (num_workers, pin_memory, ...).
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 collate_fn: Optional[Callable] = None, seed_samples: bool = True, **kwargs: Any) -> None:
        sampler = EpochShardSampler(len(dataset), seed, rank, world_size)  # type: ignore[arg-type]
        # Its own generator: the DataLoader draws a base seed per iteration, which must not consume
        # the training process's global torch RNG (drop path) or a resumed run would drift.
        super().__init__(SeededSamples(dataset, seed, seed_samples), batch_size=batch_size, sampler=sampler, drop_last=True,
                         collate_fn=SeededCollate(seed, collate_fn), generator=torch.Generator().manual_seed(seed),
                         **kwargs)
        self.seed = seed
        self.epoch_sampler = sampler
        self._epoch, self._yielded = 0, 0
        self._resume_at: Optional[tuple[int, int]] = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        epoch = self.epoch_sampler.epoch
        skip = self._resume_at[1] if self._resume_at is not None and self._resume_at[0] == epoch else 0
        self._resume_at = None
        self.epoch_sampler.start = skip * self.batch_size  # type: ignore[operator]
        self._epoch, self._yielded = epoch, skip
        for batch in super().__iter__():
            self._yielded += 1  # counted before Lightning gets it: a checkpoint after this step includes it
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "batches": self._yielded, "batches_per_epoch": len(self),
                "seed": self.seed, "world_size": self.epoch_sampler.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        expected = {"seed": self.seed, "world_size": self.epoch_sampler.world_size, "batches_per_epoch": len(self)}
        found = {key: state.get(key) for key in expected}
        if found != expected:
            raise ValueError(f"the checkpoint's data-loader position was saved for {found}, "
                             f"this loader has {expected}: the batches would not line up")
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.epoch_sampler.set_epoch(epoch)
        self._resume_at = (epoch, batches)
        self._epoch, self._yielded = epoch, batches
