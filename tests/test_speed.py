"""Speed levers change how fast a step runs, not what it computes.

The optimised step (the registered method's ``training_step`` in a Lightning Trainer, with fused
AdamW, foreach clipping and EMA, channels_last, activation checkpointing and, in the slow test,
torch.compile) is checked against a plain step written here from DINO's algorithm box
(facebookresearch/dino ``train_one_epoch``): per-parameter Python loops for clipping and EMA,
``torch.optim.AdamW(foreach=False)``, no_grad teacher. Same seed, same batches, a few steps: the
losses and every student and teacher weight must agree to float tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from ssl_bench import config as config_lib
from ssl_bench import repro, schedules
from ssl_bench.run import speed
from ssl_bench.bench.train import SyntheticCrops, fit_steps
from ssl_bench.methods import build_method
from ssl_bench.methods.base import param_groups

STEPS = 3
BATCH = 4
LOCAL = 2

VIT = {"backbone": {"name": "vit_tiny_patch16_224", "patch_size": 4, "img_size": 16, "depth": 2,
                    "drop_path_rate": 0.0, "kwargs": {"embed_dim": 32, "num_heads": 2}}}
RESNET = {"backbone": {"name": "resnet18", "patch_size": None, "img_size": None, "depth": None,
                       "drop_path_rate": 0.0, "kwargs": {"zero_init_last": False}}}


def make_cfg(backbone: dict, **speed_options) -> config_lib.Config:
    tree = {"data": {"name": "synthetic", "batch_size": BATCH, "global_crop_size": 16, "local_crop_size": 8,
                     "local_crops_number": LOCAL},
            "method": {"out_dim": 64, "head_hidden_dim": 48, "head_bottleneck_dim": 16,
                       "freeze_last_layer_epochs": 0.0, "momentum_teacher": 0.9},
            # Large lr and few warm-up steps, so that three steps move every weight measurably.
            "optim": {"epochs": 2, "lr": 0.01, "warmup_epochs": 0.5, "clip_grad": 0.5},
            "speed": speed_options, **backbone}
    return config_lib.build_config(tree)


def batches(cfg: config_lib.Config) -> SyntheticCrops:
    d = cfg.data
    return SyntheticCrops(d.batch_size, d.global_crop_size, d.local_crop_size, LOCAL, STEPS, seed=7)


class Losses(Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.values.append(float(loss))


def optimised_run(cfg: config_lib.Config):
    repro.seed_everything(0)
    method = build_method(cfg)
    losses = Losses()
    fit_steps(cfg, method, DataLoader(batches(cfg), batch_size=None), STEPS, [losses])
    return method, losses.values


def plain_run(cfg: config_lib.Config):
    """DINO's step written out with loops over parameters; schedules as functions of the step."""
    repro.seed_everything(0)
    method = build_method(cfg)
    student, teacher, m, o = method.student, method.teacher, cfg.method, cfg.optim
    groups = param_groups(student)
    opt = torch.optim.AdamW(groups, lr=0.0, foreach=False, fused=False)
    center = torch.zeros(1, m.out_dim)
    steps_per_epoch = STEPS  # one epoch = the synthetic loader's length, as Lightning counts it
    total = o.epochs * steps_per_epoch
    base_lr = o.lr * BATCH / 256
    losses = []
    for step, batch in enumerate(batches(cfg)):
        crops = batch.crops
        for g in opt.param_groups:
            g["lr"] = schedules.cosine(step, total, base_lr, o.min_lr, round(o.warmup_epochs * steps_per_epoch))
            g["weight_decay"] = schedules.cosine(step, total, o.weight_decay, o.weight_decay_end) if g["apply_wd"] else 0
        with torch.no_grad():
            t_out = teacher.head(torch.cat([teacher.backbone(torch.cat(crops[:2])).cls]))
            targets = F.softmax((t_out - center) / m.teacher_temp, dim=-1).chunk(2)
        s_out = torch.cat([student.backbone(torch.cat(crops[:2])).cls, student.backbone(torch.cat(crops[2:])).cls])
        s_out = student.head(s_out).chunk(len(crops))
        loss, pairs = 0.0, 0
        for iq, q in enumerate(targets):
            for v, s in enumerate(s_out):
                if v != iq:
                    loss = loss + torch.sum(-q * F.log_softmax(s / m.student_temp, dim=-1), dim=-1).mean()
                    pairs += 1
        loss = loss / pairs
        opt.zero_grad()
        loss.backward()
        for p in student.parameters():
            if p.grad is not None:
                clip = o.clip_grad / (p.grad.data.norm(2) + 1e-6)
                if clip < 1:
                    p.grad.data.mul_(clip)
        opt.step()
        center = center * m.center_momentum + t_out.mean(dim=0, keepdim=True) * (1 - m.center_momentum)
        momentum = schedules.cosine(step, total, m.momentum_teacher, m.momentum_teacher_end)
        with torch.no_grad():
            for pt, ps in zip(teacher.parameters(), student.parameters()):
                pt.data.mul_(momentum).add_((1 - momentum) * ps.detach().data)
        losses.append(float(loss.detach()))
    return method, losses


