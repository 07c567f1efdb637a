"""Batched multi-crop on uint8 tensors (data.multicrop=tensor) against torchvision, op by op and in distribution.

Equivalence: for the same per-image parameters every batched op equals torchvision's functional op on
each image. Distributions: the per-image samplers against torchvision's own samplers, by two-sample
Kolmogorov-Smirnov statistics (scipy is not installed; the statistic is computed here and compared with
the asymptotic critical value at alpha = 1e-3) and binomial bounds, all with fixed seeds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F1
from torchvision.transforms.v2 import functional as F

from ssl_bench import config as config_lib
from ssl_bench.config import AugConfig, DataConfig
from ssl_bench.data import MultiCropTransform, SSLDataModule, tensor_ops, tensor_resize
from ssl_bench.data.tensor_multicrop import (CROP_RATIO, TensorMultiCrop, TensorMultiCropCollate, ViewParams,
                                             ViewSpec, apply_view, jitter_ranges, sample_crop_boxes,
                                             sample_view_params)
from ssl_bench.data.transforms import blur_params

BICUBIC = F.InterpolationMode.BICUBIC
KS_C = 1.949  # c(alpha) of the two-sample KS test at alpha = 1e-3: D_crit = c * sqrt((n + m) / (n m))
Z = 4.5  # binomial bounds at 4.5 sigma: a false failure about once in 150000 checks


def ks_statistic(a, b) -> float:
    """Two-sample Kolmogorov-Smirnov D = sup |F_a - F_b| over all sample values."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def assert_same_distribution(a, b) -> None:
    n, m = len(a), len(b)
    limit = KS_C * math.sqrt((n + m) / (n * m))
    assert ks_statistic(a, b) < limit, (ks_statistic(a, b), limit)


def assert_rate(flags: torch.Tensor, p: float) -> None:
    n = flags.numel()
    rate = flags.double().mean().item()
    assert abs(rate - p) <= Z * math.sqrt(p * (1 - p) / n) + 1e-12, (rate, p)


def uint8_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour content plus noise, so crops, blur and hue all have something to change."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand((n, 3, h // 4 + 1, w // 4 + 1), generator=g)
    smooth = torch.nn.functional.interpolate(base, size=(h, w), mode="bilinear", align_corners=False)
    noisy = smooth + 0.1 * torch.randn((n, 3, h, w), generator=g)
    return (noisy.clamp(0, 1) * 255).round().to(torch.uint8)


def float_images(n: int = 6, size: int = 12, seed: int = 0) -> torch.Tensor:
    return uint8_images(n, size, size, seed).float() / 255


def imagenet_config(**aug) -> DataConfig:
    return DataConfig(global_crop_size=224, local_crop_size=96, local_crops_number=10,
                      eval_resize=256, eval_crop_size=224, aug=AugConfig(**aug))


# ---- each op equals torchvision's on each image ---------------------------------------------------


def test_resized_crop_is_torchvision_per_image_and_within_one_grey_level_of_pil():
    images = list(uint8_images(4, 30, 40)) + list(uint8_images(2, 375, 500, seed=1))
    boxes = torch.tensor([[0, 0, 30, 40], [3, 5, 12, 20], [10, 2, 20, 9], [29, 39, 1, 1],
                          [10, 20, 300, 280], [0, 100, 375, 400]])
    out = tensor_resize.resized_crops(images, boxes, 24)
    assert out.shape == (6, 3, 24, 24) and out.dtype == torch.float32
    for i, (image, box) in enumerate(zip(images, boxes.tolist())):
        v2 = F.resized_crop(image, *box, [24, 24], interpolation=BICUBIC, antialias=True)
        torch.testing.assert_close(out[i], v2.float() / 255, atol=0, rtol=0)
        # The PIL path: PIL's antialiased bicubic in 8-bit fixed point. torchvision.v2 on a CPU uint8 image runs
        # torch's uint8 kernel, which follows PIL's filter: at most one grey level apart (rounding). torch's float
        # kernel (v1 on tensors, float inputs, CUDA) is not PIL's: up to 8 levels on pixel noise (below).
        pil = F.pil_to_tensor(F1.resized_crop(Image.fromarray(image.permute(1, 2, 0).numpy()), *box, [24, 24],
                                              interpolation=BICUBIC))
        assert (out[i] * 255 - pil.float()).abs().max() <= 1.0 + 1e-4
    as_float = F1.resized_crop(images[2].float(), *boxes[2].tolist(), [24, 24], interpolation=BICUBIC, antialias=True)
    assert (as_float.round().clamp(0, 255) - out[2] * 255).abs().max() > 1.0  # why the CPU path keeps uint8


