"""Evaluation batches on uint8 tensors (``data.multicrop=tensor``): k-NN / linear-probe preprocessing per batch.

The same preprocessing as ``transforms.eval_transform`` (Resize ``eval_resize`` bicubic, CenterCrop
``eval_crop_size``, normalise) and ``transforms.linear_train_transform`` (RandomResizedCrop
``eval_crop_size`` with torchvision's default scale (0.08, 1), flip with p = 0.5, normalise), done by
the DataLoader's collate function on the batch's uint8 images (``tensor_resize``), as the training crops
are. The dataset side is ``tensor_multicrop.image_to_uint8``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from ssl_bench.config import DataConfig
from ssl_bench.data import tensor_ops, tensor_resize
from ssl_bench.data.tensor_multicrop import CROP_RATIO, image_to_uint8, sample_crop_boxes

LINEAR_CROP_SCALE = (0.08, 1.0)  # torchvision RandomResizedCrop's default, as DINO's eval_linear.py
FLIP_P = 0.5


def _split(samples: list[tuple[torch.Tensor, Any]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    return [image for image, _ in samples], torch.tensor([int(label) for _, label in samples], dtype=torch.int64)


class TensorEvalCollate:
    """``collate_fn``: B samples (uint8 (3, H, W), label) -> ((B, 3, C, C) normalised float, (B,) labels).

    Resize the shorter side to ``eval_resize`` (bicubic, antialias), centre-crop ``eval_crop_size``:
    torchvision's ``Resize`` and ``CenterCrop`` on each uint8 image, to the grey level.
    """

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float]):
        self.resize, self.crop = cfg.eval_resize, cfg.eval_crop_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, samples):
        images, labels = _split(samples)
        x = tensor_resize.resize_centre_crop(images, self.resize, self.crop)
        return tensor_ops.normalize(x, self.mean, self.std), labels


class TensorLinearTrainCollate:
    """``collate_fn`` of the linear probe's augmented training batches: per image a RandomResizedCrop box
    (``sample_crop_boxes``, torchvision's rules) and a flip, from a generator seeded from torch's global
    RNG (which the DataLoader seeds per worker from its own generator), then normalise."""

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float]):
        self.crop = cfg.eval_crop_size
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, samples):
        images, labels = _split(samples)
        generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
        heights = torch.tensor([image.shape[-2] for image in images])
        widths = torch.tensor([image.shape[-1] for image in images])
        boxes = sample_crop_boxes(heights, widths, LINEAR_CROP_SCALE, CROP_RATIO, generator)
        flip = torch.rand(len(images), generator=generator, dtype=torch.float64) < FLIP_P
        x = tensor_resize.resized_crops(images, boxes, self.crop)
        x = tensor_ops.hflip(x, flip.to(x.device))
        return tensor_ops.normalize(x, self.mean, self.std), labels


def eval_pipeline(cfg: DataConfig, mean: Sequence[float], std: Sequence[float], *, train: bool = False,
                  augment: bool = True) -> tuple[Optional[Any], Optional[Any]]:
    """(dataset transform, collate_fn) of the tensor evaluation path, or (None, None) for ``multicrop=pil``.

    ``train`` with ``augment``: the linear probe's augmented training batches; otherwise eval preprocessing.
    """
    if cfg.multicrop != "tensor":
        return None, None
    collate = TensorLinearTrainCollate if train and augment else TensorEvalCollate
    return image_to_uint8, collate(cfg, mean, std)
