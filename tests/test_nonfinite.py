"""A diverged run fails with its step (DESIGN.md habit 11): the watch, the guard, the records, grid status."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from ssl_bench.run import checkpoints, guard
from ssl_bench.run import train
from ssl_bench import config as config_lib
from ssl_bench.launch.status import run_state
from ssl_bench.methods import base, dino, parts
from ssl_bench.methods.finite import FiniteWatch, NonFiniteError
from tests.gloo_ranks import run_ranks

NAN = float("nan")


# ---- the device-side record -----------------------------------------------------------------------------


def test_watch_keeps_the_first_non_finite_value_and_its_kind():
    watch = FiniteWatch()
    watch.observe(0, "loss", torch.tensor(1.0))
    assert watch.verdict() is None
    watch.observe(3, "teacher output", torch.tensor([1.0, math.inf]))
    watch.observe(3, "loss", torch.tensor(NAN))  # same step, later in the step: the teacher output is the cause
    watch.observe(4, "DINO loss", torch.tensor(NAN))
    assert watch.verdict() == ("teacher output", 3)


def test_gradient_norm_is_a_divergence_without_scaler_and_a_skip_with_one():
    plain = FiniteWatch()
    plain.observe_gradients(2, torch.tensor(math.inf), scaler_active=False)
    assert plain.verdict() == ("gradient norm", 2)

    fp16 = FiniteWatch(max_consecutive_skips=3)
    for step, norm in enumerate([math.inf, math.inf, 1.0, math.inf, NAN]):
        fp16.observe_gradients(step, torch.tensor(norm), scaler_active=True)
    assert fp16.verdict() is None and fp16.skipped_steps() == 4  # never 3 in a row
    fp16.observe_gradients(5, torch.tensor(math.inf), scaler_active=True)
    assert fp16.verdict() == ("gradient norm (fp16 steps skipped in a row)", 5)


def test_weights_are_blamed_on_the_step_that_wrote_them():
    net = torch.nn.Linear(2, 2)
    watch = FiniteWatch()
    watch.observe_weights(4, [net])
    assert watch.verdict() is None
    with torch.no_grad():
        net.weight[0, 0] = NAN
    watch.observe_weights(4, [net])  # after 4 updates: step 3 wrote them
    assert watch.verdict() == ("weights", 3)


def _ranks_disagree(rank: int):
    watch = FiniteWatch()
    watch.observe(7 if rank == 0 else 3, "loss", torch.tensor(NAN))
    if rank == 0:
        watch.observe(1, "loss", torch.tensor(1.0))
    return tuple(watch.verdict())


@pytest.mark.ddp
def test_every_rank_agrees_on_the_earliest_step(tmp_path):
    results = run_ranks(_ranks_disagree, tmp_path)
    assert [r["local"] for r in results] == [("loss", 7), ("loss", 3)]  # negative control: alone, each its own
    assert [r["distributed"] for r in results] == [("loss", 3), ("loss", 3)]


# ---- training runs that diverge --------------------------------------------------------------------------


def _diverging(tiny_tree, **overrides):
    tree = config_lib.deep_merge(tiny_tree, {"optim": {"lr": 1e30, "epochs": 2}, "trainer": {"max_steps": 8},
                                             "train": {"checkpoint_every_n_steps": 1}})
    return config_lib.build_config(tree, overrides)


@pytest.mark.parametrize("diagnostics", [0, 1])
def test_lr_1e30_fails_with_its_step_and_no_accuracy(tiny_tree, diagnostics):
    cfg = _diverging(tiny_tree, train={"diagnostics_every_n_steps": diagnostics})
    with pytest.raises(NonFiniteError, match=r"non-finite .* at step \d+") as info:
        train.run(cfg)
    result = json.loads((config_lib.run_dir(cfg) / "result.json").read_text())
    assert result["status"] == "failed" and result["step"] == info.value.step
    assert result["error"] == f"non-finite {info.value.what} at step {info.value.step}"
    assert "knn_top1" not in result["metrics"] and "knn_top1_init" in result["metrics"]  # init was finite
    logged = [json.loads(line) for line in (config_lib.run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in logged if "train/loss" in line]
    assert all(math.isfinite(v) for v in losses) and len(losses) <= info.value.step + 1
    # The last checkpoint is finite and was written before the diverged step.
    ckpt = torch.load(config_lib.run_dir(cfg) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] <= info.value.step
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_grid_status_shows_the_failure_and_its_step(tiny_tree):
    cfg = _diverging(tiny_tree, train={"diagnostics_every_n_steps": 0})
    with pytest.raises(NonFiniteError) as info:
        train.run(cfg)
    spec = SimpleNamespace(run_dir=config_lib.run_dir(cfg), run_id=config_lib.run_id(cfg), axes={}, seed=0)
    row = run_state(spec, None, {})
    assert row.state == "failed" and f"at step {info.value.step}" in row.label


@pytest.mark.parametrize("method,target,what", [
    ("dino", (dino, "dino_cross_entropy"), "loss"),
    ("dinov2", (dino, "dino_cross_entropy"), "DINO loss"),  # every method runs DINO's composed step
    ("dinov2", (parts, "ibot_masked_patch_loss"), "iBOT loss"),
    ("dinov2", (parts, "koleo_loss"), "KoLeo loss"),
])
def test_each_loss_term_is_watched(tiny_tree, monkeypatch, method, target, what):
    module, name = target
    real = getattr(module, name)
    calls = []

    def nan_from_the_second_step(*args, **kwargs):
        calls.append(1)
        value = real(*args, **kwargs)
        return value * NAN if len(calls) > (2 if name == "koleo_loss" else 1) else value  # KoLeo: once per view

    monkeypatch.setattr(module, name, nan_from_the_second_step)
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": method}, "train": {"diagnostics_every_n_steps": 0}})
    with pytest.raises(NonFiniteError, match=f"non-finite {what} at step 1$"):
        train.run(cfg)


def test_non_finite_gradient_fails_fp32_run(tiny_tree, monkeypatch):
    real = base.clip_per_parameter

    def poisoned(params, max_norm):
        params[0].grad.fill_(NAN)
        return real(params, max_norm)

    monkeypatch.setattr(base, "clip_per_parameter", poisoned)
    cfg = config_lib.build_config(tiny_tree, {"train": {"diagnostics_every_n_steps": 0}})
    with pytest.raises(NonFiniteError, match="non-finite gradient norm at step 0$"):
        train.run(cfg)


def test_checkpoint_is_never_overwritten_by_non_finite_weights(tmp_path, tiny_cfg, monkeypatch):
    method = base.build_method(tiny_cfg)
    trainer = SimpleNamespace(global_step=5, lightning_module=method, is_global_zero=True, precision_plugin=None,
                              loggers=[])
    saved = []
    monkeypatch.setattr(checkpoints, "save_checkpoint_atomically", lambda tr, directory: saved.append(tr.global_step))
    saver = checkpoints.AtomicLastCheckpoint(tmp_path, guard=guard.NonFiniteGuard(1))
    saver.save(trainer)
    with torch.no_grad():
        next(method.teacher.parameters()).view(-1)[0] = math.inf
    with pytest.raises(NonFiniteError, match="non-finite weights at step 4"):
        saver.save(trainer)
    assert saved == [5]  # the finite save happened, the non-finite one did not


def test_every_knn_inside_training_gets_the_training_device(tiny_tree, monkeypatch):
    """Init, online and final k-NN are handed the device the weights are on (tests/test_gpu.py: on CUDA)."""
    calls = []
    real = train.run_knn

    def recording(cfg, backbone, suffix, cache, weights, device, **kwargs):
        calls.append((suffix, torch.device(device), next(backbone.parameters()).device))
        return real(cfg, backbone, suffix, cache, weights, device, **kwargs)

    monkeypatch.setattr(train, "run_knn", recording)
    cfg = config_lib.build_config(tiny_tree, {"optim": {"epochs": 2}, "trainer": {"max_steps": -1},
                                              "data": {"subset": 16}, "eval": {"knn_every_n_epochs": 1}})
    train.run(cfg)
    assert [c[0] for c in calls] == ["_init", "", ""]  # init, online after epoch 1, final
    assert all(device == weights for _, device, weights in calls)


def test_skip_limit_below_one_is_refused_before_any_run(tiny_tree):
    with pytest.raises(config_lib.ConfigError, match="train.fp16_max_consecutive_skips=0"):
        config_lib.build_config(tiny_tree, {"train": {"fp16_max_consecutive_skips": 0}})
