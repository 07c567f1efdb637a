"""DINO multi-crop augmentation and the evaluation preprocessing, sized by the config.

Follows DINO (Caron et al. 2021, arXiv 2104.14294), facebookresearch/dino
``main_dino.py`` ``DataAugmentationDINO``; one code path for 28-px Fashion-MNIST
and 224-px ImageNet, every number read from ``DataConfig``.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl_bench.config import DataConfig

REFERENCE_SIZE = 224  # the resolution DINO's blur sigmas were chosen for
SOLARIZE_THRESHOLD = 128  # PIL ImageOps.solarize default, as in DINO
# A neighbour weight exp(-1 / (2 sigma^2)) below 1/255 moves no 8-bit pixel by a
# whole grey level, i.e. sigma < 1 / sqrt(2 ln 255) ~= 0.30 px is no blur at all.
NEGLIGIBLE_SIGMA = 1.0 / math.sqrt(2.0 * math.log(255.0))


def blur_sigma_range(cfg: DataConfig) -> tuple[float, float]:
    """``cfg.aug.blur_sigma`` (pixels at 224 px) scaled to this dataset's resolution.

    DINO blurs its 96-px local crops with the same sigmas as its 224-px global crops,
    so the scale is the global crop size over 224 for every view; at 224 px this is
    exactly DINO.
    """
    scale = cfg.global_crop_size / REFERENCE_SIZE
    lo, hi = cfg.aug.blur_sigma
    return lo * scale, hi * scale


def blur_kernel_size(sigma_max: float, crop_size: int) -> int:
    """Odd kernel covering +-3 sigma, no larger than the crop (reflect padding needs that)."""
    size = 2 * math.ceil(3 * sigma_max) + 1
    largest_odd = crop_size if crop_size % 2 else crop_size - 1
    return max(1, min(size, largest_odd))


def blur_params(cfg: DataConfig, crop_size: int, p: float) -> Optional[tuple[int, tuple[float, float]]]:
    """(odd kernel size, (sigma low, sigma high)) of a view's blur, or None where blurring is a no-op.

    The one decision both multi-crop paths (PIL here, ``tensor_multicrop``) follow: no blur when
    ``p`` is 0, when even the largest sigma is below NEGLIGIBLE_SIGMA, or when the kernel would be 1 px.
    """
    lo, hi = blur_sigma_range(cfg)
    if p <= 0 or hi < NEGLIGIBLE_SIGMA:
        return None
    kernel = blur_kernel_size(hi, crop_size)
    if kernel < 3:
        return None
    return kernel, (max(lo, 1e-3), hi)


def random_blur(cfg: DataConfig, crop_size: int, p: float) -> Optional[T.RandomApply]:
    """Gaussian blur with probability ``p`` and sigma ~ U(blur_sigma_range); None if it is a no-op."""
    params = blur_params(cfg, crop_size, p)
    if params is None:
        return None
    kernel, sigma = params
    return T.RandomApply([T.GaussianBlur(kernel, sigma=sigma)], p=p)


def _flip_and_color_jitter(cfg: DataConfig) -> list:
    aug = cfg.aug
    return [
        T.RandomHorizontalFlip(p=aug.flip_p),
        T.RandomApply([T.ColorJitter(*aug.color_jitter)], p=aug.color_jitter_p),
        T.RandomGrayscale(p=aug.grayscale_p),
    ]


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToTensor(), T.Normalize(mean, std)]


def view_transform(cfg: DataConfig, mean, std, size: int, scale: Sequence[float],
                   blur_p: float, solarize_p: float = 0.0) -> T.Compose:
    """One DINO view: crop, flip, colour jitter, grey, blur, solarize, normalise."""
    steps = [T.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC)]
    steps += _flip_and_color_jitter(cfg)
    blur = random_blur(cfg, size, blur_p)
    if blur is not None:
        steps.append(blur)
    if solarize_p > 0:
        steps.append(T.RandomSolarize(SOLARIZE_THRESHOLD, p=solarize_p))
    return T.Compose(steps + _normalize(mean, std))


class MultiCropTransform:
    """DINO multi-crop: 2 global views then ``cfg.local_crops_number`` local views.

    DINO (Caron et al. 2021), facebookresearch/dino ``main_dino.py``
    ``DataAugmentationDINO``: global view 1 always blurred (p=blur_p[0]), global
    view 2 blurred with p=blur_p[1] and solarized with p=solarize_p, locals blurred
    with p=blur_p[2].

    Args:
        cfg: crop sizes, scales and ``cfg.aug`` probabilities.
        mean, std: per-channel normalisation (3 floats each).

    Returns (when called on a PIL image): a list of ``2 + local_crops_number`` float
    tensors, two (3, G, G) then (3, L, L), G/L the global/local crop sizes.
    """

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float]):
        aug = cfg.aug
        if len(aug.blur_p) != 3:
            raise ValueError(f"data.aug.blur_p needs 3 probabilities (global 1, global 2, local), "
                             f"got {aug.blur_p}")
        size, scale = cfg.global_crop_size, cfg.global_crop_scale
        self.global1 = view_transform(cfg, mean, std, size, scale, aug.blur_p[0])
        self.global2 = view_transform(cfg, mean, std, size, scale, aug.blur_p[1], aug.solarize_p)
        self.local = view_transform(cfg, mean, std, cfg.local_crop_size, cfg.local_crop_scale, aug.blur_p[2])
        self.local_crops_number = cfg.local_crops_number

    def __call__(self, image) -> list[torch.Tensor]:
        crops = [self.global1(image), self.global2(image)]
        crops += [self.local(image) for _ in range(self.local_crops_number)]
        return crops

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(\n  global1={self.global1},\n  global2={self.global2},\n"
                f"  local x{self.local_crops_number}={self.local})")


def eval_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the shorter side to ``eval_resize`` (bicubic), centre-crop ``eval_crop_size``, normalise.

    As DINO's ``eval_knn.py`` (Resize 256, CenterCrop 224) with sizes from the config.
    Output: (3, eval_crop_size, eval_crop_size) float tensor.
    """
    return T.Compose([
        T.Resize(cfg.eval_resize, interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(cfg.eval_crop_size),
        *_normalize(mean, std),
    ])


def linear_train_transform(cfg: DataConfig, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Linear-probe training augmentation: RandomResizedCrop ``eval_crop_size`` (bicubic), flip, normalise.

    As DINO's ``eval_linear.py`` (RandomResizedCrop(224), RandomHorizontalFlip, normalise) with the
    torchvision default scale (0.08, 1) and the crop size from the config.
    Output: (3, eval_crop_size, eval_crop_size) float tensor.
    """
    return T.Compose([
        T.RandomResizedCrop(cfg.eval_crop_size, interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        *_normalize(mean, std),
    ])
