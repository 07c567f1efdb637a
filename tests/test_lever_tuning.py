"""``speed.auto``: levers left null are chosen by fixed rules or, with ``measure``, timed on this machine and cached.

A fake timer makes the measured choice checkable (which combination wins, the margin, the cache, the key). One test
times the real student. Whatever is chosen never changes what is computed: ``tests/test_speed.py`` compares
every lever, ``fused_attention=false`` included, against a plain step.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from ssl_bench import config as config_lib
from ssl_bench.backbones.small_map_conv import SmallMapConv2d
from ssl_bench.methods import build_method
from ssl_bench.run import lever_tuning, speed
from tests.conftest import TINY

RESNET = {"backbone": {"name": "resnet18", "patch_size": None, "img_size": None, "depth": None,
                       "drop_path_rate": 0.0, "kwargs": {"zero_init_last": False}}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path / "cache"))


def cfg_of(*overrides: dict) -> config_lib.Config:
    tree = TINY
    for o in overrides:
        tree = config_lib.deep_merge(tree, o)
    if o_resnet(overrides):  # the ViT's width kwargs do not apply
        tree = {**tree, "backbone": RESNET["backbone"]}
    return config_lib.build_config(tree)


def o_resnet(overrides: tuple[dict, ...]) -> bool:
    return any(o is RESNET for o in overrides)


def fake_timer(seconds: dict[tuple[bool, ...], float], calls: list):
    def timer(net, combo, cfg, device):
        calls.append(tuple(combo.values()))
        return seconds[tuple(combo.values())]
    return timer


def attention_flags(net) -> set[bool]:
    return {m.fused_attn for m in net.backbone.modules() if hasattr(m, "fused_attn")}


def test_rules_by_default_with_their_reasons():
    cfg = cfg_of(RESNET)
    method = build_method(cfg)
    choices = speed.apply(method, cfg)
    sdpa = speed.rules(is_vit=True, cuda=False)["fused_attention"]  # timm's default: True unless TIMM_FUSED_ATTN=0
    assert {k: (c["value"], c["source"]) for k, c in choices.items()} == {
        "small_map_conv": (True, "rules"), "channels_last": (True, "rules"),
        "fused_attention": (None, "not applicable"), "autocast_convs": (None, "not applicable"),
        "physical_cores": (choices["physical_cores"]["value"], choices["physical_cores"]["source"]),
        "compile": (False, "config")}
    assert "runs no autocast" in choices["autocast_convs"]["reason"]
    bf16 = cfg_of(RESNET, {"trainer": {"precision": "bf16-mixed"}})
    assert speed.apply(build_method(bf16), bf16)["autocast_convs"]["value"] is True  # autocast as it is
    assert speed.measurable(is_vit=False, cuda=False, mixed=True) == ("small_map_conv", "channels_last",
                                                                     "autocast_convs")
    assert "autocast_convs" not in speed.measurable(is_vit=False, cuda=True, mixed=True)
    assert method.speed_levers is choices and "speed.auto=rules" in choices["channels_last"]["reason"]
    vit_cfg = cfg_of({"speed": {"fused_attention": False}})
    vit = build_method(vit_cfg)
    choices = speed.apply(vit, vit_cfg)
    assert choices["fused_attention"] == {"value": False, "source": "config", "reason": "speed.fused_attention=false"}
    assert choices["channels_last"]["value"] is False
    rules_vit = speed.apply(build_method(cfg_of()), cfg_of())["fused_attention"]
    assert (rules_vit["value"], rules_vit["source"]) == (sdpa, "rules")
    assert attention_flags(vit.student) == attention_flags(vit.teacher) == {False}


def test_measure_picks_the_fastest_combination_and_caches_it(monkeypatch):
    cfg = cfg_of(RESNET, {"speed": {"auto": "measure"}})
    calls: list = []
    # (small_map_conv, channels_last): the rules' (on, on) is slowest; (on, off) wins by 20%.
    seconds = {(False, False): 1.0, (False, True): 0.95, (True, False): 0.8, (True, True): 1.0}
    timer = fake_timer(seconds, calls)
    monkeypatch.setattr(lever_tuning, "time_student", timer)
    method = build_method(cfg)
    choices = speed.apply(method, cfg)
    assert len(calls) == 4 * lever_tuning.ROUNDS
    assert calls[:4] == [(False, False), (False, True), (True, False), (True, True)]  # interleaved rounds
    assert (choices["small_map_conv"]["value"], choices["channels_last"]["value"]) == (True, False)
    assert choices["channels_last"]["source"] == "measured" and "20% faster" in choices["channels_last"]["reason"]
    assert not method.student.backbone.channels_last
    assert any(isinstance(m, SmallMapConv2d) for m in method.student.modules())
    assert choices["fused_attention"]["source"] == "not applicable"  # not a ResNet lever
    (cached,) = (lever_tuning.cache_file(lever_tuning.cache_key(cfg, torch.device("cpu"),
                                                                ["small_map_conv", "channels_last"])),)
    assert json.loads(cached.read_text())["values"] == {"small_map_conv": True, "channels_last": False}
    # The next run on this machine and shape reads the cache and times nothing.
    again = speed.apply(build_method(cfg), cfg)
    assert len(calls) == 4 * lever_tuning.ROUNDS and again["channels_last"]["source"] == "cache"
    assert again["channels_last"]["value"] is False
    # Another batch size is another shape: measured again.
    speed.apply(build_method(cfg_of(RESNET, {"speed": {"auto": "measure"}, "data": {"batch_size": 4}})),
                cfg_of(RESNET, {"speed": {"auto": "measure"}, "data": {"batch_size": 4}}))
    assert len(calls) == 8 * lever_tuning.ROUNDS


def test_measure_keeps_the_rules_within_the_margin(monkeypatch):
    cfg = cfg_of({"speed": {"auto": "measure"}})  # the tiny ViT: fused_attention only
    calls: list = []
    rule = speed.rules(is_vit=True, cuda=False)["fused_attention"]
    monkeypatch.setattr(lever_tuning, "time_student", fake_timer({(not rule,): 0.99, (rule,): 1.0}, calls))
    method = build_method(cfg)
    choices = speed.apply(method, cfg)
    assert calls == [(False,), (True,)] * lever_tuning.ROUNDS
    assert choices["fused_attention"]["value"] is rule and "nothing beats the rules'" in choices["fused_attention"]["reason"]
    assert attention_flags(method.student) == {rule}


def test_explicit_values_are_not_measured_and_ddp_does_not_measure(monkeypatch):
    calls: list = []
    monkeypatch.setattr(lever_tuning, "time_student", fake_timer({}, calls))
    cfg = cfg_of({"speed": {"auto": "measure", "fused_attention": True}})
    assert speed.apply(build_method(cfg), cfg)["fused_attention"]["source"] == "config" and not calls
    ddp = cfg_of({"speed": {"auto": "measure"}, "trainer": {"devices": 2}})
    choice = speed.apply(build_method(ddp), ddp)["fused_attention"]
    assert not calls and choice["source"] == "rules" and "not measured under DDP" in choice["reason"]


def test_an_unreadable_cache_is_measured_again(monkeypatch, capsys):
    cfg = cfg_of({"speed": {"auto": "measure"}})
    key = lever_tuning.cache_key(cfg, torch.device("cpu"), ["fused_attention"])
    path = lever_tuning.cache_file(key)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    calls: list = []
    monkeypatch.setattr(lever_tuning, "time_student", fake_timer({(False,): 0.5, (True,): 1.0}, calls))
    choice = speed.apply(build_method(cfg), cfg)["fused_attention"]
    assert choice["value"] is False and choice["source"] == "measured" and calls
    assert "ignoring unreadable cache" in capsys.readouterr().out
    assert json.loads(path.read_text())["values"] == {"fused_attention": False}


def test_the_cache_key_names_the_hardware_torch_and_shape():
    key = lever_tuning.cache_key(cfg_of(), torch.device("cpu"), ["fused_attention"])
    assert key["torch"] == torch.__version__ and "cpu_model" in key["hardware"] and key["threads"] >= 1
    assert key["crops"] == {"batch_size": 8, "global": 16, "local": 8, "local_number": 2}
    other = lever_tuning.cache_key(cfg_of({"trainer": {"precision": "bf16-mixed"}}), torch.device("cpu"),
                                   ["fused_attention"])
    assert lever_tuning.cache_file(key) != lever_tuning.cache_file(other)


def test_real_timing_of_the_student():
    cfg = cfg_of({"speed": {"auto": "measure"}})
    method = build_method(cfg)
    choice = speed.apply(method, cfg)["fused_attention"]
    assert choice["source"] == "measured" and "s/step" not in choice["reason"] and " s" in choice["reason"]
    entry = json.loads(lever_tuning.cache_file(lever_tuning.cache_key(cfg, torch.device("cpu"),
                                                                      ["fused_attention"])).read_text())
    assert len(entry["times_s"]) == 2 and all(t > 0 for t in entry["times_s"])
    assert attention_flags(method.student) == {choice["value"]}


def test_physical_cores_is_measured_only_with_more_threads_than_cores(monkeypatch):
    """On an SMT CPU with trainer.num_threads null, one thread per core is timed against torch's default."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(lever_tuning, "cpu_topology", lambda: (4, 2))
    calls: list = []
    seen: list = []

    def timer(net, combo, cfg, device):
        calls.append(tuple(combo.values()))
        seen.append(torch.get_num_threads())
        return 0.5 if combo.get("physical_cores") else 1.0
    monkeypatch.setattr(lever_tuning, "time_student", timer)
    cfg = cfg_of({"speed": {"auto": "measure", "fused_attention": True}})
    try:
        choice = speed.apply(build_method(cfg), cfg)["physical_cores"]
        assert choice["value"] is True and choice["source"] == "measured" and len(calls) == 2 * lever_tuning.ROUNDS
        assert torch.get_num_threads() == 2  # the chosen count is set for the run
    finally:
        torch.set_num_threads(threads)
    pinned = cfg_of({"speed": {"auto": "measure", "fused_attention": True}, "trainer": {"num_threads": 1}})
    choice = speed.apply(build_method(pinned), pinned)["physical_cores"]
    assert choice["source"] == "not applicable" and "trainer.num_threads=1" in choice["reason"]
    monkeypatch.setattr(lever_tuning, "cpu_topology", lambda: (2, 2))
    plain = cfg_of({"speed": {"fused_attention": True}})
    assert "one thread per core" in speed.apply(build_method(plain), plain)["physical_cores"]["reason"]


