"""Evaluation batches on uint8 tensors (data.multicrop=tensor): torchvision's eval preprocessing to the grey level."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from ssl_bench import config as config_lib
from ssl_bench.backbones import build_backbone
from ssl_bench.config import DataConfig
from ssl_bench.data import dataset_info, eval_loaders, eval_transform
from ssl_bench.data.tensor_eval import (TensorEvalCollate, TensorLinearTrainCollate, eval_pipeline)
from ssl_bench.data.tensor_multicrop import CROP_RATIO, sample_crop_boxes
from ssl_bench.eval.linear import linear_probe
from tests.conftest import TINY
from tests.data.test_tensor_multicrop import uint8_images

BICUBIC = F.InterpolationMode.BICUBIC
MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def reference_eval(image: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    x = F.center_crop(F.resize(image, [resize], interpolation=BICUBIC, antialias=True), [crop, crop])
    return F.normalize(x.float() / 255, list(MEAN), list(STD))


@pytest.mark.parametrize("shapes,resize,crop", [
    ([(28, 28)] * 5, 28, 28),  # Fashion-MNIST: identity resize and crop
    ([(28, 28)] * 5, 32, 28),  # enlarge, then crop
    ([(40, 30)] * 4, 24, 20),  # portrait, shrink (batched path)
    ([(40, 30), (30, 50), (300, 200)], 36, 32),  # mixed sizes: torchvision per image
])
def test_eval_collate_is_torchvision_resize_and_centre_crop(shapes, resize, crop):
    images = [uint8_images(1, h, w, seed=i)[0] for i, (h, w) in enumerate(shapes)]
    collate = TensorEvalCollate(DataConfig(eval_resize=resize, eval_crop_size=crop), MEAN, STD)
    x, labels = collate([(image, i) for i, image in enumerate(images)])
    assert x.shape == (len(images), 3, crop, crop) and labels.tolist() == list(range(len(images)))
    for i, image in enumerate(images):
        torch.testing.assert_close(x[i], reference_eval(image, resize, crop), atol=1e-6, rtol=0)


def test_eval_collate_equals_the_pil_eval_transform_on_fashion_mnist_sizes():
    cfg = DataConfig(eval_resize=28, eval_crop_size=28)
    images = uint8_images(6, 28, 28, seed=2)
    pil = torch.stack([eval_transform(cfg, MEAN, STD)(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])
    x, _ = TensorEvalCollate(cfg, MEAN, STD)([(im, 0) for im in images])
    torch.testing.assert_close(x, pil, atol=1e-6, rtol=0)


def test_linear_train_collate_draws_torchvisions_crop_and_flip_from_the_global_rng():
    cfg = DataConfig(eval_crop_size=12)
    images = list(uint8_images(8, 20, 26, seed=3))
    samples = [(image, 1) for image in images]
    torch.manual_seed(7)
    x, _ = TensorLinearTrainCollate(cfg, MEAN, STD)(samples)
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(int(torch.randint(2**62, (1,))))
    boxes = sample_crop_boxes(torch.full((8,), 20), torch.full((8,), 26), (0.08, 1.0), CROP_RATIO, generator)
    flips = torch.rand(8, generator=generator, dtype=torch.float64) < 0.5
    assert 0 < int(flips.sum()) < 8
    for i, image in enumerate(images):
        crop = F.resized_crop(image, *boxes[i].tolist(), [12, 12], interpolation=BICUBIC, antialias=True)
        crop = F.horizontal_flip(crop) if flips[i] else crop
        torch.testing.assert_close(x[i], F.normalize(crop.float() / 255, list(MEAN), list(STD)), atol=1e-6, rtol=0)
    torch.manual_seed(8)
    assert not torch.equal(TensorLinearTrainCollate(cfg, MEAN, STD)(samples)[0], x)


def test_pil_mode_keeps_the_per_image_transforms():
    assert eval_pipeline(DataConfig(), MEAN, STD) == (None, None)
    _, collate = eval_pipeline(DataConfig(multicrop="tensor"), MEAN, STD, train=True, augment=False)
    assert isinstance(collate, TensorEvalCollate)


def test_knn_loaders_give_the_pil_batches_within_one_grey_level(tiny_tree):
    # The synthetic set is 32 px, eval resizes to 28: PIL's filter against torch's uint8 kernel, at most 1 level.
    batches = {}
    for mode in ("pil", "tensor"):
        cfg = config_lib.build_config(config_lib.deep_merge(tiny_tree, {"data": {"multicrop": mode}}))
        bank, test = eval_loaders(cfg)
        batches[mode] = [next(iter(bank)), next(iter(test))]
    std = torch.tensor(dataset_info("synthetic").std).view(1, 3, 1, 1)
    for (x_pil, y_pil), (x_t, y_t) in zip(batches["pil"], batches["tensor"]):
        assert torch.equal(y_pil, y_t) and x_pil.shape == x_t.shape
        levels = (x_pil - x_t).abs() * std * 255
        assert levels.max() <= 1.0 + 1e-3 and (levels > 0.5).float().mean() < 0.2


@pytest.mark.parametrize("augment", [True, False])
def test_linear_probe_runs_on_the_tensor_path(tmp_path, augment):
    tree = config_lib.deep_merge(TINY, {"tracking": {"runs_root": str(tmp_path)}, "data": {"multicrop": "tensor"},
                                        "linear": {"epochs": 1, "batch_size": 16, "train_subset": 40,
                                                   "test_subset": 16, "lrs": [0.01, 0.1], "augment": augment}})
    cfg = config_lib.build_config(tree)
    result = linear_probe(build_backbone(cfg.backbone), cfg)
    assert result.protocol["train_size"] + result.protocol["val_size"] == 40 and result.protocol["test_size"] == 16
    assert all(0 <= h["test_top1"] <= 100 for h in result.grid)