@pytest.mark.parametrize("height,width,size", [(17, 13, 9), (8, 11, 20), (28, 28, 12)])
def test_batched_resized_crop_equals_torchvisions_uint8_kernel_for_every_box(height, width, size):
    # Every (start, length) pair of both axes, shrinking and enlarging: the fixed-point weights must
    # reproduce torch's uint8 kernel (the one torchvision.v2 calls) to the grey level, not within one.
    def partner(start: int, length: int, full: int) -> tuple[int, int]:  # some valid box on the other axis
        other = (start * 7 + length) % full
        return other, 1 + (length * 5 + start) % (full - other)

    rows = [(t, l, h, w) for t in range(height) for h in range(1, height - t + 1) for l, w in [partner(t, h, width)]]
    cols = [(t, l, h, w) for l in range(width) for w in range(1, width - l + 1) for t, h in [partner(l, w, height)]]
    boxes = torch.tensor(rows + cols)
    assert ((boxes[:, 0] + boxes[:, 2] <= height) & (boxes[:, 1] + boxes[:, 3] <= width)).all()
    images = uint8_images(len(boxes), height, width, seed=4)
    out = tensor_resize.resized_crops(list(images), boxes, size)  # one size, small: the batched path
    expected = torch.stack([F.resized_crop(image, *box, [size, size], interpolation=BICUBIC, antialias=True)
                            for image, box in zip(images, boxes.tolist())])
    torch.testing.assert_close(out * 255, expected.float(), atol=0, rtol=0)


def test_resample_weights_by_hand():
    # Crop [2, 6) of an 8-pixel axis to 2 pixels: scale 2, support 4; output pixel 0 centres at 1 (crop
    # coordinates), taps 0..2 (trunc(1 - 4 + .5) -> 0, trunc(1 + 4 + .5) = 5 clipped to 4 -> taps 0..3).
    # Filter argument (j - 1 + .5) / 2 for j = 0..3: -.25, .25, .75, 1.25.
    def keys(x):
        x = abs(x)
        return 1.5 * x ** 3 - 2.5 * x ** 2 + 1 if x < 1 else -0.5 * x ** 3 + 2.5 * x ** 2 - 4 * x + 2
    raw = [keys(v) for v in (-0.25, 0.25, 0.75, 1.25)]
    expected = torch.zeros(8, dtype=torch.float64)
    expected[2:6] = torch.tensor(raw, dtype=torch.float64) / sum(raw)
    weights = tensor_resize.resample_weights(torch.tensor([2]), torch.tensor([4]), 2, 8)
    torch.testing.assert_close(weights[0, 0], expected, atol=1e-12, rtol=0)
    # Enlarging leaves the filter unstretched: 1 pixel to 3 gives weight 1 on it.
    assert tensor_resize.resample_weights(torch.tensor([5]), torch.tensor([1]), 3, 8)[0, :, 5].tolist() == [1.0] * 3


def test_jitter_changes_only_the_images_it_applies_to():
    x = float_images(8)
    factors = torch.tensor([[1.3, 0.6, 1.5, 0.1]] * 8) * torch.linspace(0.8, 1.1, 8).view(-1, 1)
    order = torch.stack([torch.roll(torch.arange(4), i) for i in range(8)])
    apply = torch.tensor([True, False, True, True, False, True, False, True])
    out = tensor_ops.color_jitter(x, factors, order, apply)
    for i in range(8):
        if apply[i]:
            torch.testing.assert_close(out[i], reference_jitter(x[i], factors[i], order[i].tolist()), atol=3e-6, rtol=0)
            assert not torch.equal(out[i], x[i])
        else:
            assert torch.equal(out[i], x[i])


