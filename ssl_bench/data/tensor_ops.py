"""Per-sample image operations on batches: torchvision's functional ops, one factor per image.

torchvision.transforms.v2.functional applies one parameter to a whole batch; DINO's multi-crop
draws a parameter per image. These functions take a batch ``(N, 3, H, W)`` of float images in
[0, 1] and one factor per image, and compute what the torchvision op computes on each image with
its own factor (the same formulas: ``_blend``, the grey weights, the HSV round trip, the Gaussian
kernel); tests/data/test_tensor_multicrop.py compares each against torchvision image by image.
Where torchvision already does a batch (grey, normalise, the resized crop of one image), it is
called. Everything runs on whatever device the batch is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F


def _per_image(factor: torch.Tensor) -> torch.Tensor:
    """(N,) factors as (N, 1, 1, 1) so they broadcast over (N, C, H, W)."""
    return factor.view(-1, 1, 1, 1)


def _blend(image: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` for float images, with a ratio per image."""
    ratio = _per_image(ratio)
    return image.mul(ratio).add_(other.mul(1.0 - ratio)).clamp_(0.0, 1.0)


def adjust_brightness(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_brightness`` per image. image (N, 3, H, W) float in [0, 1]; factor (N,)."""
    return image.mul(_per_image(factor)).clamp_(0.0, 1.0)


def adjust_contrast(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_contrast`` per image: blend with the image's mean grey level."""
    mean = F.rgb_to_grayscale(image, num_output_channels=1).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_saturation`` per image: blend with the image's grey version."""
    return _blend(image, F.rgb_to_grayscale(image, num_output_channels=1), factor)


def _rgb_to_hsv(image: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] -> HSV in [0, 1], torchvision's formulas (hue 0 for greys)."""
    r, g, b = image.unbind(dim=-3)
    maxc, minc = image.amax(dim=-3), image.amin(dim=-3)
    grey = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(grey, ones, maxc)
    divisor = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    is_r, is_g = maxc == r, (maxc == g) & (maxc != r)
    is_b = (maxc != g) & (maxc != r)
    hue = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, maxc), dim=-3)


def _hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_rgb_to_hsv`` (torchvision's sector formulas)."""
    h, s, v = hsv.unbind(dim=-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.to(torch.int64).remainder_(6)
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)
    # Channel values for sectors 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q).
    table = torch.stack([torch.stack(c, dim=-3) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], dim=0)
    index = sector.unsqueeze(-3).unsqueeze(0).expand(1, *table.shape[1:])
    return table.gather(0, index).squeeze(0)


def adjust_hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_hue`` per image: shift the hue by factor (N,) in [-0.5, 0.5], modulo 1."""
    hsv = _rgb_to_hsv(image)
    hue = hsv[:, 0].add(factor.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.cat((hue.unsqueeze(1), hsv[:, 1:]), dim=1))


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's op indices


def color_jitter(image: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor, active: tuple[bool, ...] = (True,) * 4) -> torch.Tensor:
    """torchvision ``ColorJitter`` per image: its four ops in that image's own order.

    Args:
        image: (N, 3, H, W) float in [0, 1].
        factors: (N, 4) brightness, contrast, saturation, hue factors.
        order: (N, 4) a permutation of 0..3 per image (ColorJitter's ``fn_idx``).
        apply: (N,) bool, images that are jittered (RandomApply's draw).
        active: ops ColorJitter runs at all (it skips one whose range is zero).
    """
    out = image.clone()
    for slot in range(4):
        for op_index, op in enumerate(JITTER_OPS):
            rows = apply & (order[:, slot] == op_index)
            if active[op_index] and bool(rows.any()):
                out[rows] = op(out[rows], factors[rows, op_index])
    return out


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """(N, kernel_size) normalised 1-D Gaussians, torchvision's ``_get_gaussian_kernel1d`` per sigma (N,)."""
    # exp(-d^2 / (2 sigma^2)) at offsets d = -(k-1)/2 .. (k-1)/2, written as torchvision writes it.
    lim = (kernel_size - 1) / (2.0 * 2.0 ** 0.5)
    x = torch.linspace(-lim, lim, kernel_size, device=sigma.device, dtype=torch.float32)
    return torch.softmax(x.view(1, -1).div(sigma.view(-1, 1).float()).pow(2).neg(), dim=1)


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """``F.gaussian_blur(img, [k, k], [s, s])`` per image: reflect padding, one sigma (N,) per image.

    torchvision convolves with the 2-D outer product; this runs the two 1-D passes (equal up to
    float rounding), as one grouped convolution over all images and channels.
    """
    n, c, h, w = image.shape
    kernels = gaussian_kernels(kernel_size, sigma).to(image.dtype).repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel_size // 2
    flat = nnf.pad(image.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
    flat = nnf.conv2d(flat, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = nnf.conv2d(flat, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def solarize(image: torch.Tensor, threshold: float, apply: torch.Tensor) -> torch.Tensor:
    """``F.solarize`` (float: values >= threshold become 1 - value) on the images where apply (N,) is True."""
    solarized = torch.where(image >= threshold, 1.0 - image, image)
    return torch.where(_per_image(apply), solarized, image)


def hflip(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``F.horizontal_flip`` on the images where apply (N,) is True."""
    return torch.where(_per_image(apply), image.flip(-1), image)


def grayscale(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``F.rgb_to_grayscale(num_output_channels=3)`` on the images where apply (N,) is True."""
    return torch.where(_per_image(apply), F.rgb_to_grayscale(image, num_output_channels=3), image)


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """``F.resized_crop`` (bicubic, antialias) of each uint8 image to (size, size), as float in [0, 1].

    Args:
        images: N uint8 (3, H_i, W_i) tensors (sizes may differ), all on one device.
        boxes: (N, 4) int (top, left, height, width) per image.

    Returns: (N, 3, size, size) float32. torchvision's kernel rounds and clamps each crop to uint8
    as PIL does, so later steps see the same grey levels a uint8 pipeline would.
    """
    crops = [F.resized_crop(image, top, left, height, width, [size, size],
                            interpolation=F.InterpolationMode.BICUBIC, antialias=True)
             for image, (top, left, height, width) in zip(images, boxes.tolist())]
    return torch.stack(crops).float().div_(255.0)


def normalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """``F.normalize`` of the batch with per-channel mean and std."""
    return F.normalize(image, list(mean), list(std))
