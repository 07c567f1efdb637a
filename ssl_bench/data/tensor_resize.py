"""Resized crops of uint8 image batches, as torchvision's bicubic antialiased resize computes them.

The resized crop of small images of one size is two batched matrix products in torch's own
fixed-point arithmetic (equal to its uint8 kernel to the grey level); larger or mixed-size images go
through torchvision one by one. The evaluation resize (short side, centre crop) likewise.
tests/data/test_tensor_multicrop.py compares them with torchvision box by box.
"""

from __future__ import annotations

import math

import torch
from torchvision.transforms.v2 import functional as F


BATCHED_RESIZE_MAX_PIXELS = 128 * 128  # above this, dense weight matrices cost more than torch's kernel per image


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``F.resized_crop`` (bicubic, antialias) of each uint8 image to (size, size), as float in [0, 1].

    Images of one size up to BATCHED_RESIZE_MAX_PIXELS (Fashion-MNIST, CIFAR) are resampled all at
    once by ``batched_resized_crops``; others one by one with torchvision's functional op (torch's
    uint8 kernel). Both follow PIL: horizontal pass, rounding to 8 bits, vertical pass, rounding.

    Args:
        images: N uint8 (3, H_i, W_i) tensors (sizes may differ), all on one device, or (N, 3, H, W).
        boxes: (N, 4) int (top, left, height, width) per image.

    Returns: (N, 3, size, size) float32, each value k / 255 for an integer grey level k.
    """
    shapes = {tuple(image.shape) for image in images}
    if len(shapes) == 1 and math.prod(next(iter(shapes))[-2:]) <= BATCHED_RESIZE_MAX_PIXELS:
        stacked = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        return batched_resized_crops(stacked, boxes, size).div_(255.0)
    crops = [F.resized_crop(image, top, left, height, width, [size, size],
                            interpolation=F.InterpolationMode.BICUBIC, antialias=True)
             for image, (top, left, height, width) in zip(images, boxes.tolist())]
    return torch.stack(crops).float().div_(255.0)


def _bicubic_aa(x: torch.Tensor) -> torch.Tensor:
    """The antialiasing bicubic filter of PIL and torch (Keys, a = -0.5), zero for |x| >= 2."""
    a = -0.5
    x = x.abs()
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, torch.zeros_like(x)))


def resample_weights(start: torch.Tensor, length: torch.Tensor, size: int, full: int) -> torch.Tensor:
    """(N, size, full) float64 weights resampling pixels [start, start + length) of a ``full``-pixel axis to ``size``.

    Per output pixel i, per image: centre c = scale (i + 1/2) with scale = length / size; when
    shrinking the filter is stretched by scale (support 2 scale, argument divided by scale); taps j
    in [trunc(c - support + 1/2), trunc(c + support + 1/2)) clipped to the crop; weights normalised
    to sum 1. These are the rules of PIL's ``precompute_coeffs`` and torch's antialias kernels.
    """
    scale = (length.double() / size).view(-1, 1, 1)
    support = torch.where(scale >= 1.0, 2.0 * scale, torch.full_like(scale, 2.0))
    inverse = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    centre = scale * (torch.arange(size, dtype=torch.float64, device=start.device).view(1, -1, 1) + 0.5)
    low = torch.trunc(centre - support + 0.5).clamp(min=0.0)
    high = torch.minimum(torch.trunc(centre + support + 0.5), length.double().view(-1, 1, 1))
    tap = torch.arange(full, dtype=torch.float64, device=start.device).view(1, 1, -1) - start.double().view(-1, 1, 1)
    weights = _bicubic_aa((tap - centre + 0.5) * inverse) * ((tap >= low) & (tap < high))
    return weights / weights.sum(dim=-1, keepdim=True)


def fixed_point(weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (N, S, W) as integers and their scale 2**bits (N, 1, 1), as torch's uint8 kernel quantises them.

    Per image: fractional bits b = the first b < 22 whose doubling would take the largest weight to
    2**15 or more (so the weights fit int16), else 22; weights rounded half away from zero.
    """
    largest = weights.amax(dim=(1, 2), keepdim=True)
    bits = sum((torch.floor(0.5 + largest * 2.0 ** (b + 1)) < 2 ** 15).double() for b in range(22))
    scale = torch.exp2(bits)
    scaled = weights * scale
    return torch.trunc(scaled + torch.where(scaled < 0, -0.5, 0.5)), scale


EXACT_FLOAT32_SCALE = 2.0 ** 15  # 255 * sum|weights| stays below 2**24 (float32's exact integers) up to this scale


