"""Tiny generated, class-separable RGB images for tests: no files, same pixels every time.

Each class is an oriented colour grating (orientation 18 degrees per class, one of
five hues, so classes c and c+5 share a hue but not an orientation). Phase,
frequency, contrast and a small orientation jitter vary per image, plus strong
pixel noise: cosine k-NN (k=20) on raw pixels scores 0.78 on the test split
(chance 0.1), so learning shows and collapse shows too.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

NUM_CLASSES = 10
IMAGE_SIZE = 32
SPLIT_SIZES = {"train": 512, "test": 128}
# Separate streams per split so test images are never copies of train images.
SPLIT_SEEDS = {"train": 20210429, "test": 20210430}
# Per-channel statistics of the generated train split (tests check them).
MEAN = (0.500, 0.500, 0.500)
STD = (0.333, 0.331, 0.331)

_HUES = np.array([[1.0, 0.3, 0.3], [0.3, 1.0, 0.3], [0.3, 0.3, 1.0], [1.0, 1.0, 0.3], [1.0, 0.3, 1.0]])
_AMPLITUDE = 0.3
_NOISE_STD = 0.4
_ORIENTATION_JITTER = 0.5  # in units of the 18-degree class spacing
_CYCLES = (1.5, 3.5)  # grating cycles per image side


def generate(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 images and (N,) int64 labels of ``split``, balanced over 10 classes."""
    n = SPLIT_SIZES[split]
    rng = np.random.default_rng(SPLIT_SEEDS[split])
    labels = rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)
    theta = np.pi * (labels + rng.uniform(-_ORIENTATION_JITTER, _ORIENTATION_JITTER, n)) / NUM_CLASSES
    phase = rng.uniform(0, 2 * np.pi, n)
    cycles = rng.uniform(*_CYCLES, n)
    contrast = rng.uniform(0.5, 1.0, n)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] / IMAGE_SIZE
    along = xx[None] * np.cos(theta)[:, None, None] + yy[None] * np.sin(theta)[:, None, None]
    grating = np.sin(2 * np.pi * cycles[:, None, None] * along + phase[:, None, None])
    colour = _HUES[labels % len(_HUES)] * contrast[:, None]
    images = 0.5 + _AMPLITUDE * grating[..., None] * colour[:, None, None, :]
    images = images + rng.normal(0.0, _NOISE_STD, images.shape)
    return np.clip(np.round(images * 255), 0, 255).astype(np.uint8), labels


class SyntheticGratings(Dataset):
    """The ``synthetic`` dataset as (transform(PIL RGB 32x32), int label).

    Args:
        split: "train" (512 images) or "test" (128 images).
        transform: applied to the PIL RGB image.
    """

    def __init__(self, split: str, transform: Optional[Callable] = None):
        self.images, self.labels = generate(split)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if getattr(self.transform, "takes_uint8_tensor", False):  # the tensor pipelines: the same pixels, no PIL
            return torch.from_numpy(self.images[index]).permute(2, 0, 1), int(self.labels[index])
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])
