"""``ssl-bench bench train|knn`` and ``grid plan --estimate`` on tiny configs: figures and JSON records.

No timing is asserted; the figures that can be checked by hand are (FLOPs per image, image counts,
the estimate's arithmetic).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from ssl_bench import cli
from ssl_bench import config as config_lib
from ssl_bench.bench.estimate import cost_key, duration, estimate, train_images
from ssl_bench.bench.train import bench_train, model_flops_per_image

D, HEADS, DEPTH, PATCH = 32, 2, 2, 4
HIDDEN, BOTTLENECK, K = 48, 16, 64
TREE = {"data": {"name": "synthetic", "batch_size": 4, "num_workers": 0, "global_crop_size": 16,
                 "local_crop_size": 8, "local_crops_number": 2},
        "backbone": {"name": "vit_tiny_patch16_224", "patch_size": PATCH, "img_size": 16, "depth": DEPTH,
                     "kwargs": {"embed_dim": D, "num_heads": HEADS}},
        "method": {"out_dim": K, "head_hidden_dim": HIDDEN, "head_bottleneck_dim": BOTTLENECK},
        "optim": {"epochs": 1}}


def vit_forward_flops(size: int) -> int:
    """Matmul FLOPs (2 per multiply-add) of one image through the ViT and the DINO head, by hand."""
    patches = (size // PATCH) ** 2
    n = patches + 1  # + CLS
    embed = 2 * patches * (3 * PATCH * PATCH) * D
    per_block = n * 2 * (D * 3 * D + D * D + 2 * D * 4 * D) + 2 * 2 * n * n * D  # linears + QK^T and AV
    head = 2 * (D * HIDDEN + HIDDEN * HIDDEN + HIDDEN * BOTTLENECK + BOTTLENECK * K)
    return embed + DEPTH * per_block + head


def test_flops_per_image_match_a_hand_count():
    """Teacher forward on 2 globals + student forward and backward (2x, but the patch embedding
    computes no input gradient: 1x) on all crops."""
    cfg = config_lib.build_config(TREE)
    g, loc = vit_forward_flops(16), vit_forward_flops(8)
    embed_g, embed_l = 2 * 16 * 48 * D, 2 * 4 * 48 * D
    student_fwd = 2 * g + 2 * loc
    student_bwd = 2 * student_fwd - (2 * embed_g + 2 * embed_l)
    assert model_flops_per_image(cfg, local_crops=2) == 2 * g + student_fwd + student_bwd


def test_bench_train_figures(tmp_path):
    cfg = config_lib.build_config(TREE)
    figures = bench_train(cfg, steps=2, warmup=1, synthetic=True)
    assert figures["steps_timed"] == 2 and figures["warmup_steps"] == 1
    assert figures["images_per_s"] > 0 and figures["step_s_min"] <= figures["step_s_median"] <= figures["step_s_max"]
    assert figures["peak_memory_mb"] > 0 and figures["memory_kind"] == "peak_rss"
    assert figures["mfu"] is None  # no peak FLOP/s for a CPU
    assert figures["achieved_tflops"] == pytest.approx(figures["flops_per_image"] * figures["images_per_s"] / 1e12)


def test_bench_train_command_writes_json(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TREE))
    code = cli.main(["bench", "train", str(config), "--synthetic", "--steps", "2", "--warmup", "1",
                     "--out-dir", str(tmp_path / "bench"), "speed.fused_optimizer=false"])
    assert code == 0
    written = list((tmp_path / "bench").glob("train-tiny-synthetic-*.json"))
    assert len(written) == 1
    record = json.loads(written[0].read_text())
    assert record["benchmark"] == "train" and record["summary"]["runs"] == 1
    assert record["config"]["speed"]["fused_optimizer"] is False
    assert record["runs"][0]["speed"]["fused_optimizer"] is False
    assert record["git"]["sha"] and "torch" in record["versions"]
    assert "| 1 |" in capsys.readouterr().out
    # A second run never overwrites the first record.
    assert cli.main(["bench", "train", str(config), "--synthetic", "--steps", "1", "--warmup", "0",
                     "--out-dir", str(tmp_path / "bench"), "--in-process"]) == 0
    assert len(list((tmp_path / "bench").glob("train-tiny-synthetic-*.json"))) == 2


def test_bench_train_bad_key_is_an_error(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TREE))
    assert cli.main(["bench", "train", str(config), "speed.compiled=true", "--no-json"]) == 2
    assert "speed.compile" in capsys.readouterr().err


def test_bench_knn_command_writes_json(tmp_path):
    out = tmp_path / "knn.json"
    assert cli.main(["bench", "knn", "--bank", "2000", "--dim", "16", "--test", "200", "--k", "20", "--classes", "10",
                     "--repeats", "1", "--configs", "full,chunked", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["full", "chunked"]
    assert rows[0]["top1"] == pytest.approx(rows[1]["top1"])  # same search, two implementations


def test_estimate_arithmetic():
    """Two runs share a probe when only the lr differs; hours = steps x probed step time x devices."""
    class Spec:
        def __init__(self, overrides: dict, run_id: str) -> None:
            self.config = config_lib.build_config(config_lib.deep_merge(TREE, overrides))
            self.run_id = run_id

    runs = [Spec({"optim": {"lr": 1e-3}, "data": {"subset": 100}}, "a"),
            Spec({"optim": {"lr": 2e-3}, "data": {"subset": 100}}, "b"),
            Spec({"data": {"batch_size": 8, "subset": 100}, "trainer": {"devices": 2}, "optim": {"epochs": 3}}, "c")]
    assert cost_key(runs[0].config) == cost_key(runs[1].config) != cost_key(runs[2].config)
    probed = []

    def probe(cfg, steps, warmup, synthetic):
        probed.append(cfg.data.batch_size)
        return {"images_per_s": 10.0, "step_s_median": 0.5 * cfg.data.batch_size / 4, "peak_memory_mb": 1.0}

    result = estimate(runs, probe=probe, sizes=lambda cfg: 512)
    assert probed == [4, 8]
    a, b, c = result["runs"]
    assert (a["steps"], a["images"]) == (25, 100)  # 100 images / batch 4, 1 epoch
    assert a["train_hours"] == pytest.approx(25 * 0.5 / 3600)
    # c: 100 images over 2 ranks -> 50 per rank -> 6 batches of 8 per epoch, 3 epochs, step 1.0 s, 2 devices
    assert (c["steps"], c["images"]) == (18, 18 * 8 * 2)
    assert c["device_hours"] == pytest.approx(18 * 1.0 / 3600 * 2)
    assert result["total_device_hours"] == pytest.approx(2 * 25 * 0.5 / 3600 + 36 / 3600)


def test_duration_format():
    assert [duration(h) for h in (1.5 / 3600, 750 / 3600, 2 + 5 / 60)] == ["1.5 s", "12 min 30 s", "2 h 05 min"]


def test_train_images_respects_max_steps():
    cfg = config_lib.build_config(config_lib.deep_merge(TREE, {"trainer": {"max_steps": 7}}))
    assert train_images(cfg, 1000) == (7, 28)


def test_grid_plan_estimate_on_the_command_line(tmp_path, tiny_tree, capsys):
    """Two methods x two lrs: the lr axis shares a probe, the methods do not; real probes of 1 step."""
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(tiny_tree))
    study = tmp_path / "st.yaml"
    study.write_text(yaml.safe_dump({"base": "base.yaml", "seeds": [0],
                                     "grid": {"method.name": ["dino", "dino_no_multicrop"], "optim.lr": [1e-4, 2e-4]}}))
    assert cli.main(["grid", "plan", str(study), "--estimate", "--probe-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("estimate: probing setting") == 2
    assert "Whole grid:" in out and "cpu-hours" in out
    # tiny_tree: synthetic train split of 512 images, subset 32, batch 8, 1 epoch, max_steps 2 -> 2 steps per run
    assert len(re.findall(r"\|\s+2 \|\s+16 \|", out)) == 4, out  # steps and images of each run
    assert cli.main(["grid", "plan", str(study), "--estimate", "--probe-steps", "0"]) == 2
