"""``ssl-bench bench compare`` (bench/side_by_side.py) and its reference loops (bench/reference_loops.py).

No timing is asserted. What is checked: how a config maps onto the reference loops, and the errors for what has
no counterpart. Also the skips with their reasons, the interleaving, and ratios against hand-computed medians.
The official loop runs for real where ``DINO_SRC`` names a facebookresearch/dino checkout, and lightly's where
lightly is installed; both are skipped otherwise.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics

import pytest
import torch
import yaml

from ssl_bench import cli
from ssl_bench import config as config_lib
from ssl_bench.bench import profiling
from ssl_bench.bench import reference_loops as refs
from ssl_bench.bench import side_by_side as sbs
from tests.conftest import TINY

DINO_SRC = os.environ.get("DINO_SRC")
HAS_LIGHTLY = importlib.util.find_spec("lightly") is not None


def test_reference_job_of_the_tiny_cpu_configs():
    vit = sbs.reference_job(config_lib.load_config("experiments/bench/tiny_cpu_vit.yaml"), steps=10, warmup=2)
    assert {k: vit[k] for k in ("arch", "patch_size", "depth", "embed_dim", "num_heads", "drop_path_rate")} == {
        "arch": "vit_tiny", "patch_size": 4, "depth": 12, "embed_dim": 192, "num_heads": 3, "drop_path_rate": 0.1}
    assert (vit["batch_size"], vit["global_size"], vit["local_size"], vit["local_number"]) == (32, 32, 16, 6)
    assert (vit["out_dim"], vit["hidden_dim"], vit["bottleneck_dim"], vit["head_nlayers"]) == (4096, 2048, 256, 3)
    assert (vit["teacher_temp"], vit["clip_grad"], vit["threads"], vit["optimizer"]) == (0.04, 3.0, 2, "adamw")
    assert (vit["steps"], vit["warmup"], vit["device"]) == (10, 2, "cpu")
    resnet = sbs.reference_job(config_lib.load_config("experiments/bench/tiny_cpu_resnet18.yaml"), 10, 2)
    assert resnet["arch"] == "resnet18" and resnet["drop_path_rate"] == 0.0 and "embed_dim" not in resnet
    tiny = sbs.reference_job(config_lib.build_config(TINY), 1, 0)  # kwargs set the ViT's width
    assert (tiny["embed_dim"], tiny["num_heads"], tiny["depth"]) == (32, 2, 1)


@pytest.mark.parametrize("override, key", [
    ({"method": {"name": "ibot"}}, "method.name"),
    ({"backbone": {"name": "vit_large_patch16_224"}}, "backbone.name"),
    ({"backbone": {"layerscale": 1e-5}}, "backbone.layerscale"),
    ({"backbone": {"kwargs": {"class_token": False}}}, "backbone.kwargs.class_token"),
    ({"backbone": {"name": "resnet18", "cifar_stem": True, "patch_size": None, "img_size": None, "depth": None}},
     "backbone.cifar_stem"),
])
def test_reference_job_names_what_has_no_counterpart(override, key):
    resnet = override.get("backbone", {}).get("name") == "resnet18"
    cfg = config_lib.build_config(override if resnet else config_lib.deep_merge(TINY, override))
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        sbs.reference_job(cfg, 1, 0)


def test_available_loops_skip_with_a_reason_and_refuse_a_wrong_checkout(tmp_path, monkeypatch):
    loops, skipped = sbs.available_loops(["ssl-bench", "official"], None)
    assert loops == ["ssl-bench"] and "DINO_SRC" in skipped["official"] and "--dino-src" in skipped["official"]
    (tmp_path / "main_dino.py").write_text("")
    with pytest.raises(config_lib.ConfigError, match="utils.py, vision_transformer.py"):
        sbs.available_loops(["official"], str(tmp_path))
    for name in refs.DINO_FILES:
        (tmp_path / name).write_text("")
    assert sbs.available_loops(["official"], str(tmp_path)) == (["official"], {})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lightly" else real(name, *a))
    assert sbs.available_loops(["ssl-bench", "lightly"], None) == (["ssl-bench"], {
        "lightly": "lightly is not installed (pip install lightly)"})
    with pytest.raises(config_lib.ConfigError, match="choose from ssl-bench, official, lightly"):
        sbs.available_loops(["ssl-bench", "offical"], None)


def test_compare_loops_interleave_and_ratios_are_to_the_official_median():
    cfgs = {p: config_lib.build_config(config_lib.deep_merge(TINY, {"trainer": {"precision": p}}))
            for p in ("32-true", "bf16-mixed")}
    entries = [sbs.Entry("a", cfgs, {"x": 1}), sbs.Entry("b", cfgs, {"x": 2})]
    rates = iter(range(10, 100))
    calls = []

    def fake_ssl(c, steps, warmup, synthetic, profile=False):
        calls.append(("ssl-bench", c.trainer.precision, steps, warmup, synthetic))
        return {"images_per_s": float(next(rates)), "step_s_median": 1.0, "peak_memory_mb": 100.0,
                **({"profile": {"self_cpu_ms_per_step": {"aten::mm": 5.0}, "total_self_cpu_ms_per_step": 9.0}}
                   if profile else {})}

    def fake_reference(job):
        calls.append((job["loop"], job["x"], job["dino_src"]))
        return {"images_per_s": float(next(rates)), "step_s_median": 2.0, "peak_memory_mb": 200.0,
                **({"profile": {"self_cpu_ms_per_step": {"aten::mm": 4.0, "aten::bmm": 1.5},
                                "total_self_cpu_ms_per_step": 8.0}} if job.get("profile") else {})}

    result = sbs.compare_loops(entries, ["ssl-bench", "official"], ["32-true", "bf16-mixed"], 5, 1, 3,
                               fake_ssl, fake_reference, "/dino")
    order = [(r["repeat"], r["config"], r["loop"], r["precision"]) for r in result["runs"]]
    assert order == [(i, c, loop, p) for i in range(3) for c in "ab"
                     for loop, p in (("ssl-bench", "32-true"), ("ssl-bench", "bf16-mixed"), ("official", "32-true"))]
    assert calls[:3] == [("ssl-bench", "32-true", 5, 1, True), ("ssl-bench", "bf16-mixed", 5, 1, True),
                         ("official", 1, "/dino")]
    # Config "a": runs 10, 11, 12 in repeat 0; 16, 17, 18 in repeat 1; 22, 23, 24 in repeat 2.
    rows = {(s["config"], s["loop"], s["precision"]): s for s in result["summary"]}
    bf16 = rows[("a", "ssl-bench", "bf16-mixed")]
    assert bf16["images_per_s_runs"] == [11.0, 17.0, 23.0]
    assert bf16["ratio_to_official"] == pytest.approx(17 / 18)
    assert bf16["ratio_to_official_runs"] == pytest.approx([11 / 12, 17 / 18, 23 / 24])
    assert bf16["peak_memory_to_official"] == pytest.approx(0.5)
    assert rows[("b", "official", "32-true")]["ratio_to_official"] == pytest.approx(1.0)
    table = sbs.format_table({**result, "skipped": {"lightly": "not installed"}})
    assert "| a | ssl-bench | bf16-mixed | 17.00 | 11.00, 17.00, 23.00 | 0.94 | 0.92-0.96 |" in table
    assert "skipped lightly: not installed" in table
    alone = sbs.compare_loops(entries[:1], ["ssl-bench"], ["32-true"], 5, 1, 1, fake_ssl, fake_reference)
    assert alone["summary"][0]["ratio_to_official"] is None and "profiles" not in alone
    profiled = sbs.compare_loops(entries[:1], ["ssl-bench", "official"], ["32-true"], 5, 1, 1, fake_ssl,
                                 fake_reference, profile=True)
    assert len(profiled["runs"]) == 2  # the profiled round is not among the timed runs
    assert set(profiled["profiles"]["a"]) == {"ssl-bench 32-true", "official"}
    table = sbs.format_table(profiled)
    assert "| `aten::bmm` | - | 1.5 |" in table and "| `aten::mm` | 5.0 | 4.0 |" in table
    assert table.index("aten::bmm") < table.index("aten::mm")  # the larger difference first
    assert "| all ops | 9.0 | 8.0 |" in table


def test_real_data_runs_are_ssl_bench_on_its_own_pipeline_beside_the_references():
    cfg = config_lib.build_config(TINY)
    seen = []

    def fake_ssl(c, steps, warmup, synthetic, profile=False):
        seen.append(synthetic)
        return {"images_per_s": 30.0 if synthetic else 15.0, "step_s_median": 1.0, "peak_memory_mb": 1.0}

    def fake_reference(job):
        return {"images_per_s": 10.0, "step_s_median": 1.0, "peak_memory_mb": 1.0}

    result = sbs.compare_loops([sbs.Entry("a", {"32-true": cfg}, {})], ["ssl-bench", "official"], ["32-true"], 1, 0,
                               2, fake_ssl, fake_reference, real_data=True)
    assert seen == [True, False, True, False]
    rows = {s["loop"]: s for s in result["summary"]}
    assert rows[sbs.REAL_DATA]["ratio_to_official"] == pytest.approx(1.5)
    assert rows["ssl-bench"]["ratio_to_official"] == pytest.approx(3.0)


def test_ops_per_step_counts_the_calls_of_each_step():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    prof = profiling.step_profiler(warmup=2, steps=3)
    with prof:
        for _ in range(5):
            (a @ b).relu_()
            torch.mm(a, b)
            prof.step()
    ops = profiling.ops_per_step(prof, steps=3)
    assert ops["calls_per_step"]["aten::mm"] == 2.0 and ops["calls_per_step"]["aten::relu_"] == 1.0
    assert ops["total_self_cpu_ms_per_step"] == pytest.approx(sum(ops["self_cpu_ms_per_step"].values()), abs=0.01)


def test_timed_batches_mark_every_request_and_the_end():
    batches = refs.TimedBatches(["x", "y"], 5)
    assert len(batches) == 5 and list(batches) == ["x", "y", "x", "y", "x"]
    assert len(batches.marks) == 6 and batches.marks == sorted(batches.marks)


def test_clip_per_parameter_by_hand():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.5])  # norms 5 and 0.5
    refs.clip_per_parameter(torch.nn.ParameterList([a, b]), 2.5)
    assert a.grad.tolist() == pytest.approx([1.5, 2.0], rel=1e-5) and b.grad.tolist() == [0.5]


def tiny_job(loop: str, arch: str = "vit_tiny") -> dict:
    job = sbs.reference_job(config_lib.build_config(config_lib.deep_merge(TINY, {"backbone": {"depth": 2}})), 2, 1)
    if arch != "vit_tiny":
        job["arch"] = arch
    return {**job, "loop": loop, "dino_src": DINO_SRC}


@pytest.mark.skipif(not DINO_SRC, reason="set DINO_SRC to a facebookresearch/dino checkout")
@pytest.mark.parametrize("arch", ["vit_tiny", "resnet18"])
def test_official_loop_runs_train_one_epoch(arch):
    figures = refs.run_isolated(tiny_job("official", arch))
    assert figures["loop"] == "official" and figures["steps_timed"] == 2 and figures["warmup_steps"] == 1
    assert figures["images_per_s"] > 0 and figures["step_s_min"] <= figures["step_s_median"] <= figures["step_s_max"]
    assert math.isfinite(figures["loss_mean"]) and figures["loss_mean"] > 0
    sha = figures["dino_src"]["sha"]
    assert sha is None or len(sha) == 40


@pytest.mark.skipif(not HAS_LIGHTLY, reason="lightly is not installed")
def test_lightly_loop_runs():
    figures = refs.run_isolated(tiny_job("lightly"))
    assert figures["steps_timed"] == 2 and figures["images_per_s"] > 0 and figures["lightly"]
    assert math.isfinite(figures["loss_mean"])


def test_bench_compare_command_skips_absent_references_and_writes_one_record(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DINO_SRC", raising=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["bench", "compare", str(config), "--loops", "ssl-bench,official", "--steps", "1", "--warmup", "0",
            "--repeats", "1", "--out-dir", str(tmp_path / "bench"), "--set", "speed.fused_optimizer=false"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "skipping official: no DINO checkout" in out and "| tiny | ssl-bench | 32-true |" in out
    (written,) = (tmp_path / "bench").glob("compare-tiny-*.json")
    record = json.loads(written.read_text())
    assert record["loops"] == ["ssl-bench"] and "official" in record["skipped"]
    assert [r["loop"] for r in record["runs"]] == ["ssl-bench"] and record["runs"][0]["speed"]["fused_optimizer"] is False
    assert record["configs"]["tiny"]["speed"]["fused_optimizer"] is False
    assert statistics.median(record["summary"][0]["images_per_s_runs"]) == record["summary"][0]["images_per_s"]


@pytest.mark.parametrize("extra, message", [
    (["--precisions", "bf17"], "--precisions: 'bf17'"),
    (["--loops", "official", "--dino-src", "/nonexistent"], "not a facebookresearch/dino checkout"),
    (["--set", "method.name=ibot"], "method.name='ibot'"),
])
def test_bench_compare_errors_before_any_run(tmp_path, capsys, extra, message):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert cli.main(["bench", "compare", str(config), "--no-json", *extra]) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "[bench compare] repeat" not in captured.out
