"""timm backbones return Features(cls, patches) for global and local crop sizes."""

import pytest
import torch

from ssl_bench.backbones import build_backbone
from ssl_bench.config import BackboneConfig


def test_vit_dynamic_size_and_features():
    bb = build_backbone(BackboneConfig(depth=1, patch_size=4, img_size=28, kwargs={"embed_dim": 32, "num_heads": 2}))
    big, small = bb(torch.randn(2, 3, 28, 28)), bb(torch.randn(2, 3, 12, 12))
    assert big.cls.shape == (2, 32) and big.patches.shape == (2, 49, 32)
    assert small.patches.shape == (2, 9, 32)


def test_resnet_with_cifar_stem():
    bb = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True))
    f = bb(torch.randn(2, 3, 28, 28))
    assert f.cls.shape == (2, 512) and f.patches.shape == (2, 16, 512)  # 28 -> 28,14,7,4
    plain = build_backbone(BackboneConfig(name="resnet18"))(torch.randn(2, 3, 32, 32))
    assert plain.patches.shape == (2, 1, 512)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown timm model 'vit_tinyy"):
        build_backbone(BackboneConfig(name="vit_tinyy_patch16_224"))
