"""Every registered method trains 2 CPU steps on synthetic images and writes a complete run directory."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import yaml

from ssl_bench import config as config_lib
from ssl_bench.data.batch import Batch
from ssl_bench.run import train
from ssl_bench.methods import METHODS, build_method
from ssl_bench.methods.base import clip_per_parameter, ema_update, param_groups


@pytest.mark.parametrize("name", METHODS.names())
def test_method_trains_two_steps_and_writes_run_dir(name, tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": name}})
    result = train.run(cfg)
    d = result.run_dir
    assert result.status == "completed" and d.name == config_lib.run_id(cfg)
    assert yaml.safe_load((d / "config.yaml").read_text())["method"]["name"] == name
    assert config_lib.run_id(config_lib.from_dict(yaml.safe_load((d / "config.yaml").read_text()))) == d.name
    env = json.loads((d / "env.json").read_text())
    assert {"git", "versions", "hardware", "seed", "world_size"} <= set(env) and env["seed"] == cfg.seed
    levers = env["speed_levers"]  # the levers as applied, with source and reason
    assert set(levers) == {"small_map_conv", "channels_last", "fused_attention", "autocast_convs", "physical_cores",
                           "compile"}
    assert levers["compile"] == {"value": False, "source": "config", "reason": "speed.compile=false"}
    assert levers["channels_last"] == {"value": False, "source": "rules",
                                       "reason": "speed.auto=rules (on for convolutional backbones)"}
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if "train/loss" in x]
    assert [x["step"] for x in train_lines] == [0, 1]
    assert {"train/loss", "train/lr", "train/wd", "train/momentum", "train/teacher_temp"} <= set(train_lines[0])
    diagnostics = [x for x in lines if "collapse/teacher_entropy" in x]
    assert [x["step"] for x in diagnostics] == [0, 1]  # tiny config: every step
    log_k = math.log(cfg.method.out_dim)
    assert all(0 <= x["collapse/teacher_entropy"] <= log_k + 1e-4 and x["collapse/kl_teacher_student"] >= -1e-5
               and 1 <= x["collapse/rankme"] <= 16 and x["collapse/feature_std"] > 0 for x in diagnostics)
    assert (d / "checkpoints" / "last.ckpt").stat().st_size > 0
    res = json.loads((d / "result.json").read_text())
    assert res["status"] == "completed" and res["method"] == name and res["study"] == cfg.study
    assert 0 <= res["metrics"]["knn_top1"] <= 100 and 0 <= res["metrics"]["knn_top1_init"] <= 100
    for key in ("wall_s", "train_images_per_s", "peak_rss_mb"):
        assert res["timing"][key] > 0
    assert res["protocol"]["knn"]["k"] == 20
    assert res["collapse"]["collapsed"] in (True, False) and res["collapse"]["log_k"] == pytest.approx(log_k, abs=1e-4)
    assert res["metrics"]["teacher_entropy_last"] == pytest.approx(diagnostics[-1]["collapse/teacher_entropy"], abs=1e-4)


def _step(method, crops):
    """Run the method's training step outside a Trainer (optimizer wired by hand, as Lightning's
    fp32 ``optimizer_step``: ``on_before_optimizer_step`` between backward and the update)."""
    opt = method.configure_optimizers()
    method.trainer = SimpleNamespace(precision_plugin=None, global_step=0)  # fp32: no GradScaler
    method.optimizers = lambda: _Opt(opt, method)
    method.manual_backward = lambda loss: loss.backward()
    for name in ("log", "log_dict"):
        if name not in vars(method):  # a test may capture logs itself
            setattr(method, name, lambda *a, **k: None)
    method.total_steps, method.steps_per_epoch = 10, 5
    method.total_batch_size = lambda: 4
    return method.training_step(Batch(crops, torch.zeros(4)), 0)


class _Opt:
    def __init__(self, opt, method):
        self.optimizer, self.method = opt, method

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        self.method.on_before_optimizer_step(self.optimizer)
        self.optimizer.step()


def _crops(cfg):
    g = torch.Generator().manual_seed(0)
    big = [torch.randn(4, 3, 16, 16, generator=g) for _ in range(2)]
    small = [torch.randn(4, 3, 8, 8, generator=g) for _ in range(cfg.data.local_crops_number)]
    return big + small


@pytest.mark.parametrize("name,center_moves", [("dino", True), ("dino_no_centering", False)])
def test_centering_ablation(name, center_moves, tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": name}})
    method = build_method(cfg)
    _step(method, _crops(cfg))
    assert (method.centering.center.abs().sum().item() > 0) == center_moves


def test_no_sharpening_uses_student_temperature(tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"name": "dino_no_sharpening", "teacher_temp": 0.04}})
    method = build_method(cfg)
    assert method.teacher_temp_at(0) == 0.1 == cfg.method.student_temp
    assert build_method(config_lib.build_config(tiny_tree)).teacher_temp_at(0) == 0.04


def test_teacher_is_ema_of_student_and_last_layer_frozen_first(tiny_tree):
    cfg = config_lib.build_config(tiny_tree, {"method": {"freeze_last_layer_epochs": 1}})
    method = build_method(cfg)
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    last_before = method.student.head.last_layer.direction.clone()
    _step(method, _crops(cfg))  # step 0 < 5 steps of the frozen epoch
    assert torch.equal(method.student.head.last_layer.direction, last_before)
    m = method.momentum_at(0)
    for t_old, t_new, s in zip(teacher_before, method.teacher.parameters(), method.student.parameters()):
        assert torch.allclose(t_new, m * t_old + (1 - m) * s.detach(), atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(teacher_before, method.teacher.parameters()))


def test_param_groups_exclude_biases_and_norms_from_decay():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(net)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_clip_per_parameter_clips_each_independently():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    clip_per_parameter([a, b], 1.0)
    assert a.grad.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert b.grad.tolist() == pytest.approx([0.3, 0.4])


def test_ema_update_formula():
    t, s = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    old = [p.clone() for p in t.parameters()]
    ema_update(t, s, 0.9)
    for o, n, sp in zip(old, t.parameters(), s.parameters()):
        assert torch.allclose(n, 0.9 * o + 0.1 * sp)
