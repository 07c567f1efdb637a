"""DINO multi-crop on batches of uint8 tensors: per-image random parameters, batched operations.

The same augmentation as ``transforms.MultiCropTransform`` (DINO, Caron et al. 2021, arXiv
2104.14294; facebookresearch/dino ``main_dino.py`` ``DataAugmentationDINO``), for a whole batch at
once, selected by ``data.multicrop=tensor``. Every random parameter is drawn per image from a
``torch.Generator`` with torchvision's rules (``RandomResizedCrop.get_params`` with its 10 tries and
central-crop fallback, ``ColorJitter.get_params`` with its random op order, ``RandomApply`` /
``RandomGrayscale`` / ``RandomHorizontalFlip`` / ``RandomSolarize`` draws ``rand < p``, GaussianBlur's
uniform sigma), then applied by ``tensor_resize`` and ``tensor_ops``. Parameters are drawn on the CPU whatever the images'
device, so the same generator gives the same views on CPU and GPU (up to float rounding).

In training the DataLoader's collate function (TensorMultiCropCollate) runs it in the loader
workers on the samples' uint8 tensors; the function itself runs on any device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ssl_bench.config import DataConfig
from ssl_bench.data import decode, tensor_ops, tensor_resize
from ssl_bench.data.batch import Batch
from ssl_bench.data.transforms import SOLARIZE_THRESHOLD, blur_params

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop's default aspect range, as DINO
CROP_ATTEMPTS = 10  # RandomResizedCrop.get_params tries before its central-crop fallback


def _uniform(n: int, low: float, high: float, generator: torch.Generator, columns: int = 0) -> torch.Tensor:
    shape = (n, columns) if columns else (n,)
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor, scale: Sequence[float],
                      ratio: Sequence[float], generator: torch.Generator) -> torch.Tensor:
    """``RandomResizedCrop.get_params`` per image, vectorised: (N, 4) int64 (top, left, height, width).

    Per image: up to CROP_ATTEMPTS draws of an area fraction ~ U(scale) and a log aspect ratio
    ~ U(log ratio); the first whose rounded box fits is kept, its corner uniform over the valid
    positions; if none fits, torchvision's central crop clipped to the ratio range.

    Args:
        heights, widths: (N,) image sizes in pixels.
    """
    n = len(heights)
    height, width = heights.double(), widths.double()
    area = (height * width)[:, None]
    target = area * _uniform(n, scale[0], scale[1], generator, CROP_ATTEMPTS)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(_uniform(n, log_lo, log_hi, generator, CROP_ATTEMPTS))
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.int64).argmax(dim=1, keepdim=True)
    h, w = h.gather(1, first).squeeze(1), w.gather(1, first).squeeze(1)
    corner = torch.rand((n, 2), generator=generator, dtype=torch.float64)
    top = torch.floor(corner[:, 0] * (height - h + 1))
    left = torch.floor(corner[:, 1] * (width - w + 1))
    found = fits.any(dim=1)
    if not bool(found.all()):
        fh, fw = _fallback_size(height, width, ratio)
        h, w = torch.where(found, h, fh), torch.where(found, w, fw)
        top = torch.where(found, top, torch.div(height - fh, 2, rounding_mode="floor"))
        left = torch.where(found, left, torch.div(width - fw, 2, rounding_mode="floor"))
    return torch.stack((top, left, h, w), dim=1).to(torch.int64)


def _fallback_size(height: torch.Tensor, width: torch.Tensor, ratio: Sequence[float]):
    """RandomResizedCrop's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    in_ratio = width / height
    too_tall, too_wide = in_ratio < min(ratio), in_ratio > max(ratio)
    h = torch.where(too_tall, torch.round(width / min(ratio)), height)
    w = torch.where(too_wide, torch.round(height * max(ratio)), width)
    return h, w


def jitter_ranges(color_jitter: Sequence[float]) -> list[tuple[float, float]]:
    """ColorJitter's factor ranges: [max(0, 1 - v), 1 + v] for brightness, contrast, saturation; [-h, h] for hue."""
    b, c, s, h = color_jitter
    return [(max(0.0, 1.0 - v), 1.0 + v) for v in (b, c, s)] + [(-h, h)]


@dataclass(frozen=True)
class ViewSpec:
    """One kind of DINO view: its size, crop scale and per-view probabilities (DESIGN.md §5)."""

    size: int
    scale: tuple[float, float]
    flip_p: float
    jitter_p: float
    jitter: tuple[float, float, float, float]
    grayscale_p: float
    blur_p: float
    blur: Optional[tuple[int, tuple[float, float]]]  # transforms.blur_params: (kernel, sigma range) or None
    solarize_p: float = 0.0