def test_hue_shift_on_ties_greys_black_and_white_pixels():
    """The direct formula against torchvision on every tie between channels (where the sector changes)."""
    levels = torch.tensor([0, 1, 64, 128, 200, 254, 255]) / 255.0
    rgb = torch.cartesian_prod(levels, levels, levels).T  # (3, 343): every tie pattern, greys, 0 and 1
    x = rgb.reshape(1, 3, 7, 49).expand(5, 3, 7, 49).clone()
    factors = torch.tensor([-0.5, -0.17, 0.0, 0.29, 0.5])
    out = tensor_ops.adjust_hue(x, factors)
    for i in range(5):
        torch.testing.assert_close(out[i], F.adjust_hue(x[i], float(factors[i])), atol=2e-6, rtol=0)
    torch.testing.assert_close(out[2], x[2], atol=1e-6, rtol=0)  # a zero shift changes nothing


def test_grey_images_stay_exactly_grey_and_what_torchvision_makes():
    grey = float_images(4)[:, :1].expand(4, 3, 12, 12).clone()
    x = torch.cat([grey, float_images(2)])
    assert torch.equal(tensor_ops.adjust_hue(grey, torch.tensor([-0.5, -0.2, 0.3, 0.5])), grey)
    factors = torch.tensor([[1.2, 0.8, 1.4, 0.3]] * 6)
    order = torch.tensor([[3, 0, 1, 2], [0, 3, 2, 1], [1, 2, 3, 0], [2, 1, 0, 3], [3, 2, 1, 0], [0, 1, 3, 2]])
    out = tensor_ops.color_jitter(x, factors, order, torch.ones(6, dtype=torch.bool))
    for i in range(6):
        expected = reference_jitter(x[i], factors[i], order[i].tolist())
        torch.testing.assert_close(out[i], expected, atol=3e-6, rtol=0)
    assert torch.equal(out[:4, 0], out[:4, 1]) and torch.equal(out[:4, 0], out[:4, 2])


def test_inactive_jitter_ops_are_skipped():
    x = float_images(3)
    factors = torch.tensor([[1.3, 0.7, 1.6, 0.08]] * 3)
    order = torch.tensor([[0, 1, 2, 3]] * 3)
    out = tensor_ops.color_jitter(x, factors, order, torch.ones(3, dtype=torch.bool), (True, False, True, False))
    for i in range(3):
        torch.testing.assert_close(out[i], reference_jitter(x[i], factors[i], [0, 2]), atol=3e-6, rtol=0)


def test_flip_grayscale_solarize_normalize_per_image():
    x = float_images()
    apply = torch.tensor([True, False, True, True, False, False])
    flipped, grey = tensor_ops.hflip(x, apply), tensor_ops.grayscale(x, apply)
    solar = tensor_ops.solarize(x, 128 / 255, apply)
    mean, std = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)
    normed = tensor_ops.normalize(x, mean, std)
    for i in range(len(x)):
        on = bool(apply[i])
        torch.testing.assert_close(flipped[i], F.horizontal_flip(x[i]) if on else x[i], atol=0, rtol=0)
        torch.testing.assert_close(grey[i], F.rgb_to_grayscale(x[i], 3) if on else x[i], atol=0, rtol=0)
        torch.testing.assert_close(solar[i], F.solarize(x[i], 128 / 255) if on else x[i], atol=0, rtol=0)
        torch.testing.assert_close(normed[i], F.normalize(x[i], list(mean), list(std)), atol=1e-6, rtol=0)
    assert not torch.equal(flipped[0], x[0]) and not torch.equal(solar[0], x[0])