def test_the_real_timer_sets_one_thread_per_core_and_restores_the_count(monkeypatch):
    monkeypatch.setattr(lever_tuning, "cpu_topology", lambda: (2, 1))
    seen = []
    monkeypatch.setattr(lever_tuning, "_time_steps", lambda net, cfg, device: seen.append(torch.get_num_threads()) or 0.1)
    before = torch.get_num_threads()
    lever_tuning.time_student(None, {"physical_cores": True}, cfg_of(), torch.device("cpu"))
    lever_tuning.time_student(None, {"physical_cores": False}, cfg_of(), torch.device("cpu"))
    assert seen == [1, before] and torch.get_num_threads() == before


def test_compile_left_null_is_timed_on_top_of_the_other_levers(monkeypatch):
    calls: list = []
    compiled: list = []

    def timer(net, combo, cfg, device):
        calls.append(dict(combo))
        compiled.append(speed.is_compiled(SimpleNamespace(student=net)))
        return 0.6 if combo.get("compile") else 1.0
    monkeypatch.setattr(lever_tuning, "time_student", timer)
    cfg = cfg_of({"speed": {"auto": "measure", "fused_attention": False, "compile": None}})
    method = build_method(cfg)
    choice = speed.apply(method, cfg)["compile"]
    assert choice["value"] is True and choice["source"] == "measured" and "with the compilation" in choice["reason"]
    assert [c["compile"] for c in calls] == [False, True] * lever_tuning.ROUNDS
    assert all(c["fused_attention"] is False for c in calls)  # the config's attention choice applies to both
    assert compiled == [False, True] * lever_tuning.ROUNDS and speed.is_compiled(method)
    rules = cfg_of({"speed": {"compile": None}})
    assert speed.apply(build_method(rules), rules)["compile"] == {
        "value": False, "source": "rules", "reason": "speed.auto=rules (eager; compilation takes minutes)"}
