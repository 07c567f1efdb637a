"""timm backbones return Features(cls, patches) for global and local crop sizes."""

import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from ssl_bench.backbones import build_backbone
from ssl_bench.backbones.pos_embed import dino_interpolate_pos_embed
from ssl_bench.config import BackboneConfig, ConfigError, build_config, run_id


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


def test_stride_two_stem_halves_every_map_and_keeps_the_run_id_of_stride_one():
    f = build_backbone(BackboneConfig(name="resnet18", cifar_stem=True, stem_stride=2))(torch.randn(2, 3, 28, 28))
    assert f.patches.shape == (2, 4, 512)  # 28 -> 14, 7, 4, 2 (stride 1: 4x4 at layer4, above)
    tree = {"backbone": {"name": "resnet18", "cifar_stem": True}}
    assert run_id(build_config(tree)) == run_id(build_config({"backbone": {**tree["backbone"], "stem_stride": 1}}))
    assert run_id(build_config(tree)) != run_id(build_config({"backbone": {**tree["backbone"], "stem_stride": 2}}))


def test_stem_stride_needs_the_small_image_stem():
    with pytest.raises(ConfigError, match="backbone.stem_stride=2 applies to the small-image stem only: set "
                                          "backbone.cifar_stem=true"):
        build_config({"backbone": {"name": "resnet18", "stem_stride": 2}})
    with pytest.raises(ConfigError, match="backbone.stem_stride.*1 or 2"):
        build_config({"backbone": {"name": "resnet18", "cifar_stem": True, "stem_stride": 4}})


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown timm model 'vit_tinyy"):
        build_backbone(BackboneConfig(name="vit_tinyy_patch16_224"))


# ----- backbone.pos_embed_interpolation: official DINO's interpolate_pos_encoding semantics ----------------
def _vit(interpolation: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(BackboneConfig(depth=1, patch_size=4, img_size=16, drop_path_rate=0.0,
                                         pos_embed_interpolation=interpolation,
                                         kwargs={"embed_dim": 32, "num_heads": 2, **kwargs})).double()


def _reference_pos_embed(pos_embed, old, new):
    """DINO's resize stated from its definition: bicubic with scale factor (new + 0.1) / old, class position kept."""
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((new + 0.1) / old, (new + 0.1) / old), mode="bicubic",
                         align_corners=False, antialias=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, new * new, dim)], dim=1)


def _manual_forward(model, images, pos_embed):
    """The timm ViT's forward written out with a given position embedding (CLS after the final norm)."""
    x = model.patch_embed(images)
    x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x.reshape(x.shape[0], -1, x.shape[-1])], dim=1)
    return model.norm(model.blocks(x + pos_embed))[:, 0]


def test_dino_pos_embed_is_identity_at_the_native_size():
    dino, timm_bb = _vit("dino"), _vit("timm")
    timm_bb.load_state_dict(dino.state_dict())
    pos = dino.model.pos_embed
    assert dino_interpolate_pos_embed(pos, (4, 4), (4, 4)) is pos
    images = torch.sin(torch.arange(2 * 3 * 16 * 16, dtype=torch.float64)).reshape(2, 3, 16, 16)
    torch.testing.assert_close(dino(images).cls, timm_bb(images).cls, rtol=0, atol=0)


def test_dino_pos_embed_at_a_local_crop_size_follows_the_official_formula():
    dino, timm_bb = _vit("dino"), _vit("timm")
    timm_bb.load_state_dict(dino.state_dict())
    images = torch.cos(torch.arange(2 * 3 * 12 * 12, dtype=torch.float64) * 0.3).reshape(2, 3, 12, 12)
    pos = dino.model.pos_embed
    expected_pos = _reference_pos_embed(pos, 4, 3)
    torch.testing.assert_close(dino_interpolate_pos_embed(pos, (4, 4), (3, 3)), expected_pos, rtol=1e-12, atol=1e-12)
    out = dino(images).cls
    torch.testing.assert_close(out, _manual_forward(dino.model, images, expected_pos), rtol=1e-10, atol=1e-12)
    # timm resizes to the exact size with antialiasing: other numbers, and so does a resize without the 0.1
    antialiased = resample_abs_pos_embed(pos, new_size=(3, 3), old_size=(4, 4), num_prefix_tokens=1)
    assert (antialiased - expected_pos).abs().max() > 1e-3
    exact_size = F.interpolate(pos[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2), size=(3, 3), mode="bicubic")
    assert (exact_size.permute(0, 2, 3, 1).reshape(1, 9, -1) - expected_pos[:, 1:]).abs().max() > 1e-4
    assert (out - timm_bb(images).cls).abs().max() > 1e-4
    out.sum().backward()  # the position embedding is trained through the interpolation
    assert dino.model.pos_embed.grad.abs().sum() > 0


def test_dino_pos_embed_on_a_resnet_is_a_clear_error():
    with pytest.raises(ValueError, match="pos_embed_interpolation='dino' applies to ViTs only; 'resnet18'"):
        build_backbone(BackboneConfig(name="resnet18", pos_embed_interpolation="dino"))


def test_pos_embed_interpolation_config_values():
    with pytest.raises(ConfigError, match=r"backbone.pos_embed_interpolation='bilinear'; valid: timm, dino"):
        build_config({"backbone": {"pos_embed_interpolation": "bilinear"}})
    # the default leaves run ids of existing runs as they were; the official variant is another run
    assert run_id(build_config({"backbone": {"pos_embed_interpolation": "timm"}})) == run_id(build_config())
    assert run_id(build_config({"backbone": {"pos_embed_interpolation": "dino"}})) != run_id(build_config())