def test_solarize_threshold_is_128_of_255_as_pil():
    levels = torch.tensor([127, 128, 200], dtype=torch.float32).view(1, 3, 1, 1) / 255
    out = tensor_ops.solarize(levels, 128 / 255, torch.tensor([True]))
    torch.testing.assert_close(out.flatten() * 255, torch.tensor([127.0, 127.0, 55.0]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("op, reference, lo, hi", [
    (tensor_ops.adjust_brightness, F.adjust_brightness, 0.6, 1.4),
    (tensor_ops.adjust_contrast, F.adjust_contrast, 0.6, 1.4),
    (tensor_ops.adjust_saturation, F.adjust_saturation, 0.0, 2.0),
    (tensor_ops.adjust_hue, F.adjust_hue, -0.5, 0.5),
])
def test_each_colour_jitter_op_with_a_factor_per_image(op, reference, lo, hi):
    x = float_images(8)
    factors = torch.linspace(lo, hi, 8)
    out = op(x, factors)
    for i in range(len(x)):
        torch.testing.assert_close(out[i], reference(x[i], factors[i].item()), atol=2e-6, rtol=0)
    assert not torch.allclose(out[0], out[-1])


def reference_jitter(image: torch.Tensor, factors, order) -> torch.Tensor:
    """torchvision ColorJitter.forward with given parameters (its fn_idx loop)."""
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    for index in order:
        image = ops[index](image, float(factors[index]))
    return image


def test_colour_jitter_follows_each_images_own_order():
    x = float_images(6)
    factors = torch.tensor([[1.3, 0.7, 1.6, 0.08]] * 6)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 1, 2, 3], [3, 1, 2, 0]])
    apply = torch.tensor([True, True, True, True, False, True])
    out = tensor_ops.color_jitter(x, factors, order, apply)
    for i in range(len(x)):
        expected = reference_jitter(x[i], factors[i], order[i].tolist()) if apply[i] else x[i]
        torch.testing.assert_close(out[i], expected, atol=3e-6, rtol=0)
    # The order matters: the same factors in another order give another image.
    assert not torch.allclose(reference_jitter(x[0], factors[0], [0, 1, 2, 3]),
                              reference_jitter(x[0], factors[0], [3, 2, 1, 0]), atol=1e-3)


def test_zero_jitter_range_is_skipped_as_colorjitter_does():
    assert jitter_ranges([0.4, 0.0, 0.2, 0.0]) == [(0.6, 1.4), (1.0, 1.0), (0.8, 1.2), (-0.0, 0.0)]
    jitter = T.ColorJitter(0.4, 0.0, 0.2, 0.0)
    assert jitter.contrast is None and jitter.hue is None


@pytest.mark.parametrize("kernel", [3, 7, 15])
@pytest.mark.parametrize("size", [16, 128])  # the grouped convolution, the shifted sums (BLUR_BY_SHIFTS_MIN_PIXELS)
def test_gaussian_blur_with_a_sigma_per_image(kernel, size):
    x = float_images(5, size)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 3.3])
    out = tensor_ops.gaussian_blur(x, kernel, sigma)
    for i in range(len(x)):
        expected = F.gaussian_blur(x[i], [kernel, kernel], [sigma[i].item()] * 2)
        torch.testing.assert_close(out[i], expected, atol=2e-6, rtol=0)


def reference_view(image: torch.Tensor, params: ViewParams, i: int, spec: ViewSpec, mean, std) -> torch.Tensor:
    """One view by torchvision's functional ops on one image, in DINO's order."""
    x = F.resized_crop(image, *params.boxes[i].tolist(), [spec.size] * 2, interpolation=BICUBIC).float() / 255
    if params.flip[i]:
        x = F.horizontal_flip(x)
    if params.jitter[i]:
        x = reference_jitter(x, params.factors[i], params.order[i].tolist())
    if params.gray[i]:
        x = F.rgb_to_grayscale(x, 3)
    if params.blur[i]:
        x = F.gaussian_blur(x, [spec.blur[0]] * 2, [params.sigma[i].item()] * 2)
    if params.solarize[i]:
        x = F.solarize(x, 128 / 255)
    return F.normalize(x, list(mean), list(std))


def test_whole_view_equals_torchvision_composed_per_image():
    cfg = DataConfig(global_crop_size=32, aug=AugConfig(blur_sigma=[7.0, 21.0], grayscale_p=0.5, solarize_p=0.5,
                                                        color_jitter_p=0.7))
    multicrop = TensorMultiCrop(cfg, (0.4,) * 3, (0.3,) * 3)
    spec = multicrop.global2
    assert spec.blur == blur_params(cfg, 32, cfg.aug.blur_p[1]) and spec.blur is not None
    spec = ViewSpec(**{**spec.__dict__, "blur_p": 0.5})
    images = list(uint8_images(16, 40, 36))
    params = sample_view_params(spec, torch.full((16,), 40), torch.full((16,), 36), torch.Generator().manual_seed(3))
    for flag in ("flip", "jitter", "gray", "blur", "solarize"):  # every branch taken and skipped
        assert 0 < int(getattr(params, flag).sum()) < 16, flag
    out = apply_view(images, params, spec, multicrop.mean, multicrop.std)
    for i, image in enumerate(images):
        torch.testing.assert_close(out[i], reference_view(image, params, i, spec, multicrop.mean, multicrop.std),
                                   atol=2e-5, rtol=0)


