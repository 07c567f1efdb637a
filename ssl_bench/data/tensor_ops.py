"""Per-sample image operations on batches: torchvision's functional ops, one factor per image.

torchvision.transforms.v2.functional applies one parameter to a whole batch; DINO's multi-crop
draws a parameter per image. These functions take a batch ``(N, 3, H, W)`` of float images in
[0, 1] and one factor per image, and compute what the torchvision op computes on each image with
its own factor (the same formulas: ``_blend``, the grey weights, the HSV round trip, the Gaussian
kernel); tests/data/test_tensor_multicrop.py compares each against torchvision image by image.
Where torchvision already does a batch (grey, normalise), it is called. The resized crops are in
``tensor_resize``. Everything runs on whatever device the batch is on.
"""

from __future__ import annotations

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


def adjust_hue(image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``F.adjust_hue`` per image: shift the hue by factor (N,) in [-0.5, 0.5], modulo 1.

    torchvision goes to HSV (hue h from the max channel, s = chroma / max, v = max), shifts h and
    picks each channel from (v, p, q, t) by the sector floor(6h). That round trip is one piecewise-linear
    function of the pixel; written directly, channel n (R 5, G 3, B 1) of the result is
    ``max - chroma * clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6 h') mod 6`` and 6 h' = 6 h + 6 factor,
    where 6 h is 0 + (g - b) / chroma, 2 + (b - r) / chroma or 4 + (r - g) / chroma as the max is R, G
    or B (torchvision's order of ties). v s = chroma, so p = v (1 - s), q = v (1 - s f), t = v (1 - s (1 - f))
    are these values up to float rounding (tests/data/test_tensor_multicrop.py: within 2e-6 of torchvision).
    Grey pixels (chroma 0) keep their value, as torchvision's hue 0 and s 0 give. About 30 elementwise
    passes instead of the round trip's 60.
    """
    r, g, b = image.unbind(dim=-3)
    maxc, minc = image.amax(dim=-3), image.amin(dim=-3)
    chroma = maxc - minc
    is_r, is_g = maxc == r, maxc == g
    diff = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = torch.where(is_r, 0.0, torch.where(is_g, 2.0, 4.0))
    hue6 = diff.div_(torch.where(chroma == 0, 1.0, chroma)).add_(offset).add_(6.0 * factor.view(-1, 1, 1))
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(hue6 + n, 6.0)
        ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
        channels.append(torch.addcmul(maxc, chroma, ramp, value=-1.0))
    return torch.stack(channels, dim=-3)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # ColorJitter's op indices
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


SLICES_MIN_PIXELS = 64 * 64  # from this image size, per-image ops change runs of slices, below it masked rows


def runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """The runs of True in an (N,) bool mask, as (start, stop) pairs."""
    edges = torch.diff(mask.to("cpu", torch.int8), prepend=torch.zeros(1, dtype=torch.int8),
                       append=torch.zeros(1, dtype=torch.int8))
    return list(zip((edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()))


def on_images_(image: torch.Tensor, apply: torch.Tensor, op) -> torch.Tensor:
    """``image[apply] = op(image[apply], apply)`` in place; ``op(rows, index)`` indexes its per-image
    parameters with ``index`` (a bool mask or a slice).

    Large images (SLICES_MIN_PIXELS or more) change runs of contiguous slices: no gather and no
    scatter (on the CPU those copy value by value), few calls once the rows are sorted by the op
    (``tensor_multicrop.apply_view``). Small images change the masked rows in one call each way.
    """
    if image.shape[-2] * image.shape[-1] >= SLICES_MIN_PIXELS:
        for start, stop in runs(apply):
            rows = slice(start, stop)
            image[rows] = op(image[rows], rows)
    elif bool(apply.any()):
        image[apply] = op(image[apply], apply)
    return image


def _blend_slot_(image: torch.Tensor, factors: torch.Tensor, op: torch.Tensor) -> None:
    """Brightness, contrast or saturation per image, chosen by ``op`` (N,) (-1 or HUE: unchanged), in place.

    The three are blends: clamp(a x + c grey(x) + d mean(grey(x))) with (a, c, d) = (f, 0, 0),
    (f, 0, 1 - f), (f, 1 - f, 0); the other images get (1, 0, 0), which leaves them exactly as they
    are. A zero term adds exactly 0, so each image gets the sum that torchvision's ``_blend``
    computes, f x + (1 - f) other, in its order.
    """
    f = torch.gather(factors, 1, op.clamp(min=0).view(-1, 1)).squeeze(1)
    blended = (op >= 0) & (op < HUE)
    zero = torch.zeros_like(f)
    saturation, contrast = op == SATURATION, op == CONTRAST
    grey = luma(image) if bool((saturation | contrast).any()) else None
    mean = grey.mean(dim=(-3, -2, -1), keepdim=True) if grey is not None and bool(contrast.any()) else None
    image.mul_(_per_image(torch.where(blended, f, torch.ones_like(f))))
    if grey is not None:
        image.addcmul_(grey, _per_image(torch.where(saturation, 1.0 - f, zero)))
    if mean is not None:  # (N, 1, 1, 1) terms: one product, then a broadcast add (addcmul_ is slow on these)
        image.add_(mean.mul_(_per_image(torch.where(contrast, 1.0 - f, zero))))
    image.clamp_(0.0, 1.0)


def color_jitter(image: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 apply: torch.Tensor, active: tuple[bool, ...] = (True,) * 4) -> torch.Tensor:
    """torchvision ``ColorJitter`` per image: its four ops in that image's own order (a new tensor)."""
    return color_jitter_(image.clone(), factors, order, apply, active)


def color_jitter_(image: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                  apply: torch.Tensor, active: tuple[bool, ...] = (True,) * 4) -> torch.Tensor:
    """``color_jitter`` in place.

    Per slot of the order, one blend pass over the batch (``_blend_slot_``), then the hue shift on
    the images whose op in that slot is hue (``on_images_``). A one-channel batch (grey images, see
    ``grey_batch``) skips the hue shift, which leaves grey pixels unchanged; on RGB images the direct
    formula of ``adjust_hue`` gives a grey pixel back exactly.

    Args:
        image: (N, C, H, W) float in [0, 1], C = 3 or 1.
        factors: (N, 4) brightness, contrast, saturation, hue factors.
        order: (N, 4) a permutation of 0..3 per image (ColorJitter's ``fn_idx``).
        apply: (N,) bool, images that are jittered (RandomApply's draw).
        active: ops ColorJitter runs at all (it skips one whose range is zero).
    """
    runs_op = torch.tensor(active, device=order.device)[order] & apply.view(-1, 1)  # (N, 4) op of slot s runs
    ops = torch.where(runs_op, order, torch.full_like(order, -1))
    for slot in range(4):
        op = ops[:, slot]
        if bool(((op >= 0) & (op < HUE)).any()):
            _blend_slot_(image, factors, op)
        if image.shape[-3] == 3:
            on_images_(image, op == HUE, lambda rows, index: adjust_hue(rows, factors[index, HUE]))
    return image


def hue_slot(order: torch.Tensor, apply: torch.Tensor, active: tuple[bool, ...]) -> torch.Tensor:
    """(N,) the slot of the order in which each image's hue shift runs; 4 where it does not run."""
    slot = (order == HUE).to(torch.int64).argmax(dim=1)
    return torch.where(apply & active[HUE], slot, torch.full_like(slot, 4))


def gaussian_kernels(kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """(N, kernel_size) normalised 1-D Gaussians, torchvision's ``_get_gaussian_kernel1d`` per sigma (N,)."""
    # exp(-d^2 / (2 sigma^2)) at offsets d = -(k-1)/2 .. (k-1)/2, written as torchvision writes it.
    lim = (kernel_size - 1) / (2.0 * 2.0 ** 0.5)
    x = torch.linspace(-lim, lim, kernel_size, device=sigma.device, dtype=torch.float32)
    return torch.softmax(x.view(1, -1).div(sigma.view(-1, 1).float()).pow(2).neg(), dim=1)


BLUR_BY_SHIFTS_MIN_PIXELS = 128 * 128  # from this size, shifted sums beat the grouped convolution on the CPU


def gaussian_blur(image: torch.Tensor, kernel_size: int, sigma: torch.Tensor) -> torch.Tensor:
    """``F.gaussian_blur(img, [k, k], [s, s])`` per image: reflect padding, one sigma (N,) per image.

    torchvision convolves with the 2-D outer product; this runs the two 1-D passes (equal up to
    float rounding): on the CPU, for images of BLUR_BY_SHIFTS_MIN_PIXELS or more, as sums of
    shifted slices of each image, one per tap (oneDNN's grouped convolution runs a 1 x 23 kernel
    per channel slowly); otherwise as one grouped convolution over all images and channels.
    """
    n, c, h, w = image.shape
    kernels = gaussian_kernels(kernel_size, sigma).to(image.dtype)  # (N, k)
    pad = kernel_size // 2
    if image.device.type == "cpu" and h * w >= BLUR_BY_SHIFTS_MIN_PIXELS:
        return _blur_by_shifts(nnf.pad(image, [pad, pad, pad, pad], mode="reflect"), kernels.tolist(), h, w)
    kernels = kernels.repeat_interleave(c, dim=0)  # (N*C, k)
    flat = nnf.pad(image.reshape(1, n * c, h, w), [pad, pad, pad, pad], mode="reflect")
    flat = nnf.conv2d(flat, kernels.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = nnf.conv2d(flat, kernels.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _blur_by_shifts(padded: torch.Tensor, kernels: list[list[float]], h: int, w: int) -> torch.Tensor:
    """Separable blur of each padded image (N, C, h + k - 1, w + k - 1): sum_j k_j x[j : j + w], then down."""
    out = padded.new_empty(padded.shape[:2] + (h, w))
    for image, kernel, dest in zip(padded, kernels, out):
        across = image[..., :w] * kernel[0]
        for j, weight in enumerate(kernel[1:], start=1):
            across.add_(image[..., j:j + w], alpha=weight)
        torch.mul(across[:, :h], kernel[0], out=dest)
        for j, weight in enumerate(kernel[1:], start=1):
            dest.add_(across[:, j:j + h], alpha=weight)
    return out


def blur_(image: torch.Tensor, kernel_size: int, sigma: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``gaussian_blur`` in place on the images where apply (N,) is True."""
    return on_images_(image, apply, lambda rows, index: gaussian_blur(rows, kernel_size, sigma[index]))


def solarize(image: torch.Tensor, threshold: float, apply: torch.Tensor) -> torch.Tensor:
    """``F.solarize`` (float: values >= threshold become 1 - value) on the images where apply (N,) is True."""
    return solarize_(image.clone(), threshold, apply)


def solarize_(image: torch.Tensor, threshold: float, apply: torch.Tensor) -> torch.Tensor:
    """``solarize`` in place."""
    return on_images_(image, apply, lambda rows, _: torch.where(rows >= threshold, 1.0 - rows, rows))


def hflip(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``F.horizontal_flip`` on the images where apply (N,) is True."""
    return hflip_(image.clone(), apply)


def hflip_(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``hflip`` in place."""
    return on_images_(image, apply, lambda rows, _: rows.flip(-1))


def grayscale(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``F.rgb_to_grayscale(num_output_channels=3)`` on the images where apply (N,) is True."""
    return grayscale_(image.clone(), apply)


def grayscale_(image: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """``grayscale`` in place."""
    return on_images_(image, apply, lambda rows, _: luma(rows).expand_as(rows))


def normalize(image: torch.Tensor, mean, std) -> torch.Tensor:
    """``F.normalize`` of the batch with per-channel mean and std; a one-channel (grey) batch becomes RGB first."""
    if image.shape[-3] == 1 and len(mean) == 3:
        image = image.expand(-1, 3, -1, -1)
    return F.normalize(image, list(mean), list(std))
