"""Lightning DataModule for multi-crop SSL training, and the k-NN evaluation loaders."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_bench import config as config_lib
from ssl_bench.config import Config
from ssl_bench.data.batch import Batch, collate_batch
from ssl_bench.data.decode import keep_encoded
from ssl_bench.data.device_multicrop import DeviceMultiCrop, ImageBatch, ImageBatchCollate, transfer_fields
from ssl_bench.data.datasets import build_dataset, check_dataset, dataset_info, seeded_subset
from ssl_bench.data.masking import MaskingCollate
from ssl_bench.data.resumable import ResumableLoader
from ssl_bench.data.tensor_multicrop import TensorMultiCropCollate, image_to_uint8
from ssl_bench.data.tensor_eval import eval_pipeline
from ssl_bench.data.transforms import MultiCropTransform, eval_transform


class SSLDataModule(L.LightningDataModule):
    """Multi-crop training batches ``Batch(crops, labels, masks)`` (``data/batch.py``).

    The training set is the seeded ``cfg.data.subset`` of the train split, each
    image turned into DINO's crops by MultiCropTransform (Caron et al. 2021), or, with
    ``data.multicrop=tensor``, each batch of uint8 images by TensorMultiCropCollate.
    With ``mask_grid``, batches gain iBOT block masks for the two global crops
    (DINOv2, Oquab et al. 2023): ``masks`` (2B, H*W) bool, see MaskingCollate; without,
    ``masks`` is None. The batches come from a ResumableLoader (``data/resumable.py``):
    each is a pure function of (seed, epoch, batch index, rank, world size), whatever
    ``data.num_workers``, and a resumed run continues mid-epoch where it stopped.
    With ``data.augment_on=device`` the loader yields ``device_multicrop.ImageBatch`` (uint8 images,
    labels, crop seed, masks) and ``on_after_batch_transfer`` makes the crops on the training device.

    Args:
        cfg: full config; reads ``cfg.data``, ``cfg.seed`` and, when masking,
            ``cfg.method.mask_probability`` and ``cfg.method.mask_ratio``.
        local_crops_number: overrides ``cfg.data.local_crops_number`` (a method
            without multi-crop passes 0); None keeps the config's.
        mask_grid: (H, W) patch grid of a global crop; None = no masks.
    """

    def __init__(self, cfg: Config, local_crops_number: Optional[int] = None,
                 mask_grid: Optional[tuple[int, int]] = None):
        super().__init__()
        self.cfg = cfg
        self.data_cfg = cfg.data if local_crops_number is None else dataclasses.replace(
            cfg.data, local_crops_number=local_crops_number)
        self.mask_grid = None if mask_grid is None else tuple(mask_grid)
        self._train_set: Optional[Dataset] = None
        self._device_multicrop: Optional[DeviceMultiCrop] = None

    def prepare_data(self) -> None:
        # Lightning runs this once per node, so a download happens once, not per rank.
        check_dataset(self.cfg.data)

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set  # noqa: B018 -- build it now rather than inside the first epoch

    @property
    def train_set(self) -> Dataset:
        """The (subset of the) train split with the multi-crop transform, built once."""
        if self._train_set is None:
            data = self.data_cfg
            info = dataset_info(data.name)
            # data.multicrop=tensor: the dataset yields uint8 tensors and the collate function crops the batch.
            transform = image_to_uint8 if data.multicrop == "tensor" else MultiCropTransform(data, info.mean, info.std)
            if self.augments_on_device:  # image files stay encoded bytes, decoded after the transfer (nvJPEG)
                transform = keep_encoded
            full = build_dataset(data, "train", transform)
            self._train_set = seeded_subset(full, data.subset, self.cfg.seed)
        return self._train_set

    def train_dataloader(self) -> ResumableLoader:
        data = self.data_cfg
        trainer = getattr(self, "trainer", None)
        rank = int(getattr(trainer, "global_rank", 0)) if trainer is not None else 0
        # Our sampler shards by rank itself, so the Trainer runs with use_distributed_sampler=False.
        return ResumableLoader(
            self.train_set,
            # every step sees a full batch, as in DINO; with optim.accumulate_grad_batches the method splits it
            batch_size=config_lib.rank_batch_size(self.cfg),
            seed=self.cfg.seed,
            rank=rank,
            world_size=self.world_size,
            collate_fn=self.collate_fn,
            seed_samples=data.multicrop != "tensor",  # tensor samples are plain uint8 images: nothing to seed
            num_workers=data.num_workers,
            persistent_workers=data.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    @property
    def augments_on_device(self) -> bool:
        """Whether the loader yields ImageBatch and the crops are made after the transfer (data.augment_on=device)."""
        return self.data_cfg.multicrop == "tensor" and self.data_cfg.augment_on == "device"

    @property
    def collate_fn(self) -> Callable[[list], Any]:
        """The batch maker: ``collate_batch`` (PIL multi-crop, crops made per sample), TensorMultiCropCollate
        (``data.multicrop=tensor``) or ImageBatchCollate (and ``data.augment_on=device``: crops made after
        the transfer), wrapped in MaskingCollate when masking."""
        data = self.data_cfg
        base: Callable[[list], Any] = collate_batch
        if self.augments_on_device:
            base = ImageBatchCollate()
        elif data.multicrop == "tensor":
            info = dataset_info(data.name)
            base = TensorMultiCropCollate(data, info.mean, info.std)
        if self.mask_grid is None:
            return base
        method = self.cfg.method
        return MaskingCollate(self.mask_grid, method.mask_probability, tuple(method.mask_ratio), base=base)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if not isinstance(batch, ImageBatch):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        moving, host = transfer_fields(batch)  # encoded bytes stay on the host, where nvJPEG reads them
        moved = super().transfer_batch_to_device(moving, device, dataloader_idx)
        return moved if host is None else moved._replace(images=host)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """``data.augment_on=device``: the ImageBatch on the device -> ``Batch(crops, labels, masks)``."""
        if not isinstance(batch, ImageBatch):
            return batch
        batch = self.device_multicrop(batch)
        trainer = getattr(self, "trainer", None)
        # Lightning converts float inputs for *-true / 64 precision before the transfer; these crops came after.
        return trainer.precision_plugin.convert_input(batch) if trainer is not None else batch

    def on_device(self, batch: Any, device: torch.device) -> Batch:
        """A loader batch as training sees it on ``device`` (both hooks), for code that reads the loader itself."""
        return self.on_after_batch_transfer(self.transfer_batch_to_device(batch, device, 0), 0)

    @property
    def device_multicrop(self) -> DeviceMultiCrop:
        if self._device_multicrop is None:
            info = dataset_info(self.data_cfg.name)
            self._device_multicrop = DeviceMultiCrop(self.data_cfg, info.mean, info.std)
        return self._device_multicrop

    @property
    def world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.world_size) if trainer is not None else 1

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch on each rank, i.e. ``len(train_dataloader())`` there.

        The sampler pads the set to a multiple of the world size as DistributedSampler,
        so each rank sees ceil(N / world) items and drops the last partial batch.
        """
        per_rank = math.ceil(len(self.train_set) / self.world_size)  # type: ignore[arg-type]
        return per_rank // config_lib.rank_batch_size(self.cfg)