# ---- the samplers follow torchvision's distributions ------------------------------------------------


@pytest.mark.parametrize("height, width, scale", [(30, 40, (0.4, 1.0)), (30, 40, (0.05, 0.4)), (375, 500, (0.05, 0.4))])
def test_crop_boxes_follow_random_resized_crop_get_params(height, width, scale):
    n = 3000
    ours = sample_crop_boxes(torch.full((n,), height), torch.full((n,), width), scale, CROP_RATIO,
                             torch.Generator().manual_seed(0)).double()
    torch.manual_seed(1)
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), list(CROP_RATIO))
                           for _ in range(n)]).double()
    assert CROP_RATIO == T.RandomResizedCrop(8).ratio
    for boxes in (ours, theirs):
        top, left, h, w = boxes.unbind(1)
        assert bool(((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width) & (h > 0)).all())
    features = {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "log_ratio": lambda b: torch.log(b[:, 3] / b[:, 2]),
        "top_share": lambda b: b[:, 0] / (height - b[:, 2] + 1),
        "left_share": lambda b: b[:, 1] / (width - b[:, 3] + 1),
    }
    for name, feature in features.items():
        assert_same_distribution(feature(ours).numpy(), feature(theirs).numpy())


def test_crop_fallback_is_torchvisions_central_crop():
    # A 100 x 10 strip: no box with area >= 90% and aspect in [3/4, 4/3] fits, so all 10 tries fail.
    image = torch.zeros(3, 10, 100)
    expected = T.RandomResizedCrop.get_params(image, [0.9, 1.0], list(CROP_RATIO))
    boxes = sample_crop_boxes(torch.tensor([10, 100]), torch.tensor([100, 10]), (0.9, 1.0), CROP_RATIO,
                              torch.Generator().manual_seed(0))
    assert tuple(boxes[0].tolist()) == expected == (0, 43, 10, 13)
    assert tuple(boxes[1].tolist()) == T.RandomResizedCrop.get_params(torch.zeros(3, 100, 10), [0.9, 1.0],
                                                                      list(CROP_RATIO))


def test_jitter_factors_and_order_follow_colorjitter_get_params():
    n = 3000
    spec = TensorMultiCrop(DataConfig(), (0.5,) * 3, (0.5,) * 3).local
    params = sample_view_params(spec, torch.full((n,), 28), torch.full((n,), 28), torch.Generator().manual_seed(0))
    torch.manual_seed(2)
    jitter = T.ColorJitter(*spec.jitter)
    draws = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(n)]
    theirs = torch.tensor([list(d[1:]) for d in draws])
    for k, (lo, hi) in enumerate(jitter_ranges(spec.jitter)):
        assert lo <= params.factors[:, k].min() and params.factors[:, k].max() <= hi
        assert_same_distribution(params.factors[:, k].numpy(), theirs[:, k].numpy())
    assert sorted(map(tuple, params.order.unique(dim=0).tolist())) == sorted(
        {tuple(d[0].tolist()) for d in draws})  # all 24 permutations, as torch.randperm
    for perm in params.order.unique(dim=0):
        assert_rate((params.order == perm).all(1), 1 / 24)
    for slot in range(4):  # each op equally often in each position
        for op in range(4):
            assert_rate(params.order[:, slot] == op, 0.25)


def test_per_view_application_rates_are_dinos():
    """DESIGN.md §5: blur 1.0 / 0.1 / 0.5, solarize 0.2 on global 2 only, flip 0.5, jitter 0.8, grey 0.2."""
    n = 4000
    multicrop = TensorMultiCrop(imagenet_config(), (0.5,) * 3, (0.5,) * 3)
    size = torch.full((n,), 256)
    rates = {"global1": (1.0, 0.0), "global2": (0.1, 0.2), "local": (0.5, 0.0)}
    for seed, (name, (blur_p, solarize_p)) in enumerate(rates.items()):
        spec = getattr(multicrop, name)
        params = sample_view_params(spec, size, size, torch.Generator().manual_seed(seed))
        assert_rate(params.blur, blur_p)
        assert_rate(params.solarize, solarize_p)
        assert_rate(params.flip, 0.5)
        assert_rate(params.jitter, 0.8)
        assert_rate(params.gray, 0.2)
        lo, hi = spec.blur[1]
        assert (lo, hi) == (0.1, 2.0) and spec.blur[0] == blur_params(imagenet_config(), spec.size, blur_p)[0]
        sigma = params.sigma.numpy()
        assert lo <= sigma.min() and sigma.max() <= hi
        assert_same_distribution(sigma, np.random.default_rng(seed).uniform(lo, hi, n))