def assert_same(fast, plain, atol: float) -> None:
    (fast_method, fast_losses), (plain_method, plain_losses) = fast, plain
    assert len(fast_losses) == STEPS
    for a, b in zip(fast_losses, plain_losses):
        assert math.isclose(a, b, rel_tol=2e-5), (fast_losses, plain_losses)
    moved = 0
    for net in ("student", "teacher"):
        fast_params = dict(getattr(fast_method, net).named_parameters())
        for name, p in getattr(plain_method, net).named_parameters():
            q = fast_params[name]
            torch.testing.assert_close(q.detach().contiguous(), p.detach().contiguous(), atol=atol, rtol=1e-4,
                                       msg=lambda text: f"{net}.{name}: {text}")
    # The comparison means something only if the weights moved from their initial values.
    repro.seed_everything(0)
    initial = dict(build_method(fast_method.cfg).student.named_parameters())
    for name, p in fast_method.student.named_parameters():
        moved += int(not torch.allclose(p.detach(), initial[name].detach(), atol=1e-6))
    assert moved > len(initial) // 2


@pytest.mark.parametrize("backbone, options", [
    (VIT, {"fused_optimizer": True, "activation_checkpointing": True, "compile": False}),
    (RESNET, {"fused_optimizer": True, "channels_last": True, "compile": False}),
    (VIT, {"fused_optimizer": True, "fused_attention": False, "compile": False}),
    (RESNET, {"fused_optimizer": True, "small_map_conv": True, "autocast_convs": False, "compile": False}),
], ids=["vit-fused-checkpointing", "resnet18-fused-channels_last", "vit-explicit-attention", "resnet18-fp32-convs"])
def test_optimised_step_matches_plain_step(backbone, options):
    cfg = make_cfg(backbone, **options)
    assert_same(optimised_run(cfg), plain_run(make_cfg(backbone, fused_optimizer=False, compile=False,
                                                        channels_last=False)), atol=2e-5)


@pytest.mark.slow
def test_compiled_step_matches_plain_step():
    """torch.compile of backbones and heads (inductor's C++ codegen on CPU; minutes on 2 cores)."""
    cfg = make_cfg(VIT, fused_optimizer=True, compile=True)
    fast = optimised_run(cfg)
    assert speed.is_compiled(fast[0])
    assert_same(fast, plain_run(make_cfg(VIT, fused_optimizer=False, compile=False)), atol=5e-5)


def test_plain_step_detects_a_changed_algorithm():
    """The comparison can fail: a different teacher temperature gives different losses and weights."""
    fast = optimised_run(make_cfg(VIT, compile=False))
    cfg = make_cfg(VIT, compile=False)
    cfg.method.teacher_temp = 0.07
    with pytest.raises(AssertionError):
        assert_same(fast, plain_run(cfg), atol=2e-5)


