"""Dataset registry: name -> (split, transform) -> Dataset of (image, int label).

Images reach the transform as PIL RGB (grey datasets converted) so every backbone
takes 3 channels. File-backed datasets raise DataNotFoundError with the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset, Subset

from ssl_bench.config import DataConfig
from ssl_bench.data import synthetic
from ssl_bench.data.fashion_mnist import (
    DEFAULT_CACHE_ROOT,
    DataNotFoundError,
    build_fashion_mnist,
    check_fashion_mnist,
    check_root_exists,
)
from ssl_bench.registry import Registry

SPLITS = ("train", "test")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DatasetInfo:
    """What normalisation and k-NN need to know; num_classes 0 means "count at build time"."""

    num_classes: int
    mean: tuple
    std: tuple
    image_size: int
    train_size: int = 0  # images in the SSL training split when known without reading it; 0 = unknown


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: callable like a factory, plus its info and a cheap file check."""

    build: Callable[[DataConfig, str, Optional[Callable]], Dataset]
    info: DatasetInfo
    check: Callable[[DataConfig], None]

    def __call__(self, cfg: DataConfig, split: str, transform: Optional[Callable] = None) -> Dataset:
        return self.build(cfg, split, transform)


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def _no_check(cfg: DataConfig) -> None:
    return None


def _register(name: str, description: str, info: DatasetInfo, check: Callable = _no_check):
    def add(build: Callable) -> Callable:
        DATASETS.add(name, DatasetSpec(build, info, check), description)
        return build

    return add


# ---- torchvision-backed datasets ------------------------------------------------------


def _torchvision_root(cfg: DataConfig) -> Path:
    return Path(cfg.root or DEFAULT_CACHE_ROOT).expanduser()


def _torchvision_files(cls: type) -> list[str]:
    # The file lists are public class attributes; checking names, not md5s, keeps it cheap.
    return [f"{cls.base_folder}/{name}" for name, _ in cls.train_list + cls.test_list]


def _torchvision_check(cls: type, name: str):
    def check(cfg: DataConfig) -> None:
        root = _torchvision_root(cfg)
        if all((root / f).is_file() for f in _torchvision_files(cls)):
            return
        if cfg.download:
            for split in SPLITS:  # downloads once here, not in every job
                _torchvision_build(cls, name, cfg, split, None)
            return
        raise DataNotFoundError(_torchvision_message(name, cfg, cls))

    return check


def _torchvision_message(name: str, cfg: DataConfig, cls: type, detail: str = "") -> str:
    root = _torchvision_root(cfg)
    where = f"data.root={cfg.root!r}" if cfg.root else f"{DEFAULT_CACHE_ROOT} (data.root is not set)"
    return (f"{name} not found in {where}: expected {root / cls.base_folder}/{detail}. Set data.root to "
            f"the folder holding {cls.base_folder}/, or set data.download=true on a machine with "
            f"internet to fetch it there.")


def _torchvision_build(cls: type, name: str, cfg: DataConfig, split: str, transform) -> Dataset:
    root = _torchvision_root(cfg)
    kwargs = {"split": split} if name == "stl10" else {"train": split == "train"}
    try:
        return cls(root=str(root), download=cfg.download, transform=transform, **kwargs)
    except RuntimeError as exc:  # torchvision's "Dataset not found or corrupted"
        raise DataNotFoundError(_torchvision_message(name, cfg, cls, f" ({exc})")) from exc


def _add_torchvision(name: str, class_name: str, description: str, info: DatasetInfo) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, class_name)

    def build(cfg: DataConfig, split: str, transform=None) -> Dataset:
        return _torchvision_build(cls, name, cfg, split, transform)

    _register(name, description, info, _torchvision_check(cls, name))(build)


_add_torchvision("cifar10", "CIFAR10", "CIFAR-10 via torchvision (50000/10000 32px RGB, 10 classes)",
                 DatasetInfo(10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 50000))
_add_torchvision("cifar100", "CIFAR100", "CIFAR-100 via torchvision (50000/10000 32px RGB, 100 classes)",
                 DatasetInfo(100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 50000))
_add_torchvision("stl10", "STL10", "STL-10 labelled splits via torchvision (5000/8000 96px RGB, 10 classes)",
                 DatasetInfo(10, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713), 96, 5000))


# ---- files read by us, ImageNet layout, generated ---------------------------------------

