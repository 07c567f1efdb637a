"""Fashion-MNIST from the original IDX files, with a clear error when they are missing.

Follows the file format of Xiao et al. 2017 (zalandoresearch/fashion-mnist), which
is LeCun's MNIST IDX format: big-endian header, then the raw array.
"""

from __future__ import annotations

import gzip
import threading
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl_bench.config import DataConfig

# Where the Debian package ``dataset-fashion-mnist`` installs the four .gz files.
DEFAULT_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# Download target when ``data.root`` is unset.
DEFAULT_CACHE_ROOT = "~/.cache/ssl-bench"

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type byte -> numpy dtype (big-endian on disk).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where the config says; the message says how to fix it."""


def read_idx(path: str | Path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a numpy array.

    Args:
        path: ``*-ubyte`` or ``*-ubyte.gz`` file; images give (N, 28, 28) uint8,
            labels give (N,) uint8.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but "
                         f"{len(raw) - header} bytes follow")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    # Native byte order and a writable copy, so torch.from_numpy works downstream.
    return array.astype(dtype.newbyteorder("="), copy=True)


def _idx_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def split_files(folder: Path, split: str) -> Optional[tuple[Path, Path]]:
    """The (images, labels) files of ``split`` in ``folder``, or None if either is missing."""
    images, labels = (_idx_file(folder, stem) for stem in SPLIT_FILES[split])
    return (images, labels) if images and labels else None


def candidate_dirs(cfg: DataConfig) -> list[Path]:
    """Folders searched in order: data.root (flat or torchvision layout), then the Debian dir."""
    dirs = []
    if cfg.root:
        root = Path(cfg.root).expanduser()
        dirs += [root, root / "FashionMNIST" / "raw"]
    dirs.append(DEFAULT_FASHION_DIR)
    return dirs


def check_root_exists(cfg: DataConfig, dataset: str) -> None:
    """DataNotFoundError if ``data.root`` is set but missing (unless ``data.download`` is to create it).

    A misspelt root must not fall through to another copy of the data (Debian's, the download cache).
    """
    if not cfg.root or cfg.download:
        return
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataNotFoundError(f"data.root={cfg.root!r} {state} ({dataset}); set data.root to the folder holding "
                                f"the dataset, data.root=null to search the default places, or "
                                f"data.download=true to fetch it into data.root")


def find_split(cfg: DataConfig, split: str, allow_download: bool = True) -> tuple[Path, Path]:
    """Locate the IDX files of ``split``, downloading them if the config allows.

    Raises one DataNotFoundError naming all three ways to provide the files.
    """
    check_root_exists(cfg, "fashion_mnist")
    for folder in candidate_dirs(cfg):
        found = split_files(folder, split)
        if found:
            return found
    download_error = ""
    if cfg.download and allow_download:
        try:
            return _download(cfg, split)
        except Exception as exc:  # no internet, bad mirror, full disk: all the same to the user
            download_error = f" (download was tried and failed: {type(exc).__name__}: {exc})"
    raise DataNotFoundError(_missing_message(cfg, split, download_error))


def _download(cfg: DataConfig, split: str) -> tuple[Path, Path]:
    from torchvision.datasets import FashionMNIST

    root = Path(cfg.root or DEFAULT_CACHE_ROOT).expanduser()
    FashionMNIST(root=str(root), train=split == "train", download=True)
    found = split_files(root / "FashionMNIST" / "raw", split)
    if not found:
        raise FileNotFoundError(f"torchvision downloaded into {root} but left no IDX files")
    return found


def _missing_message(cfg: DataConfig, split: str, download_error: str) -> str:
    tried = ", ".join(str(d) for d in candidate_dirs(cfg))
    stems = " and ".join(f"{s}[.gz]" for s in SPLIT_FILES[split])
    root_state = f"is {cfg.root!r} but holds no such files" if cfg.root else "is not set"
    download_state = "is true" + download_error if cfg.download else "is false"
    return (
        f"Fashion-MNIST {split} files ({stems}) not found; searched: {tried}. Three ways to fix it:\n"
        f"  1. set data.root=/path/to/folder holding the IDX files (flat, or FashionMNIST/raw/ "
        f"as torchvision stores them); data.root {root_state}.\n"
        f"  2. apt-get install dataset-fashion-mnist (installs them into {DEFAULT_FASHION_DIR}).\n"
        f"  3. set data.download=true on a machine with internet (torchvision downloads into "
        f"data.root or {DEFAULT_CACHE_ROOT}); data.download {download_state}."
    )


_CACHE: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_CACHE_LOCK = threading.Lock()


def load_arrays(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28) uint8 images and (N,) int64 labels, read once per process per path."""
    key = (str(images_path.resolve()), str(labels_path.resolve()))
    with _CACHE_LOCK:
        if key not in _CACHE:
            images = read_idx(images_path)
            labels = read_idx(labels_path).astype(np.int64)
            if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
                raise ValueError(f"{images_path} / {labels_path}: expected N x H x W uint8 images "
                                 f"and N labels, got {images.shape} {images.dtype} and {labels.shape}")
            _CACHE[key] = (images, labels)
        return _CACHE[key]


class FashionMNISTIDX(Dataset):
    """Fashion-MNIST items as (transform(PIL RGB 28x28), int label) from in-memory arrays.

    Args:
        images: (N, H, W) uint8 grey images.
        labels: (N,) integer labels.
        transform: applied to the PIL RGB image.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Optional[Callable] = None):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        # RGB so that every backbone can take 3 channels regardless of dataset.
        if getattr(self.transform, "takes_uint8_tensor", False):  # the tensor pipelines: the same pixels, no PIL
            return torch.from_numpy(self.images[index]).expand(3, -1, -1), int(self.labels[index])
        image = Image.fromarray(self.images[index]).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def build_fashion_mnist(cfg: DataConfig, split: str, transform: Optional[Callable] = None) -> Dataset:
    """Fashion-MNIST ``split`` ("train": 60000, "test": 10000 items)."""
    return FashionMNISTIDX(*load_arrays(*find_split(cfg, split)), transform=transform)


def check_fashion_mnist(cfg: DataConfig) -> None:
    """Raise DataNotFoundError unless both splits can be found (downloading if allowed)."""
    for split in SPLIT_FILES:
        find_split(cfg, split)