def test_negligible_blur_is_skipped_as_the_pil_path_does():
    """At 28 px the largest sigma is 2 * 28 / 224 = 0.25 px < NEGLIGIBLE_SIGMA: the PIL path has no blur step."""
    multicrop = TensorMultiCrop(DataConfig(), (0.5,) * 3, (0.5,) * 3)
    assert multicrop.global1.blur is None and multicrop.local.blur is None
    assert "GaussianBlur" not in repr(MultiCropTransform(DataConfig(), (0.5,) * 3, (0.5,) * 3))
    params = sample_view_params(multicrop.global1, torch.full((50,), 28), torch.full((50,), 28),
                                torch.Generator().manual_seed(0))
    assert not params.blur.any()


# ---- views, sizes, reproducibility, the loader and a run -------------------------------------------------


@pytest.mark.parametrize("cfg, sizes", [(DataConfig(), [28] * 2 + [12] * 6),
                                        (imagenet_config(), [224] * 2 + [96] * 10)])
def test_views_have_the_configured_sizes_counts_and_dtype(cfg, sizes):
    images = [uint8_images(1, 60, 80)[0], uint8_images(1, 70, 50, seed=1)[0], uint8_images(1, 28, 28, seed=2)[0]]
    views = TensorMultiCrop(cfg, (0.5,) * 3, (0.25,) * 3)(images, torch.Generator().manual_seed(0))
    pil = MultiCropTransform(cfg, (0.5,) * 3, (0.25,) * 3)(Image.fromarray(images[0].permute(1, 2, 0).numpy()))
    assert [tuple(v.shape) for v in views] == [(3, 3, s, s) for s in sizes] == [(3, *p.shape) for p in pil]
    assert all(v.dtype == torch.float32 for v in views)
    assert min(v.min().item() for v in views) >= -2.0 and max(v.max().item() for v in views) <= 2.0


