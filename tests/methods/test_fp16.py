"""fp16 as official DINO does it (DESIGN.md habit 12), checked on the CPU with a real GradScaler.

Official DINO (facebookresearch/dino 7c446df, ``main_dino.train_one_epoch``) calls
``fp16_scaler.scale(loss).backward()``, then ``fp16_scaler.unscale_(optimizer)`` before
``clip_gradients`` and ``cancel_gradients_last_layer``, then ``fp16_scaler.step`` / ``update``, and
runs the EMA update (and, inside ``DINOLoss.forward``, the center update) whether or not the
scaler skipped the step. Lightning on the CPU turns ``precision="16-mixed"`` into bf16, so these
tests pass an explicit ``MixedPrecision("16-mixed", "cpu", GradScaler)`` plugin, as ``train.run`` does.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from torch.testing import assert_close
from torch.utils.data import DataLoader

from ssl_bench import config as config_lib
from ssl_bench.run import speed
from ssl_bench.run import train
from ssl_bench.methods import base, build_method
from ssl_bench.methods.finite import NonFiniteError
from tests.methods.test_methods import _crops

SCALE = 2.0 ** 3  # small enough that the tiny model's first fp16 step does not overflow


def _fit_one_step(method, cfg, plugins=None, precision="32-true"):
    train.quiet_lightning()
    batch = (_crops(cfg), torch.zeros(4))
    loader = DataLoader([batch], batch_size=None)
    extra = {"plugins": plugins} if plugins else {"precision": precision}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **extra)
    trainer.fit(method, train_dataloaders=loader)
    return trainer


def _fp16(scale=SCALE):
    return [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=scale))]


@pytest.fixture
def recorded_norms(monkeypatch):
    """The per-parameter gradient norms each call of the clip sees, before it clips."""
    seen: list[torch.Tensor] = []
    real = base.clip_per_parameter

    def recording(params, max_norm):
        seen.append(torch.stack([p.grad.detach().float().norm() for p in params if p.grad is not None]))
        return real(params, max_norm)

    monkeypatch.setattr(base, "clip_per_parameter", recording)
    return seen


def _method(tiny_tree, fused=True):
    cfg = config_lib.build_config(tiny_tree, {"speed": {"fused_optimizer": fused},
                                              "method": {"freeze_last_layer_epochs": 0}})
    torch.manual_seed(0)
    method = build_method(cfg)
    speed.apply(method, cfg)
    return method, cfg


def _old_order_optimize(self, loss, step):
    """ssl-bench before the fix: clip right after the (scaled) backward, before the optimizer step."""
    opt = self.optimizers()
    values = self.set_optimizer_schedule(opt.optimizer, step)
    self.manual_backward(loss)
    base.clip_per_parameter(list(self.student.parameters()), self.cfg.optim.clip_grad)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return values


@pytest.mark.parametrize("fused", [True, False])  # Lightning unscales only the non-fused optimizers itself
def test_clip_sees_the_gradients_of_fp32(tiny_tree, recorded_norms, monkeypatch, fused):
    method, cfg = _method(tiny_tree, fused)
    twin = copy.deepcopy(method)
    _fit_one_step(method, cfg)
    _fit_one_step(twin, cfg, plugins=_fp16())
    fp32, fp16 = recorded_norms
    assert fp16.isfinite().all() and twin.finite.skipped_steps() == 0
    assert_close(fp16, fp32, rtol=0.05, atol=1e-3 * float(fp32.max()))

    # Negative control: the old order clips gradients still multiplied by the loss scale.
    monkeypatch.setattr(base.SSLMethod, "optimize", _old_order_optimize)
    monkeypatch.setattr(base.SSLMethod, "on_before_optimizer_step", lambda self, optimizer: None)
    recorded_norms.clear()
    _fit_one_step(_method(tiny_tree, fused)[0], cfg, plugins=_fp16())
    with pytest.raises(AssertionError):
        assert_close(recorded_norms[0], fp32, rtol=0.05, atol=1e-3 * float(fp32.max()))
    assert_close(recorded_norms[0], fp32 * SCALE, rtol=0.05, atol=1e-3 * SCALE * float(fp32.max()))


@pytest.mark.parametrize("fused", [True, False])
def test_skipped_step_keeps_student_and_still_updates_teacher_and_center(tiny_tree, fused):
    method, cfg = _method(tiny_tree, fused)
    with torch.no_grad():  # a teacher that differs from the student, so that the EMA visibly moves it
        for p in method.teacher.parameters():
            p.add_(0.01)
    student0 = [p.detach().clone() for p in method.student.parameters()]
    teacher0 = [p.detach().clone() for p in method.teacher.parameters()]
    trainer = _fit_one_step(method, cfg, plugins=_fp16(scale=2.0 ** 60))  # overflows: the scaler skips
    assert method.finite.skipped_steps() == 1
    assert trainer.precision_plugin.scaler.get_scale() == 2.0 ** 59
    for before, after in zip(student0, method.student.parameters()):
        assert torch.equal(before, after.detach())
    m = method.momentum_at(0)
    for t0, s0, t in zip(teacher0, student0, method.teacher.parameters()):
        assert_close(t.detach(), m * t0 + (1 - m) * s0)
    assert method.centering.center.abs().sum() > 0


def test_16_mixed_on_cpu_is_fp16_with_a_scaler_not_bf16(tiny_cfg):
    cfg = config_lib.build_config(config_lib.to_dict(tiny_cfg), {"trainer": {"precision": "16-mixed"}})
    (plugin,) = train.precision_settings(cfg)["plugins"]
    assert plugin.precision == "16-mixed" and plugin.scaler is not None
    assert plugin.autocast_context_manager().fast_dtype == torch.float16
    assert train.precision_settings(tiny_cfg) == {"precision": "32-true"}
    result = train.run(cfg)
    assert result.status == "completed" and "fp16_skipped_steps" in result.timing


def test_scaler_that_keeps_skipping_fails_the_run(tiny_tree, monkeypatch):
    monkeypatch.setattr(train, "precision_settings", lambda cfg: {"plugins": _fp16(scale=2.0 ** 60)})
    cfg = config_lib.build_config(tiny_tree, {"trainer": {"max_steps": 6}, "optim": {"epochs": 2},
                                              "train": {"fp16_max_consecutive_skips": 3,
                                                        "diagnostics_every_n_steps": 0}})
    with pytest.raises(NonFiniteError, match=r"gradient norm \(fp16 steps skipped in a row\) at step 2 "
                                             r"\(train.fp16_max_consecutive_skips=3\)"):
        train.run(cfg)
