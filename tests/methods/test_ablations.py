"""Each ablation and DINOv2 addition changes what it says it changes, and nothing else."""

import json

import pytest
import torch

from ssl_bench import config as config_lib
from ssl_bench import schedules
from ssl_bench.run import train
from ssl_bench.data.batch import Batch
from ssl_bench.data.masking import sample_masks
from ssl_bench.methods import METHODS, build_method
from ssl_bench.methods.base import param_groups, vit_layer_id
from tests.methods.test_methods import _crops, _step

EXPECTED = {"dino", "dino_no_centering", "dino_no_sharpening", "dino_no_centering_no_sharpening", "dino_sinkhorn",
            "dino_no_multicrop", "dino_no_momentum", "ibot", "dinov2", "dinov2_no_koleo", "dinov2_no_ibot",
            "dinov2_no_sinkhorn", "dino_koleo"}


def _method(tiny_tree, name, **method):
    return build_method(config_lib.build_config(tiny_tree, {"method": {"name": name, **method}}))


def _masked_batch(cfg, crops):
    import random

    masks = sample_masks(2 * 4, (4, 4), 0.5, (0.1, 0.5), random.Random(0))
    masks[0, :3] = True  # at least one image with masked patches whatever the draw
    return Batch(crops, torch.zeros(4), masks)


def test_registry_lists_every_method_of_the_issue():
    assert EXPECTED <= set(METHODS.names())


def test_no_momentum_keeps_teacher_equal_to_student(tiny_tree):
    method = _method(tiny_tree, "dino_no_momentum")
    _step(method, _crops(method.cfg))
    for t, s in zip(method.teacher.state_dict().values(), method.student.state_dict().values()):
        assert torch.equal(t, s)
    dino = _method(tiny_tree, "dino")
    _step(dino, _crops(dino.cfg))
    assert any(not torch.equal(t, s) for t, s in zip(dino.teacher.parameters(), dino.student.parameters()))


def test_no_centering_no_sharpening_combines_both(tiny_tree):
    method = _method(tiny_tree, "dino_no_centering_no_sharpening", teacher_temp=0.04)
    assert method.teacher_temp_at(0) == method.cfg.method.student_temp == 0.1
    _step(method, _crops(method.cfg))
    assert method.centering.center.abs().sum() == 0


def test_sinkhorn_targets_replace_centering(tiny_tree):
    method = _method(tiny_tree, "dino_sinkhorn")
    logits = torch.randn(8, method.cfg.method.out_dim)
    probs = method.teacher_probs(logits, 0.04)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(8))
    # 3 iterations move the prototype marginals towards B/K; plain softmax is far from it
    spread = (probs.sum(dim=0) - 8 / logits.shape[1]).abs().sum()
    assert spread < (torch.softmax(logits / 0.04, dim=1).sum(dim=0) - 8 / logits.shape[1]).abs().sum()
    _step(method, _crops(method.cfg))
    assert not [k for k in method.state_dict() if "center" in k]  # Sinkhorn-Knopp keeps no center


def test_no_multicrop_trains_on_two_global_views(tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": "dino_no_multicrop"}})
    method = build_method(cfg)
    dm = train.build_datamodule(cfg, method)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, Batch) and batch.masks is None
    assert len(batch.crops) == 2 and cfg.data.local_crops_number == 2
    full = train.build_datamodule(cfg, build_method(config_lib.build_config(tiny_tree)))
    assert len(next(iter(full.train_dataloader())).crops) == 4