def test_same_generator_same_views_and_a_batch_tensor_works_as_a_list():
    multicrop = TensorMultiCrop(DataConfig(aug=AugConfig(blur_sigma=[7.0, 21.0])), (0.5,) * 3, (0.25,) * 3)
    images = uint8_images(4, 28, 28)
    first = multicrop(images, torch.Generator().manual_seed(5))
    again = multicrop(list(images), torch.Generator().manual_seed(5))
    other = multicrop(images, torch.Generator().manual_seed(6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def tensor_cfg(tiny_tree, **data):
    return config_lib.build_config(tiny_tree, {"data": {"multicrop": "tensor", **data}})


def test_option_defaults_to_pil_and_moves_the_run_id_only_when_set(tiny_tree):
    base = config_lib.build_config(tiny_tree)
    assert base.data.multicrop == "pil"
    assert config_lib.run_id(config_lib.build_config(tiny_tree, {"data": {"multicrop": "pil"}})) == \
        config_lib.run_id(base)
    assert config_lib.run_id(tensor_cfg(tiny_tree)) != config_lib.run_id(base)
    with pytest.raises(config_lib.ConfigError, match="multicrop"):
        config_lib.build_config(tiny_tree, {"data": {"multicrop": "kornia"}})


def test_datamodule_batches_masks_and_exact_loader_resume(tiny_tree):
    cfg = tensor_cfg(tiny_tree)
    for mask_grid in (None, (4, 4)):
        module = SSLDataModule(cfg, mask_grid=mask_grid)
        assert isinstance(module.train_set[0][0], torch.Tensor) and module.train_set[0][0].dtype == torch.uint8
        loader = module.train_dataloader()
        it = iter(loader)
        first = next(it)
        state = loader.state_dict()
        expected = next(it)
        assert [tuple(c.shape) for c in first.crops] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
        assert first.labels.dtype == torch.int64 and (first.masks is None) == (mask_grid is None)
        if mask_grid is not None:
            assert first.masks.shape == (16, 16) and first.masks.any()
        resumed = SSLDataModule(cfg, mask_grid=mask_grid).train_dataloader()
        resumed.load_state_dict(state)
        batch = next(iter(resumed))
        assert all(torch.equal(a, b) for a, b in zip(batch.crops, expected.crops))
        assert mask_grid is None or torch.equal(batch.masks, expected.masks)


def test_collate_is_a_pure_function_of_the_seeded_global_rng():
    collate = TensorMultiCropCollate(DataConfig(local_crops_number=2), (0.5,) * 3, (0.25,) * 3)
    samples = [(image, label) for label, image in enumerate(uint8_images(4, 28, 28))]
    torch.manual_seed(0)
    first = collate(samples)
    torch.manual_seed(0)
    again = collate(samples)
    assert torch.equal(first.labels, torch.arange(4)) and first.masks is None
    assert all(torch.equal(a, b) for a, b in zip(first.crops, again.crops))


@pytest.mark.parametrize("method", ["dino", "ibot"])
def test_two_step_run_with_tensor_multicrop_writes_a_complete_run(tiny_tree, method):
    from ssl_bench import tracking
    from ssl_bench.run import train

    cfg = config_lib.build_config(tiny_tree, {"data": {"multicrop": "tensor"}, "method": {"name": method}})
    result = train.run(cfg)
    assert result.status == "completed"
    record = tracking.read_result(result.run_dir)
    assert record["status"] == "completed" and record["timing"]["train_steps"] == 2
    assert math.isfinite(record["metrics"]["knn_top1"])
    steps = [line["step"] for line in tracking.read_metrics(result.run_dir) if "train/loss" in line]
    assert steps == [0, 1]
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert yaml.safe_load((result.run_dir / "config.yaml").read_text())["data"]["multicrop"] == "tensor"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_views_on_cuda_as_on_cpu():
    cfg = imagenet_config()
    multicrop = TensorMultiCrop(cfg, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = uint8_images(8, 375, 500)
    cpu = multicrop(images, torch.Generator().manual_seed(0))
    gpu = multicrop(images.cuda(), torch.Generator().manual_seed(0))
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and b.shape == a.shape
        # Same parameters. On CUDA torchvision resizes uint8 through torch's float bicubic kernel, not the CPU
        # uint8 one (PIL's filter): on these noisy images that moved pixels by up to 6 grey levels, 0.18 on
        # average, when measured with the float kernel on the CPU.
        diff = (a - b.cpu()).abs() * 0.225 * 255
        assert diff.max() <= 12 and diff.mean() <= 0.5


def test_grey_batches_run_on_one_channel_and_give_bitwise_the_rgb_views():
    # Fashion-MNIST's images are grey RGB: the multi-crop runs on one channel (a third of the work)
    # and must give exactly the views of the three-channel images, every branch taken.
    cfg = DataConfig(global_crop_size=20, aug=AugConfig(blur_sigma=[7.0, 21.0], grayscale_p=0.5, solarize_p=0.5,
                                                        color_jitter_p=0.7))
    multicrop = TensorMultiCrop(cfg, (0.4,) * 3, (0.3,) * 3)
    spec = ViewSpec(**{**multicrop.global2.__dict__, "blur_p": 0.5})
    grey = uint8_images(16, 28, 28, seed=5)[:, :1].expand(16, 3, 28, 28).contiguous()
    assert tensor_ops.grey_batch(grey) and not tensor_ops.grey_batch(uint8_images(2, 28, 28))
    params = sample_view_params(spec, torch.full((16,), 28), torch.full((16,), 28), torch.Generator().manual_seed(3))
    for flag in ("flip", "jitter", "gray", "blur", "solarize"):
        assert 0 < int(getattr(params, flag).sum()) < 16, flag
    rgb = apply_view(grey, params, spec, multicrop.mean, multicrop.std)
    one = apply_view(grey[:, :1], params, spec, multicrop.mean, multicrop.std)
    assert one.shape == rgb.shape == (16, 3, 20, 20) and torch.equal(one, rgb)
    views = multicrop(list(grey), torch.Generator().manual_seed(0))  # the grey batch takes the one-channel path
    assert all(v.shape[1] == 3 for v in views)


def test_luma_of_one_channel_is_torchvisions_grey_of_the_rgb_image():
    v = float_images(4)[:, :1]
    assert torch.equal(tensor_ops.luma(v), F.rgb_to_grayscale(v.expand(4, 3, 12, 12).contiguous()))
    assert not torch.equal(tensor_ops.luma(v), v)  # the weights sum to 0.9999