def _fixed_point_pass(x: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Integer levels (N, K, W) times integer weights (N, W, S), shifted back by scale and clamped to 0..255.

    Every partial sum is an integer; float32 holds them exactly while the weights' scale is at most
    2**15 (the weights of one output pixel sum to scale, |negative lobes| add under 30%), else float64.
    Off the CPU always float64: a GPU may run float32 products in TF32, whose 10-bit mantissa is not exact.
    """
    exact32 = x.device.type == "cpu" and float(scale.max()) <= EXACT_FLOAT32_SCALE
    dtype = torch.float32 if exact32 else torch.float64
    x, weights, scale = x.to(dtype), weights.to(dtype), scale.to(dtype)
    return torch.baddbmm(scale / 2, x, weights).mul_(1.0 / scale).floor_().clamp_(0.0, 255.0)  # 1/scale: exact


_WEIGHT_TABLES: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _weights_of(start: torch.Tensor, length: torch.Tensor, size: int, full: int):
    """``fixed_point(resample_weights(...))`` looked up in a table of every (start, length) of the axis.

    The table is made once per (size, axis length, device): full * (full + 1) rows, e.g. 812 of
    (12, 28) for Fashion-MNIST's local crops; rows with start + length > full are never read.
    """
    key = (size, full, str(start.device))
    if key not in _WEIGHT_TABLES:
        starts = torch.arange(full, device=start.device).repeat_interleave(full + 1)
        lengths = torch.arange(full + 1, device=start.device).repeat(full).clamp(min=1)
        _WEIGHT_TABLES[key] = fixed_point(resample_weights(starts, lengths, size, full))
    weights, scale = _WEIGHT_TABLES[key]
    row = start * (full + 1) + length
    return weights[row], scale[row]


def batched_resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop boxes (N, 4) (top, left, height, width) of uint8 images (N, C, H, W), resized to (size, size).

    Two batched matrix products with per-image weight matrices (``resample_weights``) in torch's
    (and PIL's) fixed-point arithmetic: the horizontal pass, rounded and clamped to 8 bits, then the
    vertical pass. The products are exact integers in float64, so the result is torch's uint8 kernel's.
    Returns (N, C, size, size) float32 grey levels 0..255.
    """
    boxes = boxes.to(images.device)
    top, left, height, width = boxes.unbind(dim=1)
    h, w = images.shape[-2:]
    return separable_resample(images, _weights_of(left, width, size, w), _weights_of(top, height, size, h))


def separable_resample(images: torch.Tensor, across, down) -> torch.Tensor:
    """uint8 images (N, C, H, W) through fixed-point weights ``across`` = ((N, S_w, W), (N, 1, 1) scale) and
    ``down`` = ((N, S_h, H), scale): the horizontal pass rounded and clamped to 8 bits, then the vertical one.
    Returns (N, C, S_h, S_w) float32 grey levels 0..255 (float64 products of integers: exact)."""
    (across, across_scale), (down, down_scale) = across, down
    n, c, h, w = images.shape
    s_w, s_h = across.shape[1], down.shape[1]
    x = images.float().reshape(n, c * h, w)
    x = _fixed_point_pass(x, across.transpose(1, 2), across_scale)  # (N, C*H, S_w)
    x = x.view(n, c, h, s_w).transpose(1, 2).reshape(n, h, c * s_w).transpose(1, 2)  # (N, C*S_w, H)
    x = _fixed_point_pass(x, down.transpose(1, 2), down_scale)  # (N, C*S_w, S_h): rows (channel, column)
    return x.view(n, c, s_w, s_h).transpose(2, 3).float()


def resized_short_side(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision ``Resize(size)``'s output: the shorter side becomes ``size``, the longer ``int(size * long / short)``."""
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    return (size, new_long) if height <= width else (new_long, size)


def centre_crop_start(full: int, crop: int) -> int:
    """torchvision ``CenterCrop``'s offset on one axis: ``int(round((full - crop) / 2))``."""
    return int(round((full - crop) / 2.0))


def resize_centre_crop(images: list[torch.Tensor], resize: int, crop: int) -> torch.Tensor:
    """torchvision ``Resize(resize)`` (bicubic, antialias) then ``CenterCrop(crop)`` of uint8 images, as float in [0, 1].

    One size up to BATCHED_RESIZE_MAX_PIXELS: the rows of the whole-image resize that the crop keeps,
    by ``separable_resample``; else torchvision per image. Returns (N, 3, crop, crop) float32.
    """
    shapes = {tuple(image.shape) for image in images}
    h, w = next(iter(shapes))[-2:]
    new_h, new_w = resized_short_side(h, w, resize)
    if len(shapes) == 1 and h * w <= BATCHED_RESIZE_MAX_PIXELS and min(new_h, new_w) >= crop:
        stacked = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        zero = torch.zeros(1, dtype=torch.int64, device=stacked.device)

        def axis(full: int, new: int):
            weights, scale = _weights_of(zero, zero + full, new, full)
            start = centre_crop_start(new, crop)
            n = len(stacked)
            return weights[:, start:start + crop].expand(n, -1, -1), scale.expand(n, -1, -1)

        return separable_resample(stacked, axis(w, new_w), axis(h, new_h)).div_(255.0)
    out = [F.center_crop(F.resize(image, [resize], interpolation=F.InterpolationMode.BICUBIC, antialias=True),
                         [crop, crop]) for image in images]
    return torch.stack(out).float().div_(255.0)