@dataclass
class ViewParams:
    """Per-image random parameters of N views, as torchvision's transforms would draw them.

    Fields (N rows each): boxes (N, 4) int64 (top, left, height, width); flip, jitter, gray, blur,
    solarize (N,) bool; factors (N, 4) float (brightness, contrast, saturation, hue); order (N, 4)
    int64 permutations of 0..3; sigma (N,) float.
    """

    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    def rows(self, index: slice) -> "ViewParams":
        """The parameters of rows ``index`` of the N views."""
        return ViewParams(**{name: getattr(self, name)[index] for name in self.__dataclass_fields__})


def sample_view_params(spec: ViewSpec, heights: torch.Tensor, widths: torch.Tensor,
                       generator: torch.Generator) -> ViewParams:
    """Draw every random parameter of N views of ``spec`` (N = len(heights)), in a fixed order."""
    n = len(heights)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64) < p

    boxes = sample_crop_boxes(heights, widths, spec.scale, CROP_RATIO, generator)
    flip, jitter = coin(spec.flip_p), coin(spec.jitter_p)
    factors = torch.stack([_uniform(n, lo, hi, generator) for lo, hi in jitter_ranges(spec.jitter)], dim=1)
    order = torch.rand((n, 4), generator=generator).argsort(dim=1)  # a uniform random permutation per image
    gray, blur = coin(spec.grayscale_p), coin(spec.blur_p)
    sigma_range = spec.blur[1] if spec.blur is not None else (1.0, 1.0)
    sigma = _uniform(n, *sigma_range, generator)
    if spec.blur is None:
        blur = torch.zeros_like(blur)
    return ViewParams(boxes, flip, jitter, factors.float(), order, gray, blur, sigma.float(), coin(spec.solarize_p))


CHUNK_VALUES = 2**20  # float values per chunk of views (4 MiB): larger tensors cost a fresh mmap per operation


