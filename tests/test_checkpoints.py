"""Checkpoint import/export: official DINO / DINOv2 / torchvision weights give the official features.

Golden fixtures (tests/fixtures/, produced once with the official code run from a scratch copy, CPU,
torch 2.14, the script not committed):

dino_vit_tiny_official.pt -- facebookresearch/dino @ 7c446df5b9f45747937fb0d72314eb9f7b66930a:
    ``vision_transformer.VisionTransformer(img_size=[16], patch_size=4, embed_dim=24, depth=2, num_heads=3,
    mlp_ratio=2, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))`` (the ``vit_*`` constructors'
    settings at a tiny size) built after ``torch.manual_seed(0)`` (teacher) / ``manual_seed(1)`` (student),
    then every parameter ``p += 0.05 * torch.randn_like(p)`` (same RNG stream). Heads:
    ``vision_transformer.DINOHead(24, 8, hidden_dim=16, bottleneck_dim=8, nlayers=3)`` after seeds 2 / 3.
    ``x = torch.randn(2, 3, 16, 16, generator=Generator().manual_seed(4))``. Stored: ``backbone`` (teacher
    backbone state, released-backbone layout), ``train_checkpoint`` (main_dino.py save_dict layout: student
    keys ``module.backbone.*``/``module.head.*``, teacher ``backbone.*``/``head.*``, optimizer, epoch,
    argparse ``args``, dino_loss), ``teacher_cls = teacher(x)``, ``student_cls = student(x)``,
    ``teacher_intermediate_cls`` = CLS of ``teacher.get_intermediate_layers(x, n=2)`` (2, B, D) and
    ``teacher_last_attn = teacher.get_last_selfattention(x)`` (B, heads, 17, 17).

dinov2_vit_tiny_official.pt -- facebookresearch/dinov2 @ b8931f7bf91576930313be2c6d6af376033b35f0 (no
    xformers installed: the plain PyTorch attention path): ``models.vision_transformer.DinoVisionTransformer(
    block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention), img_size=16, patch_size=4, embed_dim=24,
    depth=2, num_heads=3, mlp_ratio=4, init_values=1e-5, block_chunks=0, num_register_tokens=0)`` after
    ``manual_seed(0)``; "reg": the same with depth=1, num_register_tokens=4, interpolate_antialias=True,
    interpolate_offset=0.0 (the hub's reg settings) after ``manual_seed(1)``. Perturbation: LayerScale
    gammas ``= 0.5 + 0.2 * randn``, every other parameter ``+= 0.05 * randn``. ``x`` as above (seed 4);
    ``masks = torch.rand(2, 16, generator=seed 5) < 0.4``. Stored: state dicts, ``x_norm_clstoken`` /
    ``x_norm_patchtokens`` / ``x_norm_regtokens`` of ``forward_features(x)``, ``masked_cls`` of
    ``forward_features(x, masks)``; "chunked": the plain weights under the keys of the same model built with
    ``block_chunks=2`` (``blocks.<chunk>.<i>.*``; loaded strictly into it, equal outputs asserted) and a
    ``train.do_test``-style ``{"teacher": {"backbone.*", "dino_head.*"}}`` with
    ``layers.DINOHead(24, 8, hidden_dim=16, bottleneck_dim=8)`` after ``manual_seed(2)``.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

import pytest
import timm
import torch
import torchvision

from ssl_bench import config as config_lib
from ssl_bench.backbones import (Backbone, CheckpointError, build_backbone, export_official, infer_backbone_config,
                                 load_backbone)
from ssl_bench.backbones.checkpoints import to_timm_names
from ssl_bench.eval.attention import cls_attention_maps, last_block_attention
from ssl_bench.run.checkpoints import load_run_backbone
from tests.conftest import TINY

FIXTURES = Path(__file__).parent / "fixtures"
ATOL = 1e-5


@pytest.fixture(scope="module")
def dino() -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(FIXTURES / "dino_vit_tiny_official.pt", weights_only=True)


@pytest.fixture(scope="module")
def dinov2() -> dict:
    return torch.load(FIXTURES / "dinov2_vit_tiny_official.pt", weights_only=True)


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@torch.no_grad()
def _features(bb: Backbone, x: torch.Tensor, masks: torch.Tensor | None = None):
    return bb(x, masks)


def test_dino_released_backbone_matches_official(dino, tmp_path):
    bb, info = load_backbone(_save(dino["backbone"], tmp_path / "dino_vit_pretrain.pth"), num_heads=3)
    assert info.format == "dino-backbone" and info.key is None and not info.ignored_keys
    assert info.backbone.patch_size == 4 and info.backbone.img_size == 16 and info.backbone.depth == 2
    assert info.backbone.kwargs == {"embed_dim": 24, "num_heads": 3, "mlp_ratio": 2.0}
    torch.testing.assert_close(_features(bb, dino["x"]).cls, dino["teacher_cls"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("key", ["teacher", "student"])
def test_dino_training_checkpoint_keys(dino, tmp_path, key):
    bb, info = load_backbone(_save(dino["train_checkpoint"], tmp_path / "checkpoint.pth"), key=key, num_heads=3)
    assert info.format == "dino-train" and info.key == key
    assert "head.last_layer.weight_g" in info.ignored_keys and len(info.ignored_keys) == 8
    torch.testing.assert_close(_features(bb, dino["x"]).cls, dino[f"{key}_cls"], atol=ATOL, rtol=0)


def test_dino_intermediate_cls_and_last_attention(dino, tmp_path):
    bb, _ = load_backbone(_save(dino["backbone"], tmp_path / "b.pth"), num_heads=3)
    vit, x = bb.model, dino["x"]
    with torch.no_grad():
        inter = vit.forward_intermediates(x, indices=2, return_prefix_tokens=True, norm=True, output_fmt="NLC",
                                          intermediates_only=True)
        torch.testing.assert_close(torch.stack([prefix[:, 0] for _, prefix in inter]),
                                   dino["teacher_intermediate_cls"], atol=ATOL, rtol=0)
    # ssl-bench's attention maps (eval/attention.py) against DINO's get_last_selfattention.
    attn = last_block_attention(bb, x)  # (B, heads, 1 + patches, 1 + patches)
    torch.testing.assert_close(attn, dino["teacher_last_attn"], atol=ATOL, rtol=0)
    torch.testing.assert_close(cls_attention_maps(bb, x), dino["teacher_last_attn"][:, :, 0, 1:].reshape(2, 3, 4, 4),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["plain", "chunked", "reg"])
def test_dinov2_backbones_match_official(dinov2, tmp_path, variant):
    bb, info = load_backbone(_save(dinov2[variant]["state_dict"], tmp_path / "dinov2.pth"), num_heads=3)
    ref = dinov2["reg" if variant == "reg" else "plain"]
    assert info.format == "dinov2-backbone" and info.backbone.layerscale is not None
    assert info.backbone.kwargs.get("reg_tokens", 0) == (4 if variant == "reg" else 0)
    out = _features(bb, dinov2["x"])
    torch.testing.assert_close(out.cls, ref["cls"], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.patches, ref["patches"], atol=ATOL, rtol=0)
    if variant == "reg":
        torch.testing.assert_close(bb.model.forward_features(dinov2["x"])[:, 1:5], ref["regs"], atol=ATOL, rtol=0)


def test_dinov2_teacher_checkpoint_and_mask_token(dinov2, tmp_path):
    path = _save(dinov2["chunked"]["teacher_checkpoint"], tmp_path / "teacher_checkpoint.pth")
    bb, info = load_backbone(path, num_heads=3)
    assert info.format == "dinov2-train" and all(k.startswith("dino_head.") for k in info.ignored_keys)
    plain = dinov2["plain"]
    torch.testing.assert_close(_features(bb, dinov2["x"]).cls, plain["cls"], atol=ATOL, rtol=0)
    # iBOT masking through Backbone's hook equals DINOv2's prepare_tokens_with_masks with the loaded mask_token
    torch.testing.assert_close(_features(bb, dinov2["x"], plain["masks"]).cls, plain["masked_cls"], atol=ATOL, rtol=0)
    with pytest.raises(CheckpointError, match=r"teacher_checkpoint\.pth.*'student'.*\['teacher'\]"):
        load_backbone(path, key="student", num_heads=3)


def test_fvcore_model_checkpoint_selects_network(dinov2, dino, tmp_path):
    model = {f"teacher.backbone.{k}": v for k, v in dinov2["plain"]["state_dict"].items()}
    model.update({f"student.backbone.{k}": torch.zeros_like(v) for k, v in dinov2["plain"]["state_dict"].items()})
    bb, info = load_backbone(_save({"model": model, "iteration": 9}, tmp_path / "model_0009.pth"), num_heads=3)
    assert info.format == "dinov2-train" and info.key == "teacher"
    torch.testing.assert_close(_features(bb, dinov2["x"]).cls, dinov2["plain"]["cls"], atol=ATOL, rtol=0)


def test_wrong_key_corrupt_and_unknown_files_are_clear_errors(dino, tmp_path):
    ckpt = _save(dino["train_checkpoint"], tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth \(dino-train\): key 'nonexistent'.*'student'"):
        load_backbone(ckpt, key="nonexistent", num_heads=3)
    cut = tmp_path / "truncated.pth"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"truncated\.pth.*Supported: ssl-bench"):
        load_backbone(cut)
    with pytest.raises(CheckpointError, match=r"other\.pth: unknown checkpoint format.*\(1\) foo.*dinov2-backbone"):
        load_backbone(_save({"foo": 1}, tmp_path / "other.pth"))
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        load_backbone(tmp_path / "missing.pth")


def test_pickled_objects_need_weights_only_false(dino, tmp_path):
    path = _save({**dino["train_checkpoint"], "when": datetime.datetime(2024, 1, 1)}, tmp_path / "checkpoint.pth")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pth holds pickled objects.*weights_only=False"):
        load_backbone(path, num_heads=3)
    bb, _ = load_backbone(path, num_heads=3, weights_only=False)
    torch.testing.assert_close(_features(bb, dino["x"]).cls, dino["teacher_cls"], atol=ATOL, rtol=0)


def test_missing_block_lists_missing_keys(dino, tmp_path):
    state = {k: v for k, v in dino["backbone"].items() if not k.startswith("blocks.0.")}
    path = _save(state, tmp_path / "no_block0.pth")
    with pytest.raises(CheckpointError, match=r"no_block0\.pth \(dino-backbone\) does not fit.*missing keys \(12\) "
                                              r"blocks\.0\.norm1\.weight, .*\(\+4 more\); unexpected keys \(0\)"):
        load_backbone(path, num_heads=3)
    _, info = load_backbone(path, num_heads=3, strict=False)
    assert len(info.missing_keys) == 12 and all(k.startswith("model.blocks.0.") for k in info.missing_keys)


def test_explicit_config_that_does_not_fit_lists_shape_mismatches(dino, tmp_path):
    cfg = config_lib.BackboneConfig(name="vit_small_patch16_224", patch_size=4, img_size=32, depth=2,
                                    kwargs={"embed_dim": 24, "num_heads": 3, "mlp_ratio": 2.0})
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\) pos_embed \(1, 17, 24\) vs \(1, 65, 24\)"):
        load_backbone(_save(dino["backbone"], tmp_path / "b.pth"), backbone=cfg)


def test_resnet_torchvision_format_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18()
    with torch.no_grad():  # non-trivial batch-norm statistics, so eval-mode normalisation is checked too
        for name, buf in ref.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
    path = _save(ref.state_dict(), tmp_path / "dino_resnet18_pretrain.pth")  # DINO's release format (fc kept)
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    bb, info = load_backbone(path)
    assert info.format == "dino-backbone" and info.backbone.name == "resnet18" and not info.backbone.cifar_stem
    assert info.ignored_keys == ["fc.bias", "fc.weight"]
    with torch.no_grad():
        torch.testing.assert_close(bb(x).cls, ref.eval()(x), atol=ATOL, rtol=0)
    bb2, info2 = load_backbone(export_official(bb, tmp_path / "ckpt.pth", "dino-train"), key="student")
    assert info2.weights_sha256 == info.weights_sha256
    assert set(torch.load(tmp_path / "ckpt.pth")["teacher"]) == {f"module.backbone.{k}" for k in bb.model.state_dict()}


def _write_run(tmp_path: Path, mask_token: bool) -> tuple[Path, Backbone, config_lib.Config]:
    cfg = config_lib.build_config(TINY)
    torch.manual_seed(0)
    teacher, student = build_backbone(cfg.backbone, mask_token), build_backbone(cfg.backbone, mask_token)
    if mask_token:
        torch.nn.init.normal_(teacher.mask_token)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state |= {f"student.backbone.{k}": v for k, v in student.state_dict().items()}
    state |= {"teacher.head.mlp.0.weight": torch.zeros(4, 32), "centering.center": torch.zeros(1, 64)}
    run = tmp_path / "runs" / "study" / "dino-abc"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(config_lib.to_yaml(cfg))
    torch.save({"epoch": 1, "state_dict": state}, run / "checkpoints" / "last.ckpt")
    return run, teacher.eval(), cfg


@pytest.mark.parametrize("mask_token", [False, True])
def test_ssl_bench_run_dir_and_ckpt(tmp_path, mask_token):
    run, teacher, cfg = _write_run(tmp_path, mask_token)
    x = torch.randn(2, 3, 16, 16)
    masks = torch.rand(2, 16) < 0.5 if mask_token else None
    for path in (run, run / "checkpoints" / "last.ckpt"):
        bb, info = load_run_backbone(path)
        assert info.format == "ssl-bench" and info.backbone == cfg.backbone and info.key == "teacher"
        assert info.ignored_keys == ["head.mlp.0.weight"]
        assert torch.equal(_features(bb, x, masks).cls, _features(teacher, x, masks).cls)
    _, student_info = load_run_backbone(run, key="student")
    assert student_info.weights_sha256 != info.weights_sha256
    with pytest.raises(CheckpointError, match=r"last\.ckpt \(ssl-bench\): key 'ema'.*\['student', 'teacher'\]"):
        load_run_backbone(run, key="ema")


def test_ssl_bench_ckpt_without_config_needs_backbone(tmp_path):
    run, teacher, cfg = _write_run(tmp_path, False)
    moved = tmp_path / "last.ckpt"
    (run / "checkpoints" / "last.ckpt").rename(moved)
    with pytest.raises(CheckpointError, match="outside its run directory"):
        load_backbone(moved)
    bb, _ = load_backbone(moved, backbone=cfg.backbone)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(_features(bb, x).cls, _features(teacher, x).cls)


@pytest.mark.parametrize("fmt", ["dino-backbone", "dino-train"])
def test_export_dino_round_trip_is_official_layout(dino, tmp_path, fmt):
    bb, info = load_backbone(_save(dino["train_checkpoint"], tmp_path / "c.pth"), num_heads=3)
    out = export_official(bb, tmp_path / "export" / "e.pth", fmt)
    saved = torch.load(out)
    flat = saved if fmt == "dino-backbone" else {k.removeprefix("backbone."): v for k, v in saved["teacher"].items()}
    assert flat.keys() == dino["backbone"].keys()  # official names: DINO's VisionTransformer loads it strictly
    assert all(torch.equal(flat[k], dino["backbone"][k]) for k in flat)
    if fmt == "dino-train":
        assert all(k.startswith("module.backbone.") for k in saved["student"])
    for key in ("teacher", "student"):
        again, info2 = load_backbone(out, key=key, num_heads=3)
        assert info2.weights_sha256 == info.weights_sha256 and info2.backbone == info.backbone
        assert torch.equal(_features(again, dino["x"]).cls, _features(bb, dino["x"]).cls)


@pytest.mark.parametrize("variant", ["plain", "reg"])
def test_export_dinov2_round_trip(dinov2, tmp_path, variant):
    official = dinov2[variant]["state_dict"]
    bb, info = load_backbone(_save(official, tmp_path / "d.pth"), num_heads=3)
    with pytest.raises(ValueError, match="dinov2-backbone"):
        export_official(bb, tmp_path / "e.pth", "dino-backbone")
    saved = torch.load(export_official(bb, tmp_path / "e.pth", "dinov2-backbone"))
    assert saved.keys() == official.keys()
    for k in set(saved) - {"cls_token", "pos_embed"}:
        assert torch.equal(saved[k], official[k]), k
    # DINOv2 adds pos_embed[:, 0] to the CLS token only; the export keeps that sum and the patch positions
    torch.testing.assert_close(saved["cls_token"] + saved["pos_embed"][:, :1],
                               official["cls_token"] + official["pos_embed"][:, :1], atol=1e-7, rtol=0)
    assert torch.equal(saved["pos_embed"][:, 1:], official["pos_embed"][:, 1:])
    again, info2 = load_backbone(tmp_path / "e.pth", num_heads=3)
    assert info2.weights_sha256 == info.weights_sha256
    torch.testing.assert_close(_features(again, dinov2["x"]).patches, dinov2[variant]["patches"], atol=ATOL, rtol=0)


def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_inferred_config_for_dino_vit_s16_release_shapes():
    d, blocks = 384, 12  # dino_deitsmall16_pretrain.pth: ViT-S/16, 224 px (1 + 14 * 14 positions)
    state = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
             "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(blocks):
        state |= {f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm1.bias": (d,),
                  f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
                  f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
                  f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
                  f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                  f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,)}
    cfg = infer_backbone_config({k: torch.empty(s, device="meta") for k, s in state.items()})
    assert (cfg.name, cfg.patch_size, cfg.img_size, cfg.depth, cfg.layerscale) == ("vit_small_patch16_224", 16, 224,
                                                                                    12, None)
    assert cfg.kwargs == {"embed_dim": 384, "num_heads": 6}  # 384 // 64 heads, as DINO's vit_small
    with torch.device("meta"):
        ours = build_backbone(cfg).model
        timm_vit_s = timm.create_model("vit_small_patch16_224", num_classes=0)
    assert _meta_shapes(ours) == state == _meta_shapes(timm_vit_s)
    assert ours.blocks[0].attn.num_heads == timm_vit_s.blocks[0].attn.num_heads == 6


def test_inferred_config_for_dinov2_reg_and_resnet50_shapes():
    d = 384  # dinov2_vits14_reg4_pretrain.pth: 518 px, 1 + 37 * 37 positions, 4 registers, LayerScale
    state = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + 37 * 37, d), "register_tokens": (1, 4, d),
             "mask_token": (1, d), "patch_embed.proj.weight": (d, 3, 14, 14), "blocks.11.ls1.gamma": (d,),
             "blocks.11.mlp.fc1.weight": (4 * d, d), "blocks.0.attn.qkv.bias": (3 * d,)}
    cfg = infer_backbone_config({k: torch.empty(s, device="meta") for k, s in state.items()})
    assert (cfg.name, cfg.patch_size, cfg.img_size, cfg.depth) == ("vit_small_patch14_reg4_dinov2", 14, 518, 12)
    assert cfg.kwargs == {"embed_dim": 384, "num_heads": 6, "reg_tokens": 4, "no_embed_class": True}
    with torch.device("meta"):
        vit = build_backbone(cfg).model
        resnet = torchvision.models.resnet50()
    assert vit.pos_embed.shape == (1, 37 * 37, d) and vit.reg_token.shape == (1, 4, d)
    mapped = to_timm_names({k: torch.empty(s, device="meta") for k, s in state.items()})
    assert mapped["cls_token"].shape == (1, 1, d) and mapped["pos_embed"].shape == vit.pos_embed.shape
    rn_state = resnet.state_dict()
    rn_cfg = infer_backbone_config(rn_state)
    assert rn_cfg.name == "resnet50" and rn_cfg.patch_size is None and not rn_cfg.cifar_stem
    with torch.device("meta"):
        ours = build_backbone(rn_cfg).model
    assert _meta_shapes(ours) == {k: v for k, v in _meta_shapes(resnet).items() if not k.startswith("fc.")}


def test_heads_cannot_be_guessed_below_64_dims(dino):
    with pytest.raises(CheckpointError, match="pass num_heads="):
        infer_backbone_config(dino["backbone"])


def test_run_dir_with_unreadable_last_ckpt_falls_back_to_previous(tmp_path):
    run, teacher, cfg = _write_run(tmp_path, False)
    last, previous = run / "checkpoints" / "last.ckpt", run / "checkpoints" / "previous.ckpt"
    previous.write_bytes(last.read_bytes())
    last.write_bytes(last.read_bytes()[:1000])  # torn by a crash mid-write
    lines = []
    bb, info = load_run_backbone(run, log=lines.append)
    assert info.path == previous and len(lines) == 1
    assert lines[0].startswith(f"[ssl-bench] cannot read {last} (") and lines[0].endswith(
        "falling back to checkpoints/previous.ckpt")
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(_features(bb, x).cls, _features(teacher, x).cls)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*last.ckpt"):
        load_run_backbone(last, log=lines.append)  # a file named by the user is never replaced by another
    last.unlink()
    assert load_run_backbone(run, log=lines.append)[1].path == previous and len(lines) == 2
    previous.write_bytes(b"")
    with pytest.raises(CheckpointError, match="previous.ckpt"):  # nothing readable left: the error says so
        load_run_backbone(run, log=lines.append)


def test_run_dir_reads_last_ckpt_without_a_word_when_it_loads(tmp_path):
    run, _, _ = _write_run(tmp_path, False)
    (run / "checkpoints" / "previous.ckpt").write_bytes(b"not a checkpoint")
    lines = []
    assert load_run_backbone(run, log=lines.append)[1].path == run / "checkpoints" / "last.ckpt" and lines == []