def test_speed_options_stay_out_of_the_run_id():
    base = make_cfg(VIT)
    assert config_lib.run_id(base) == config_lib.run_id(make_cfg(VIT, compile=True, fused_optimizer=False,
                                                                  activation_checkpointing=True))


def test_activation_checkpointing_on_a_cnn_is_an_error():
    cfg = make_cfg(RESNET, activation_checkpointing=True)
    with pytest.raises(ValueError, match="speed.activation_checkpointing"):
        speed.apply(build_method(cfg), cfg)


@pytest.mark.parametrize("shape, kernel, stride, padding, dilation, bias", [
    ((6, 8, 1, 1), 3, 1, 1, 1, False),  # a ResNet layer4 3x3 on a 1x1 map
    ((5, 4, 4, 4), 3, 2, 1, 1, True),  # strided, with bias, 2x2 output
    ((3, 4, 2, 2), 3, 1, 2, 2, False),  # dilated
    ((4, 4, 4, 4), 1, 2, 0, 1, False),  # a 1x1 downsample
])
def test_small_map_conv_gradients_match_conv2d(shape, kernel, stride, padding, dilation, bias):
    from ssl_bench.backbones.small_map_conv import MAX_PIXELS, SmallMapConv2d, enable

    torch.manual_seed(0)
    plain = torch.nn.Conv2d(shape[1], 7, kernel, stride, padding, dilation, bias=bias).double()
    fast = torch.nn.Sequential(torch.nn.Conv2d(shape[1], 7, kernel, stride, padding, dilation, bias=bias).double())
    fast[0].load_state_dict(plain.state_dict())
    assert enable(fast) == 1 and isinstance(fast[0], SmallMapConv2d)
    x = torch.randn(shape, dtype=torch.double)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = plain(xa), fast(xb)
    assert ya.shape[-1] * ya.shape[-2] <= MAX_PIXELS  # the batched path is the one taken
    upstream = torch.randn_like(ya)
    (ya * upstream).sum().backward()
    (yb * upstream).sum().backward()
    torch.testing.assert_close(yb, ya)
    torch.testing.assert_close(xb.grad, xa.grad)
    torch.testing.assert_close(fast[0].weight.grad, plain.weight.grad)
    if bias:
        torch.testing.assert_close(fast[0].bias.grad, plain.bias.grad)


def test_small_map_conv_is_applied_to_the_student_on_cpu_only():
    from ssl_bench.backbones.small_map_conv import SmallMapConv2d

    cfg = make_cfg(RESNET)
    method = build_method(cfg)
    speed.apply(method, cfg)
    assert any(isinstance(m, SmallMapConv2d) for m in method.student.modules())
    assert not any(isinstance(m, SmallMapConv2d) for m in method.teacher.modules())
    assert method.student.backbone.channels_last  # auto: on for convolutional backbones
    cfg_off = make_cfg(RESNET, small_map_conv=False, channels_last=False)
    method = build_method(cfg_off)
    speed.apply(method, cfg_off)
    assert not any(isinstance(m, SmallMapConv2d) for m in method.student.modules())


def test_autocast_convs_off_keeps_a_cnn_in_fp32_under_bf16_autocast():
    """With the lever off, a ResNet's features under bf16 autocast are its fp32 features; with it on they are not."""
    cfg = make_cfg(RESNET)
    repro.seed_everything(0)
    net = build_method(cfg).student
    keys = list(net.state_dict())
    crops = torch.randn(2 * BATCH, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    net.eval()
    with torch.no_grad():
        exact = net.backbone(crops).cls
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded = net.backbone(crops).cls.float()
            speed.set_levers(net, {"autocast_convs": False}, student=True)
            kept = net.backbone(crops).cls
            head = net.head(kept)
    assert kept.dtype == torch.float32 and head.dtype == torch.bfloat16  # the head still runs in bf16
    torch.testing.assert_close(kept, exact, atol=1e-5, rtol=1e-5)
    assert float((rounded - exact).norm() / exact.norm()) > 1e-3  # bf16 convolutions do round (the control)
    assert list(net.state_dict()) == keys
