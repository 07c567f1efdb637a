"""Datasets, DINO multi-crop (PIL per image or batched on uint8 tensors), iBOT masking, typed batch, DataModule."""

from ssl_bench.data.batch import Batch, as_batch, collate_batch, split_batch

from ssl_bench.data.datasets import (
    DATASETS,
    DatasetInfo,
    DatasetSpec,
    build_dataset,
    check_dataset,
    dataset_info,
    dataset_size,
    num_classes,
    seeded_subset,
)
from ssl_bench.data.fashion_mnist import DataNotFoundError, read_idx
from ssl_bench.data.masking import BlockMaskGenerator, MaskingCollate, patch_grid, sample_masks
from ssl_bench.data.module import SSLDataModule, eval_loaders
from ssl_bench.data.tensor_multicrop import TensorMultiCrop, TensorMultiCropCollate
from ssl_bench.data.transforms import MultiCropTransform, eval_transform, linear_train_transform

__all__ = [
    "Batch",
    "BlockMaskGenerator",
    "DATASETS",
    "DataNotFoundError",
    "DatasetInfo",
    "DatasetSpec",
    "MaskingCollate",
    "MultiCropTransform",
    "SSLDataModule",
    "TensorMultiCrop",
    "TensorMultiCropCollate",
    "as_batch",
    "build_dataset",
    "check_dataset",
    "collate_batch",
    "dataset_info",
    "dataset_size",
    "eval_loaders",
    "eval_transform",
    "linear_train_transform",
    "num_classes",
    "patch_grid",
    "read_idx",
    "sample_masks",
    "seeded_subset",
    "split_batch",
]
