"""Per-sample image operations on batches: torchvision's functional ops, one factor per image.

torchvision.transforms.v2.functional applies one parameter to a whole batch; DINO's multi-crop
draws a parameter per image. These functions take a batch ``(N, 3, H, W)`` of float images in
[0, 1] and one factor per image, and compute what the torchvision op computes on each image with
its own factor (the same formulas: ``_blend``, the grey weights, the HSV round trip, the Gaussian
kernel); tests/data/test_tensor_multicrop.py compares each against torchvision image by image.
Where torchvision already does a batch (grey, normalise), it is called. The resized crop of small
images of one size is two batched matrix products in torch's own fixed-point arithmetic (equal to its
uint8 kernel to the grey level); larger or mixed-size images go through torchvision one by one.
Everything runs on whatever device the batch is on.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from torchvision.transforms.v2 import functional as F


def luma(image: torch.Tensor) -> torch.Tensor:
    """``F.rgb_to_grayscale(image, 1)``: (N, 1, H, W) grey levels 0.2989 R + 0.587 G + 0.114 B.

    A one-channel batch stands for grey RGB images (R = G = B, see ``grey_batch``): its luma is the
    same sum with R = G = B = the channel, in torchvision's order of operations, so bitwise what the
    three-channel image gives (not the channel itself, since the weights sum to 0.9999).
    """
    if image.shape[-3] == 3:
        return F.rgb_to_grayscale(image, num_output_channels=1)
    return image.mul(0.2989).add_(image, alpha=0.587).add_(image, alpha=0.114)


def grey_batch(images: torch.Tensor) -> bool:
    """Whether every image of a uint8 (N, 3, H, W) batch is grey (R = G = B): then every op of the
    multi-crop keeps it grey and can run on one channel (``luma``), a third of the work."""
    return images.shape[-3] == 3 and bool((images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all())


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
    mean = luma(image).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(image, mean, factor)


def adjust_saturation(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_saturation`` per image: blend with the image's grey version."""
    return _blend(image, luma(image), factor)


def _rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, 3, H, W) RGB in [0, 1] -> (hue, saturation, value), each (N, H, W) in [0, 1], torchvision's
    formulas (hue 0 for greys)."""
    r, g, b = image.unbind(dim=-3)
    maxc, minc = image.amax(dim=-3), image.amin(dim=-3)
    grey = maxc == minc
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(grey, ones, maxc)
    divisor = torch.where(grey, ones, chroma)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    # torchvision's masked sum is_r (bc - gc) + is_g (2 + rc - bc) + is_b (4 + gc - rc), as one selection
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, (2.0 + rc) - bc, (4.0 + gc) - rc))
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return hue, saturation, maxc


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_rgb_to_hsv`` (torchvision's sector formulas): (N, 3, H, W) RGB."""
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.to(torch.int64).remainder_(6)
    p = (v * (1.0 - s)).clamp_(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp_(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp_(0.0, 1.0)
    # Channel values for sectors 0..5: (v,t,p) (q,v,p) (p,v,t) (p,q,v) (t,p,v) (v,p,q), chosen per pixel.
    s0, s1, s2, s3, s4 = (sector == k for k in range(5))
    red = torch.where(s0 | (sector == 5), v, torch.where(s1, q, torch.where(s4, t, p)))
    green = torch.where(s1 | s2, v, torch.where(s0, t, torch.where(s3, q, p)))
    blue = torch.where(s3 | s4, v, torch.where(s2, t, torch.where(s0 | s1, p, q)))
    return torch.stack((red, green, blue), dim=-3)


def adjust_hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_hue`` per image: shift the hue by factor (N,) in [-0.5, 0.5], modulo 1."""
    hue, saturation, value = _rgb_to_hsv(image)
    return _hsv_to_rgb(hue.add_(factor.view(-1, 1, 1)).remainder_(1.0), saturation, value)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's op indices
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


def blend_ops(image: torch.Tensor, factors: torch.Tensor, op: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast or saturation per image, chosen by ``op`` (N,) (-1 or 3: unchanged), in one pass.

    The three are blends: clamp(a x + c grey(x) + d mean(grey(x))) with (a, c, d) = (f, 0, 0),
    (f, 0, 1 - f), (f, 1 - f, 0); the unchanged images get (1, 0, 0). A zero term adds exactly 0,
    so each image gets exactly the sum that torchvision's ``_blend`` computes (within float rounding of 1 - f).
    """
    f = torch.gather(factors, 1, op.clamp(min=0).view(-1, 1)).squeeze(1)
    blended = (op >= 0) & (op < HUE)
    one, zero = torch.ones_like(f), torch.zeros_like(f)
    a = torch.where(blended, f, one)
    c = torch.where(op == SATURATION, 1.0 - f, zero)
    d = torch.where(op == CONTRAST, 1.0 - f, zero)
    grey = luma(image)
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True)
    out = image.mul(_per_image(a)).add_(grey.mul(_per_image(c))).add_(mean.mul(_per_image(d)))
    return out.clamp_(0.0, 1.0)


def has_colour(image: torch.Tensor) -> torch.Tensor:
    """(N,) bool: images with a pixel whose channels differ. Grey images are fixed points of the hue shift,
    and brightness, contrast and saturation keep them grey."""
    return (image.amax(dim=-3) != image.amin(dim=-3)).flatten(1).any(dim=1)


def color_jitter(image: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor, active: tuple[bool, ...] = (True,) * 4) -> torch.Tensor:
    """torchvision ``ColorJitter`` per image: its four ops in that image's own order.

    Per slot of the order, one ``blend_ops`` pass over the batch, then the hue shift on the images
    whose op in that slot is hue (skipping grey images, which it leaves unchanged).

    Args:
        image: (N, 3, H, W) float in [0, 1].
        factors: (N, 4) brightness, contrast, saturation, hue factors.
        order: (N, 4) a permutation of 0..3 per image (ColorJitter's ``fn_idx``).
        apply: (N,) bool, images that are jittered (RandomApply's draw).
        active: ops ColorJitter runs at all (it skips one whose range is zero).
    """
    out = image
    runs = torch.tensor(active, device=order.device)[order] & apply.view(-1, 1)  # (N, 4) op of slot s runs
    ops = torch.where(runs, order, torch.full_like(order, -1))
    colour = has_colour(image)
    for slot in range(4):
        op = ops[:, slot]
        if bool(((op >= 0) & (op < HUE)).any()):
            out = blend_ops(out, factors, op)
        rows = (op == HUE) & colour
        if bool(rows.any()):
            out = out.clone() if out is image else out
            out[rows] = adjust_hue(out[rows], factors[rows, HUE])
    return out.clone() if out is image else out


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
    if not bool(apply.any()):
        return image
    rows = image[apply]
    out = image.clone()
    out[apply] = torch.where(rows >= threshold, 1.0 - rows, rows)
    return out


def hflip(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``F.horizontal_flip`` on the images where apply (N,) is True."""
    return torch.where(_per_image(apply), image.flip(-1), image)


def grayscale(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``F.rgb_to_grayscale(num_output_channels=3)`` on the images where apply (N,) is True."""
    return torch.where(_per_image(apply), luma(image).expand_as(image), image)


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


def normalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """``F.normalize`` of the batch with per-channel mean and std; a one-channel (grey) batch becomes RGB first."""
    if image.shape[-3] == 1 and len(mean) == 3:
        image = image.expand(-1, 3, -1, -1)
    return F.normalize(image, list(mean), list(std))
