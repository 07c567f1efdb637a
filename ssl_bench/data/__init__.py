"""Datasets, DINO multi-crop augmentation and the SSL DataModule."""

from ssl_bench.data.datasets import (
    DATASETS,
    DatasetInfo,
    DatasetSpec,
    build_dataset,
    check_dataset,
    dataset_info,
    num_classes,
    seeded_subset,
)
from ssl_bench.data.fashion_mnist import DataNotFoundError, read_idx
from ssl_bench.data.module import SSLDataModule, eval_loaders
from ssl_bench.data.transforms import MultiCropTransform, eval_transform

__all__ = [
    "DATASETS",
    "DataNotFoundError",
    "DatasetInfo",
    "DatasetSpec",
    "MultiCropTransform",
    "SSLDataModule",
    "build_dataset",
    "check_dataset",
    "dataset_info",
    "eval_loaders",
    "eval_transform",
    "num_classes",
    "read_idx",
    "seeded_subset",
]
