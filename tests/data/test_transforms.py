"""DINO multi-crop (facebookresearch/dino DataAugmentationDINO) and eval preprocessing."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_bench.config import AugConfig, DataConfig
from ssl_bench.data import MultiCropTransform, eval_transform
from ssl_bench.data.transforms import NEGLIGIBLE_SIGMA, blur_kernel_size, blur_sigma_range, random_blur

ZERO, ONE = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # mean/std that leave pixels in [0, 1]


def random_image(size: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def imagenet_config() -> DataConfig:
    return DataConfig(global_crop_size=224, local_crop_size=96, local_crops_number=10,
                      eval_resize=256, eval_crop_size=224)


def no_photometric(**aug) -> AugConfig:
    """Every random photometric step off, except what the test turns on."""
    base = dict(flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0, blur_p=[0.0, 0.0, 0.0], solarize_p=0.0)
    return AugConfig(**{**base, **aug})


def full_crop_config(size: int, aug: AugConfig, local_crops: int = 2) -> DataConfig:
    """Crops that keep the whole square image at its own size, so pixels can be compared."""
    return DataConfig(global_crop_size=size, local_crop_size=size, local_crops_number=local_crops,
                      global_crop_scale=[1.0, 1.0], local_crop_scale=[1.0, 1.0], aug=aug)


@pytest.mark.parametrize("cfg, sizes", [
    (DataConfig(), [28] * 2 + [12] * 6),
    (imagenet_config(), [224] * 2 + [96] * 10),
])
def test_multicrop_counts_and_shapes(cfg, sizes):
    crops = MultiCropTransform(cfg, (0.5,) * 3, (0.25,) * 3)(random_image(cfg.global_crop_size + 9))
    assert [tuple(c.shape) for c in crops] == [(3, s, s) for s in sizes]
    assert all(c.dtype == torch.float32 for c in crops)
    # Normalised with mean 0.5, std 0.25: values span [-2, 2].
    assert min(c.min().item() for c in crops) >= -2.0 and max(c.max().item() for c in crops) <= 2.0


def test_multicrop_is_picklable_for_workers():
    transform = MultiCropTransform(imagenet_config(), ZERO, ONE)
    clone = pickle.loads(pickle.dumps(transform))
    assert len(clone(random_image(100))) == 12


@pytest.mark.parametrize("solarize_p", [0.0, 1.0])
def test_solarize_only_on_second_global_view(solarize_p):
    cfg = full_crop_config(32, no_photometric(solarize_p=solarize_p))
    image = Image.new("RGB", (32, 32), (200, 127, 128))
    views = MultiCropTransform(cfg, ZERO, ONE)(image)
    plain = torch.tensor([200, 127, 128]) / 255
    # Threshold 128 on the uint8 scale: 127 stays, 128 and 200 become 255 - v.
    solarized = torch.tensor([55, 127, 127]) / 255
    expected = [plain, solarized if solarize_p else plain] + [plain, plain]
    for view, colour in zip(views, expected):
        torch.testing.assert_close(view, colour.view(3, 1, 1).expand(3, 32, 32), atol=1e-6, rtol=0)


def neighbour_difference(view: torch.Tensor) -> float:
    """Mean absolute horizontal pixel difference: 1.0 for a 1-px checkerboard, ~0 once blurred."""
    return (view[:, :, 1:] - view[:, :, :-1]).abs().mean().item()


@pytest.mark.parametrize("which", [0, 1, 2])
def test_blur_only_where_its_probability_is(which):
    blur_p = [0.0, 0.0, 0.0]
    blur_p[which] = 1.0
    # sigma 7 px at 224 px is 1 px at 32 px: enough to wash out a 1-px checkerboard.
    cfg = full_crop_config(32, no_photometric(blur_p=blur_p, blur_sigma=[7.0, 7.0]))
    board = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)
    views = MultiCropTransform(cfg, ZERO, ONE)(Image.fromarray(board).convert("RGB"))
    blurred = [which == 0, which == 1, which == 2, which == 2]
    for view, is_blurred in zip(views, blurred):
        difference = neighbour_difference(view)
        assert difference < 0.3 if is_blurred else difference == pytest.approx(1.0)


def test_blur_sigma_scales_with_resolution():
    assert blur_sigma_range(imagenet_config()) == pytest.approx((0.1, 2.0))  # DINO at 224 px
    assert blur_sigma_range(DataConfig(global_crop_size=112)) == pytest.approx((0.05, 1.0))
    assert blur_kernel_size(2.0, 224) == 13 and blur_kernel_size(2.0, 96) == 13
    assert blur_kernel_size(5.0, 12) == 11  # odd, capped by the crop
    assert NEGLIGIBLE_SIGMA == pytest.approx(0.3004, abs=1e-4)
    # 28 px: sigma <= 2 * 28/224 = 0.25 px changes no pixel by a grey level, so no blur step.
    assert random_blur(DataConfig(), 28, 1.0) is None
    blur = random_blur(imagenet_config(), 96, 0.5)
    assert blur.p == 0.5 and blur.transforms[0].kernel_size == (13, 13)
    assert blur.transforms[0].sigma == pytest.approx((0.1, 2.0))


def test_photometric_jitter_changes_colours():
    cfg = full_crop_config(32, no_photometric(color_jitter_p=1.0))
    image = Image.new("RGB", (32, 32), (120, 60, 30))
    torch.manual_seed(0)
    views = MultiCropTransform(cfg, ZERO, ONE)(image)
    means = torch.stack([v.mean(dim=(1, 2)) for v in views])
    assert (means - torch.tensor([120, 60, 30]) / 255).abs().max() > 0.02
    assert len({tuple(m.round(decimals=4).tolist()) for m in means}) == 4  # each view draws its own


def test_grayscale_makes_channels_equal():
    cfg = full_crop_config(32, no_photometric(grayscale_p=1.0))
    for view in MultiCropTransform(cfg, ZERO, ONE)(random_image(32)):
        assert torch.equal(view[0], view[1]) and torch.equal(view[1], view[2])


def test_eval_transform_shape_and_normalisation():
    cfg = imagenet_config()
    out = eval_transform(cfg, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(Image.new("RGB", (400, 300), (255, 0, 128)))
    assert out.shape == (3, 224, 224)
    expected = torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1])  # (x - 0.5) / 0.5 of (255, 0, 128) / 255
    torch.testing.assert_close(out[:, 100, 100], expected, atol=1e-6, rtol=0)
    small = eval_transform(DataConfig(eval_resize=32, eval_crop_size=28), ZERO, ONE)(random_image(64))
    assert small.shape == (3, 28, 28)