def apply_view(images: list[torch.Tensor], params: ViewParams, spec: ViewSpec,
               mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """One view per image with the given parameters, in DINO's order.

    Crop and resize (bicubic, antialias), flip, colour jitter (p, own op order), grey, blur,
    solarize (threshold 128 of 255), normalise. Each image's view depends on its own parameters
    only, so the rows may run in any order and grouping. Views of SLICES_MIN_PIXELS or more run
    sorted by (blurred, slot of the hue shift), so that those two, the costly ops, change few
    contiguous slices in place (``tensor_ops.on_images_``). All run in chunks
    of about CHUNK_VALUES float values (every operation allocates its result, and glibc serves an
    allocation above 32 MiB, such as ten 96-px local views of 32 images, with a fresh, page-faulted
    mmap each time; chunks stay on its heap). Each view is then copied to its image's row.

    Args:
        images: N uint8 (3, H_i, W_i) tensors on one device, or a (N, C, H, W) batch; C = 1 stands for
            grey RGB images (``tensor_ops.grey_batch``) and gives bitwise their views.

    Returns: (N, 3, size, size) float32 on the images' device.
    """
    n = len(images)
    order = None
    if spec.size * spec.size >= tensor_ops.SLICES_MIN_PIXELS:  # ops change slices (tensor_ops.on_images_)
        key = params.blur.to(torch.int64) * 5 + tensor_ops.hue_slot(params.order, params.jitter, _active(spec))
        perm = torch.argsort(key, stable=True)
        params, order = params.rows(perm), perm.tolist()
        if isinstance(images, torch.Tensor):
            images = images.index_select(0, perm.to(images.device))
        else:
            images = [images[i] for i in order]
    step = max(1, CHUNK_VALUES // (3 * spec.size * spec.size))
    if order is None and n <= step:
        return _apply_chunk(images, params, spec, mean, std)
    out = torch.empty((n, 3, spec.size, spec.size), device=images[0].device)
    for start in range(0, n, step):
        views = _apply_chunk(images[start:start + step], params.rows(slice(start, start + step)), spec, mean, std)
        if order is None:
            out[start:start + step] = views
        else:
            for view, row in zip(views, order[start:start + step]):  # row by row: a gather copies value by value
                out[row] = view
    return out


def _active(spec: ViewSpec) -> tuple[bool, ...]:
    return tuple(lo != hi for lo, hi in jitter_ranges(spec.jitter))  # ColorJitter skips a zero range


def _apply_chunk(images, params: ViewParams, spec: ViewSpec, mean, std) -> torch.Tensor:
    device = images[0].device
    p = {name: getattr(params, name).to(device) for name in ("factors", "order", "jitter", "sigma")}
    x = tensor_resize.resized_crops(images, params.boxes, spec.size)  # a new tensor: changed in place below
    tensor_ops.hflip_(x, params.flip)
    tensor_ops.color_jitter_(x, p["factors"], p["order"], p["jitter"], _active(spec))
    tensor_ops.grayscale_(x, params.gray)
    if spec.blur is not None:
        tensor_ops.blur_(x, spec.blur[0], p["sigma"], params.blur)
    tensor_ops.solarize_(x, SOLARIZE_THRESHOLD / 255.0, params.solarize)
    return tensor_ops.normalize(x, mean, std)


class TensorMultiCrop:
    """DINO multi-crop of a batch of uint8 images: 2 global views then ``local_crops_number`` locals.

    The batched counterpart of ``transforms.MultiCropTransform`` with the same configuration:
    global view 1 blurred with p=blur_p[0], view 2 with p=blur_p[1] and solarized with p=solarize_p,
    locals blurred with p=blur_p[2]; blur sigmas scaled and skipped as ``transforms.blur_params``.

    Args:
        cfg: crop sizes, scales and ``cfg.aug`` probabilities.
        mean, std: per-channel normalisation (3 floats each).

    Returns (when called on B uint8 (3, H_i, W_i) images, a list or a (B, 3, H, W) tensor, and a
    generator): ``2 + local_crops_number`` float32 tensors, two (B, 3, G, G) then (B, 3, L, L).
    """

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float]):
        aug = cfg.aug
        if len(aug.blur_p) != 3:
            raise ValueError(f"data.aug.blur_p needs 3 probabilities (global 1, global 2, local), got {aug.blur_p}")
        common = dict(flip_p=aug.flip_p, jitter_p=aug.color_jitter_p, jitter=tuple(aug.color_jitter),
                      grayscale_p=aug.grayscale_p)
        size, scale = cfg.global_crop_size, tuple(cfg.global_crop_scale)
        self.global1 = ViewSpec(size, scale, blur_p=aug.blur_p[0], blur=blur_params(cfg, size, aug.blur_p[0]),
                                **common)
        self.global2 = ViewSpec(size, scale, blur_p=aug.blur_p[1], blur=blur_params(cfg, size, aug.blur_p[1]),
                                solarize_p=aug.solarize_p, **common)
        local = cfg.local_crop_size
        self.local = ViewSpec(local, tuple(cfg.local_crop_scale), blur_p=aug.blur_p[2],
                              blur=blur_params(cfg, local, aug.blur_p[2]), **common)
        self.local_crops_number = cfg.local_crops_number
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, images, generator: torch.Generator) -> list[torch.Tensor]:
        images = list(images)
        heights = torch.tensor([image.shape[-2] for image in images])
        widths = torch.tensor([image.shape[-1] for image in images])
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) == 1 and math.prod(next(iter(shapes))[-2:]) <= tensor_resize.BATCHED_RESIZE_MAX_PIXELS:
            images = torch.stack(images)  # the batched resize's input; large images stay a list (no copies)
            if tensor_ops.grey_batch(images):  # Fashion-MNIST: one channel all the way, RGB at normalisation
                images = images[:, :1]
        views = [self._views(self.global1, images, heights, widths, generator),
                 self._views(self.global2, images, heights, widths, generator)]
        if self.local_crops_number:
            n, b = self.local_crops_number, len(images)
            # All locals in one call, view-major: rows v*B .. (v+1)*B - 1 are local view v.
            repeated = images.repeat(n, 1, 1, 1) if isinstance(images, torch.Tensor) else images * n
            locals_ = self._views(self.local, repeated, heights.repeat(n), widths.repeat(n), generator)
            views += list(locals_.split(b))
        return views

    def _views(self, spec: ViewSpec, images, heights, widths, generator) -> torch.Tensor:
        params = sample_view_params(spec, heights, widths, generator)
        return apply_view(images, params, spec, self.mean, self.std)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(\n  global1={self.global1},\n  global2={self.global2},\n"
                f"  local x{self.local_crops_number}={self.local})")


image_to_uint8 = decode.as_uint8  # the dataset-side transform of data.multicrop=tensor


def split_samples(samples: list[tuple[torch.Tensor, Any]]) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """(images, (B,) int64 labels, the batch's generator seed) of B samples ``(image, label)``.

    The seed is drawn from torch's global RNG, which SeededCollate seeds per batch; both places that
    make tensor crops (TensorMultiCropCollate here, ``device_multicrop`` after the transfer) draw it so.
    """
    images = [image for image, _ in samples]
    labels = torch.tensor([int(label) for _, label in samples], dtype=torch.int64)
    return images, labels, int(torch.randint(2**62, (1,)))


class TensorMultiCropCollate:
    """DataLoader ``collate_fn``: B samples ``(uint8 (3, H, W) image, label)`` -> ``Batch(crops, labels)``.

    Its generator is seeded from torch's global RNG, which ``resumable.SeededCollate`` seeds per
    batch from (seed, epoch, batch position): the crops are a pure function of those, whatever the
    worker, and an exactly resumed run sees the same crops.
    """

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float]):
        self.multicrop = TensorMultiCrop(cfg, mean, std)

    def __call__(self, samples: list[tuple[torch.Tensor, Any]]) -> Batch:
        images, labels, seed = split_samples(samples)
        return Batch(self.multicrop(images, torch.Generator().manual_seed(seed)), labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.multicrop!r})"