_register("fashion_mnist", "Fashion-MNIST from the original IDX files (60000/10000 28px grey, 10 classes)",
          DatasetInfo(10, (0.2860,) * 3, (0.3530,) * 3, 28, 60000), check_fashion_mnist)(build_fashion_mnist)


def _imagefolder_dir(cfg: DataConfig, split: str) -> Path:
    if not cfg.root:
        raise DataNotFoundError("imagefolder needs data.root=/path/to/imagenet holding train/<class>/ "
                                "and val/<class>/ folders; data.root is not set")
    folder = Path(cfg.root).expanduser() / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DataNotFoundError(f"imagefolder: {folder} does not exist; data.root must hold "
                                f"train/<class>/*.jpg and val/<class>/* (ImageNet layout)")
    return folder


def _check_imagefolder(cfg: DataConfig) -> None:
    for split in SPLITS:
        _imagefolder_dir(cfg, split)


@_register("imagefolder", "ImageNet layout root/{train,val}/<class>/*; 'test' reads val",
           DatasetInfo(0, IMAGENET_MEAN, IMAGENET_STD, 224), _check_imagefolder)
def _build_imagefolder(cfg: DataConfig, split: str, transform=None) -> Dataset:
    from ssl_bench.data.folder_index import IndexedImageFolder

    return IndexedImageFolder(_folder_index(cfg, split), transform=transform)  # type: ignore[return-value]


def _folder_index(cfg: DataConfig, split: str):
    """The split's cached index (data/folder_index.py); a class folder without images is a DataNotFoundError."""
    from ssl_bench.data.folder_index import load_index

    try:
        return load_index(_imagefolder_dir(cfg, split))
    except FileNotFoundError as exc:
        raise DataNotFoundError(f"imagefolder (data.root={cfg.root}): {exc}") from exc


@_register("synthetic", "generated 32px colour gratings, 10 classes, 512/128 images (tests)",
           DatasetInfo(synthetic.NUM_CLASSES, synthetic.MEAN, synthetic.STD, synthetic.IMAGE_SIZE,
                       synthetic.SPLIT_SIZES["train"]))
def _build_synthetic(cfg: DataConfig, split: str, transform=None) -> Dataset:
    return synthetic.SyntheticGratings(split, transform)


# ---- public API --------------------------------------------------------------------------


def build_dataset(cfg: DataConfig, split: str, transform: Optional[Callable] = None) -> Dataset:
    """The ``split`` ("train" or "test") of dataset ``cfg.name`` as (transform(PIL RGB), int label)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    return DATASETS.get(cfg.name)(cfg, split, transform)


def dataset_info(name: str) -> DatasetInfo:
    """Classes, per-channel mean/std and native size of a registered dataset."""
    return DATASETS.get(name).info


def num_classes(cfg: DataConfig) -> int:
    """Number of classes, counting imagefolder's train/ class folders."""
    if cfg.name == "imagefolder":
        return len(_folder_index(cfg, "train").classes)
    return dataset_info(cfg.name).num_classes


def dataset_size(cfg: DataConfig, split: str) -> int:
    """Items in ``split``; for imagefolder from the cached index (``folder_index``), nothing decoded or re-listed."""
    if cfg.name == "imagefolder":
        return len(_folder_index(cfg, split).samples)
    return len(build_dataset(cfg, split))  # type: ignore[arg-type]


def check_dataset(cfg: DataConfig) -> None:
    """Raise DataNotFoundError (or the registry's unknown-name error) before a job starts.

    Checks that files exist without reading them; with ``data.download=true`` a missing
    dataset is downloaded here, once, instead of in every job. A ``data.root`` that is set
    but missing is an error for every file-backed dataset, never a silent fallback.
    """
    spec = DATASETS.get(cfg.name)
    if spec.check is not _no_check:
        check_root_exists(cfg, cfg.name)
    spec.check(cfg)


def seeded_subset(dataset: Dataset, n: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``n`` items: same indices for the same (len, n, seed).

    ``n`` None or >= len(dataset) returns ``dataset`` itself. Indices are sorted so
    that file-backed datasets read in order.
    """
    size = len(dataset)  # type: ignore[arg-type]
    if n is None or n >= size:
        return dataset
    if n < 1:
        raise ValueError(f"subset size must be >= 1 or None, got {n}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(size, generator=generator)[:n].sort().values
    return Subset(dataset, indices.tolist())