def test_dinov2_student_sees_mask_tokens_and_batches_carry_masks(tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": "dinov2"}})
    method = build_method(cfg)
    assert method.uses_masks and hasattr(method.student.backbone, "mask_token")
    crops, _, masks = next(iter(train.build_datamodule(cfg, method).train_dataloader()))  # Batch fields in order
    assert masks.shape == (2 * cfg.data.batch_size, (16 // 4) ** 2) and masks.dtype == torch.bool
    backbone = method.student.backbone.eval()
    with torch.no_grad():
        backbone.mask_token.fill_(3.0)
        m = torch.zeros(2, 16, dtype=torch.bool)
        m[0, 5] = True
        plain, masked = backbone(crops[0][:2]), backbone(crops[0][:2], masks=m)
    assert torch.equal(plain.patches[1], masked.patches[1])  # image 1 has no masked patch
    assert not torch.allclose(plain.patches[0], masked.patches[0])
    assert not hasattr(_method(tiny_tree, "dino").student.backbone, "mask_token")


@pytest.mark.parametrize("name,terms", [("dinov2", {"ibot", "koleo"}), ("dinov2_no_koleo", {"ibot"}),
                                        ("dinov2_no_ibot", {"koleo"}), ("ibot", {"ibot"})])
def test_dinov2_variants_switch_exactly_their_terms(name, terms, tiny_tree):
    method = _method(tiny_tree, name)
    logged = {}
    method.log_dict = lambda d, **k: logged.update(d)
    crops = _crops(method.cfg)
    batch = _masked_batch(method.cfg, crops)
    _step_batch(method, batch)
    assert {k.removeprefix("train/loss_") for k in logged if k.startswith("train/loss_")} == {"dino", *terms}
    values = {t: torch.as_tensor(logged[f"train/loss_{t}"]).item() for t in terms}
    assert all(v != 0 for v in values.values()) and values.get("ibot", 1.0) > 0  # a cross-entropy is positive
    assert method.uses_masks == ("ibot" in terms) == ("train/masked_patches" in logged)
    centers = [k for k in method.state_dict() if "center" in k]
    assert centers == (["centering.center", "patch_centering.center"] if name == "ibot" else [])


def test_dinov2_no_sinkhorn_centers_both_heads_and_dinov2_does_not(tiny_tree):
    method = _method(tiny_tree, "dinov2_no_sinkhorn")
    _step_batch(method, _masked_batch(method.cfg, _crops(method.cfg)))
    assert method.centering.center.abs().sum() > 0 and method.patch_centering.center.abs().sum() > 0
    dinov2 = _method(tiny_tree, "dinov2")
    _step_batch(dinov2, _masked_batch(dinov2.cfg, _crops(dinov2.cfg)))
    assert not [k for k in dinov2.state_dict() if "center" in k]


def test_separate_ibot_head_has_its_own_prototypes(tiny_tree):
    method = _method(tiny_tree, "ibot", ibot_separate_head=True, ibot_out_dim=32)
    assert method.student.ibot_head.last_layer.direction.shape[0] == 32
    assert method.patch_centering.center.shape == (1, 32)
    assert _method(tiny_tree, "dinov2", ibot_separate_head=True, ibot_out_dim=32).teacher.ibot_head
    _step_batch(method, _masked_batch(method.cfg, _crops(method.cfg)))
    with pytest.raises(ValueError, match="ibot_separate_head"):
        _method(tiny_tree, "dinov2", ibot_out_dim=32)


def _step_batch(method, batch):
    """Like tests.methods.test_methods._step but with a Batch that carries masks."""
    crops = batch.crops
    original = method.training_step
    method.training_step = lambda b, i: original(batch, i)
    try:
        return _step(method, crops)
    finally:
        method.training_step = original


def test_layerwise_decay_and_patch_embed_multiplier(tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"backbone": {"depth": 3}})
    net = build_method(cfg).student
    assert vit_layer_id("backbone.model.cls_token", 3) == 0
    assert vit_layer_id("backbone.model.blocks.2.mlp.fc1.weight", 3) == 3
    assert vit_layer_id("head.mlp.0.weight", 3) == vit_layer_id("backbone.model.norm.weight", 3) == 4
    groups = param_groups(net, layerwise_decay=0.5, patch_embed_lr_mult=0.2, num_layers=3)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["apply_wd"] for g in groups for p in g["params"]}
    named = dict(net.named_parameters())
    assert scale[id(named["backbone.model.patch_embed.proj.weight"])] == pytest.approx(0.5 ** 4 * 0.2)
    assert scale[id(named["backbone.model.pos_embed"])] == pytest.approx(0.5 ** 4)
    assert scale[id(named["backbone.model.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5 ** 3)
    assert scale[id(named["backbone.model.blocks.2.attn.qkv.weight"])] == pytest.approx(0.5)
    assert scale[id(named["head.mlp.0.weight"])] == 1.0
    assert not wd[id(named["backbone.model.blocks.0.norm1.weight"])] and wd[id(named["head.mlp.0.weight"])]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in net.parameters() if p.requires_grad)


def test_optimizer_applies_lr_scale_and_weight_decay_per_group(tiny_tree):
    method = build_method(config_lib.build_config(tiny_tree, {"optim": {"layerwise_decay": 0.5}}))
    _step(method, _crops(method.cfg))
    opt = method.configure_optimizers()
    method.total_steps, method.steps_per_epoch, method.total_batch_size = 10, 5, lambda: 4
    values = method.set_optimizer_schedule(opt, 7)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(values["lr"] * g["lr_scale"])
        assert g["weight_decay"] == (values["wd"] if g["apply_wd"] else 0.0)
    sgd = build_method(config_lib.build_config(tiny_tree, {"optim": {"optimizer": "sgd"}})).configure_optimizers()
    assert isinstance(sgd, torch.optim.SGD) and sgd.defaults["momentum"] == 0.9


def test_lr_scaling_rules():
    assert schedules.scaled_lr(5e-4, 1024) == pytest.approx(2e-3)
    assert schedules.scaled_lr(4e-3, 256, "sqrt_1024") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="sqrt_1024"):
        schedules.scaled_lr(1.0, 256, "cubic")


def test_stop_on_collapse_ends_the_run_and_records_why(tiny_tree):
    # A KL threshold of 100 nats calls anything collapsed at once: the run must stop after step 0.
    cfg = config_lib.build_config(tiny_tree, {"train": {"stop_on_collapse": True, "collapse_kl": 100.0,
                                                        "collapse_window": 1}})
    result = train.run(cfg)
    record = json.loads((result.run_dir / "result.json").read_text())
    assert record["status"] == "completed" and record["timing"]["train_steps"] == 1
    c = record["collapse"]
    assert c["collapsed"] and c["collapse_step"] == 0 and c["stopped_early"].startswith("stopped: collapsed at step 0 (")
    timing = record["timing"]  # 1 of 2 planned steps left, priced at the one step's pace
    assert timing["planned_steps"] == 2
    # The record rounds train_s to 0.01 s (up to 1.4e-6 h off here) and device_hours_saved to 1e-6 h.
    assert timing["device_hours_saved"] == pytest.approx(timing["train_s"] / 3600, rel=1e-3, abs=2e-6)
    off = train.run(config_lib.build_config(tiny_tree, {"train": {"collapse_kl": 100.0, "collapse_window": 1}}))
    off_record = json.loads((off.run_dir / "result.json").read_text())
    assert off_record["timing"]["train_steps"] == 2 and off_record["collapse"]["collapsed"]
    assert off_record["collapse"]["stopped_early"] is None and "device_hours_saved" not in off_record["timing"]


def test_validation_rejects_masks_that_do_not_tile_the_crop(tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": "dinov2"}, "data": {"global_crop_size": 18}})
    with pytest.raises(config_lib.ConfigError, match="data.global_crop_size.*not a multiple of the patch size 4"):
        train.validate_config(cfg, check_data=False)
    train.validate_config(config_lib.build_config(tiny_tree, {"method": {"name": "dinov2"}}), check_data=False)
    cnn_tree = {**tiny_tree, "backbone": {"name": "resnet18", "cifar_stem": True}}
    resnet = config_lib.build_config(cnn_tree, {"method": {"name": "ibot"}})
    with pytest.raises(config_lib.ConfigError, match="need a ViT backbone"):
        train.validate_config(resnet, check_data=False)
    decay = config_lib.build_config(cnn_tree, {"optim": {"layerwise_decay": 0.9}})
    with pytest.raises(config_lib.ConfigError, match="ViT backbones only"):
        train.validate_config(decay, check_data=False)
