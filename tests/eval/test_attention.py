"""Attention maps against timm's own unfused attention and hand-computed values."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

from ssl_bench import config as config_lib
from ssl_bench.backbones import build_backbone
from ssl_bench.eval.attention import (cls_attention_maps, last_block_attention, load_image, save_attention_maps,
                                      threshold_maps)
from tests.conftest import TINY

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)


def tiny_vit(depth: int = 2, **kwargs):
    tree = config_lib.deep_merge(TINY, {"backbone": {"depth": depth, "drop_path_rate": 0.0,
                                                     "kwargs": {"embed_dim": 32, "num_heads": 2, **kwargs}}})
    torch.manual_seed(0)
    return build_backbone(config_lib.build_config(tree).backbone)


def unfused_reference(backbone, images):
    """Probabilities timm itself materialises with fused attention off, caught entering attn_drop."""
    ref = copy.deepcopy(backbone).eval()
    ref.model.blocks[-1].attn.fused_attn = False
    caught = []
    ref.model.blocks[-1].attn.attn_drop.register_forward_hook(lambda m, args, out: caught.append(args[0]))
    with torch.no_grad():
        ref(images)
    return caught[0]


@pytest.mark.parametrize("size", [16, 24])
@pytest.mark.parametrize("regs", [0, 4])
def test_shapes_exclude_prefix(size, regs):
    backbone = tiny_vit(**({"reg_tokens": regs} if regs else {}))
    assert backbone.num_prefix_tokens == 1 + regs
    images = torch.randn(3, 3, size, size)
    full = last_block_attention(backbone, images)
    tokens = 1 + regs + (size // 4) ** 2
    assert full.shape == (3, 2, tokens, tokens)
    maps = cls_attention_maps(backbone, images)
    assert maps.shape == (3, 2, size // 4, size // 4)
    # Row-major patch order after the prefix: the map is exactly the CLS row minus prefix keys.
    assert torch.equal(maps.flatten(2), full[:, :, 0, 1 + regs:])
    assert (maps.sum(dim=(2, 3)) < 1).all()  # prefix keys take some mass, which is not put back


def test_non_square_grid():
    maps = cls_attention_maps(tiny_vit(), torch.randn(1, 3, 16, 24))
    assert maps.shape == (1, 2, 4, 6)


@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 4}, {"qk_norm": True}])
def test_matches_timm_unfused_attention(kwargs):
    backbone = tiny_vit(**kwargs)
    attn = backbone.model.blocks[-1].attn
    with torch.no_grad():  # non-trivial q/k norm affine so skipping q_norm/k_norm would show
        for norm in (attn.q_norm, attn.k_norm):
            for p in norm.parameters():
                p.add_(torch.randn_like(p))
    images = torch.randn(2, 3, 16, 20)
    ours = last_block_attention(backbone, images)
    assert torch.allclose(ours.sum(-1), torch.ones(ours.shape[:-1]), atol=1e-6)
    ref = unfused_reference(backbone, images)
    assert ref.shape == ours.shape
    assert (ours - ref).abs().max().item() < 1e-6
    assert attn.fused_attn  # the backbone itself was not modified
    assert not attn._forward_pre_hooks  # hook removed


def test_eval_mode_and_restore():
    backbone = tiny_vit(attn_drop_rate=0.5, proj_drop_rate=0.5)
    backbone.train()
    images = torch.randn(2, 3, 16, 16)
    first, second = last_block_attention(backbone, images), last_block_attention(backbone, images)
    assert torch.equal(first, second)  # dropout off during capture
    assert backbone.training and backbone.model.blocks[-1].training


def test_inference_mode():
    backbone = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        inside = cls_attention_maps(backbone, images)
    assert torch.allclose(inside, cls_attention_maps(backbone, images))


def test_errors():
    with pytest.raises(ValueError, match="18x16.*patch size 4"):
        cls_attention_maps(tiny_vit(), torch.randn(1, 3, 18, 16))
    resnet = build_backbone(config_lib.BackboneConfig(name="resnet18"))
    with pytest.raises(ValueError, match="ViT backbone.*ResNet"):
        cls_attention_maps(resnet, torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="no CLS token"):
        cls_attention_maps(tiny_vit(class_token=False, global_pool="avg"), torch.randn(1, 3, 16, 16))
    eva = build_backbone(config_lib.BackboneConfig(name="eva02_tiny_patch14_224", depth=1, img_size=16,
                                                   kwargs={"embed_dim": 32, "num_heads": 2}))
    with pytest.raises(NotImplementedError, match="EvaAttention"):  # RoPE scores: refuse, don't guess
        last_block_attention(eva, torch.randn(1, 3, 16, 16))


def test_threshold_hand_example():
    maps = torch.tensor([0.5, 0.3, 0.15, 0.05]).view(1, 2, 2)
    assert threshold_maps(maps, 0.6).flatten().tolist() == [True, True, False, False]
    assert threshold_maps(maps, 0.85).flatten().tolist() == [True, True, True, False]
    assert threshold_maps(maps, 0.4).flatten().tolist() == [True, False, False, False]
    # exact (dyadic) tie: the top two hold exactly 0.75, so DINO's strict rule stops there
    dyadic = torch.tensor([0.5, 0.25, 0.125, 0.125]).view(2, 2)
    assert threshold_maps(dyadic, 0.75).flatten().tolist() == [True, True, False, False]
    # unnormalised and shuffled on a 2D grid: same patches by value
    shuffled = torch.tensor([[0.15, 0.5], [0.05, 0.3]]) * 7
    assert threshold_maps(shuffled, 0.6).tolist() == [[False, True], [False, True]]
    with pytest.raises(ValueError):
        threshold_maps(maps, 0.0)


def test_threshold_matches_dino_ascending_rule():
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(3, 2, 5, 6, generator=g)
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    values, idx = torch.sort(flat)  # DINO: ascending, keep where cumulative share > 1 - keep
    ref = torch.zeros_like(flat, dtype=torch.bool)
    for i in np.ndindex(*flat.shape[:-1]):
        ref[i][idx[i]] = values[i].cumsum(0) > 1 - 0.6
    assert torch.equal(threshold_maps(maps, 0.6), ref.view(maps.shape))


def test_load_image_by_hand(tmp_path):
    # 12 wide x 8 high; shorter side already 8, so only the 2-column centre crop each side acts.
    pixels = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
    Image.fromarray(pixels).save(tmp_path / "img.png")
    out = load_image(tmp_path / "img.png", 10, MEAN, STD, patch_size=4)
    crop = torch.tensor(pixels[:, 2:10], dtype=torch.float32).permute(2, 0, 1) / 255
    expected = (crop - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out, expected, atol=1e-6)


def test_load_image_resizes_and_errors(tmp_path):
    Image.new("L", (40, 20), color=128).save(tmp_path / "grey.png")
    out = load_image(tmp_path / "grey.png", 16, MEAN, STD)
    assert out.shape == (3, 16, 16)
    expected = (128 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    with pytest.raises(ValueError, match="missing.png"):
        load_image(tmp_path / "missing.png", 16, MEAN, STD)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.png"):
        load_image(tmp_path / "bad.png", 16, MEAN, STD)


@pytest.mark.parametrize("threshold", [None, 0.6])
def test_save_attention_maps(tmp_path, threshold):
    image = (torch.rand(3, 16, 24) - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    maps = torch.rand(3, 4, 6)
    paths = save_attention_maps(image, maps, tmp_path / "out", "img0", 4, MEAN, STD, threshold=threshold)
    names = [p.name for p in paths]
    assert names == ["img0-head0.png", "img0-head1.png", "img0-head2.png", "img0-mean.png",
                     "img0-input.png", "img0-overview.png"]
    for path in paths:
        assert path.stat().st_size > 0
        with Image.open(path) as img:
            img.load()
            if path.name != "img0-overview.png":
                assert img.size == (24, 16)
    with Image.open(paths[4]) as img:  # de-normalised input round-trips to 8 bits
        back = torch.tensor(np.asarray(img.convert("RGB")), dtype=torch.float32).permute(2, 0, 1) / 255
    original = image * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert (back - original).abs().max() <= 0.5 / 255 + 1e-6
    with Image.open(paths[0]) as img:  # nearest upsampling: each 4x4 patch is one colour
        head = np.asarray(img.convert("RGB"))
    assert (head.reshape(4, 4, 6, 4, 3) == head[::4, ::4][:, None, :, None]).all()
    low, high = (tuple(round(c * 255) for c in colormaps["viridis"](v)[:3]) for v in (0.0, 1.0))
    colours = [[tuple(int(c) for c in head[4 * i, 4 * j]) for j in range(6)] for i in range(4)]
    if threshold is None:  # min-max scaled: the strongest patch gets the top colour, the weakest the bottom
        top, bottom = divmod(int(maps[0].argmax()), 6), divmod(int(maps[0].argmin()), 6)
        assert colours[top[0]][top[1]] == high and colours[bottom[0]][bottom[1]] == low
    else:  # DINO's binary mask: kept patches top colour, the rest bottom colour
        kept = threshold_maps(maps[0], threshold)
        assert colours == [[high if kept[i, j] else low for j in range(6)] for i in range(4)]

def test_save_rejects_mismatched_maps(tmp_path):
    with pytest.raises(ValueError, match="do not cover"):
        save_attention_maps(torch.zeros(3, 16, 16), torch.rand(2, 3, 3), tmp_path, "x", 4, MEAN, STD)


def test_bf16_autocast_gives_fp32_rows():
    backbone = tiny_vit()
    images = torch.randn(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        attn = last_block_attention(backbone, images)
    assert attn.dtype == torch.float32
    assert torch.allclose(attn.sum(-1), torch.ones(attn.shape[:-1]), atol=1e-6)
    assert torch.allclose(attn, last_block_attention(backbone, images), atol=0.05)  # bf16 q/k only