def eval_loaders(cfg: Config) -> tuple[DataLoader, DataLoader]:
    """(bank_loader, test_loader) for k-NN: seeded subsets of train and test, eval preprocessing.

    Batches are ``((B, 3, C, C) images, (B,) labels)``, C = ``cfg.data.eval_crop_size``,
    in a fixed order (no shuffling) so features line up with labels across runs.
    """
    info = dataset_info(cfg.data.name)
    # data.multicrop=tensor: uint8 samples, preprocessed per batch by the collate function (data/tensor_eval.py).
    transform, collate = eval_pipeline(cfg.data, info.mean, info.std)
    transform = transform or eval_transform(cfg.data, info.mean, info.std)
    bank = seeded_subset(build_dataset(cfg.data, "train", transform), cfg.eval.bank_subset, cfg.seed)
    test = seeded_subset(build_dataset(cfg.data, "test", transform), cfg.eval.test_subset, cfg.seed)
    return _eval_loader(cfg, bank, collate), _eval_loader(cfg, test, collate)


def _eval_loader(cfg: Config, dataset: Dataset, collate: Optional[Callable] = None) -> DataLoader:
    return DataLoader(dataset, batch_size=cfg.eval.batch_size, shuffle=False, drop_last=False,
                      num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available(), collate_fn=collate)
