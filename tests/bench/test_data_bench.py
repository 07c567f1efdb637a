"""The data-pipeline benchmark: counts, shapes and table layout on the synthetic dataset (no timings checked)."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from ssl_bench import config as config_lib
from ssl_bench.bench.data import bench_data, format_table, quantile

# tiny-cpu crop layout (experiments/bench/tiny_cpu_vit.yaml) on the generated 32-px images.
DATA = {"name": "synthetic", "batch_size": 8, "subset": 64, "num_workers": 2, "global_crop_size": 32,
        "local_crop_size": 16, "local_crops_number": 6, "eval_resize": 32, "eval_crop_size": 32}


@pytest.fixture
def cfg() -> config_lib.Config:
    return config_lib.build_config({"data": DATA, "trainer": {"num_threads": 1}})


@pytest.fixture(scope="module")
def result() -> dict:
    cfg = config_lib.build_config({"data": DATA, "trainer": {"num_threads": 1}})
    return bench_data(cfg, workers=[0, 1], batches=2, warmup=1)


def test_one_row_per_worker_count(result):
    assert [r["workers"] for r in result["rows"]] == [0, 1]


def test_images_counted_per_timed_batch(result):
    for row in result["rows"]:
        assert row["batches_timed"] == 2
        assert row["images_timed"] == 16  # 2 batches x 8 source images
        assert row["images_per_s"] == pytest.approx(16 / row["timed_s"])
        assert row["batch_s_p10"] <= row["batch_s_median"] <= row["batch_s_p90"]


def test_per_worker_rate(result):
    w0, w1 = result["rows"]
    assert w0["images_per_s_per_worker"] == w0["images_per_s"]  # main process is the one worker
    assert w1["images_per_s_per_worker"] == w1["images_per_s"]  # 1 worker


def test_crops_and_pixels_per_image(result):
    for row in result["rows"]:
        assert row["crops_per_image"] == 2 + 6
        assert row["crop_sizes"] == [[32, 32]] * 2 + [[16, 16]] * 6
        assert row["pixels_per_image"] == 2 * 32 * 32 + 6 * 16 * 16 == 3584
        assert row["values_per_image"] == 3 * 3584
        assert row["masked"] is False


def test_loader_as_training_builds_it(result):
    w0, w1 = result["rows"]
    assert (w0["persistent_workers"], w1["persistent_workers"]) == (False, True)
    assert w0["pin_memory"] == torch.cuda.is_available()
    assert w0["dataset_size"] == 64 and w0["batches_per_epoch"] == 8


def test_summary_and_json(result):
    c = result["config"]
    assert (c["dataset"], c["subset"], c["batch_size"]) == ("synthetic", 64, 8)
    assert (c["global_crop_size"], c["local_crop_size"], c["local_crops_number"]) == (32, 16, 6)
    assert result["torch"] == torch.__version__ and result["cpu_count"] >= 1
    assert json.loads(json.dumps(result)) == result


def test_threads_applied_then_restored(cfg):
    torch.set_num_threads(2)
    out = bench_data(cfg, workers=[0], batches=1, warmup=1)
    assert out["threads"] == 1  # trainer.num_threads, as training applies it
    assert torch.get_num_threads() == 2


def test_table_one_line_per_worker_count(result):
    lines = format_table(result).splitlines()
    assert len(lines) == 2 + 2  # header, separator, workers 0 and 1
    assert lines[2].startswith("| 0 |") and lines[3].startswith("| 1 |")
    assert all(line.count("|") == lines[0].count("|") for line in lines)


def test_masks_and_local_crops_pass_through(cfg):
    # A masked method without multi-crop: 2 global crops, (32 / 4)^2 patch grid.
    out = bench_data(cfg, workers=[0], batches=1, warmup=0, mask_grid=(8, 8), local_crops_number=0)
    row = out["rows"][0]
    assert row["crops_per_image"] == 2 and row["pixels_per_image"] == 2 * 32 * 32
    assert row["masked"] is True and out["config"]["mask_grid"] == [8, 8]
    assert row["images_timed"] == 8


def test_runs_on_past_the_epoch_end(cfg):
    small = config_lib.build_config({"data": {**DATA, "subset": 16}, "trainer": {"num_threads": 1}})
    row = bench_data(small, workers=[0], batches=3, warmup=1)["rows"][0]  # 2 batches per epoch, 4 taken
    assert row["batches_per_epoch"] == 2 and row["epochs_started"] == 2
    assert row["images_timed"] == 24


def test_workers_shut_down_after_measuring(result):
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("workers", [[-1], [0, -2], []])
def test_bad_worker_count(cfg, workers):
    with pytest.raises(ValueError, match="workers"):
        bench_data(cfg, workers=workers, batches=2, warmup=1)


def test_bad_batches(cfg):
    with pytest.raises(ValueError, match="batches"):
        bench_data(cfg, workers=[0], batches=0, warmup=1)


def test_quantile_matches_numpy_linear():
    values = [4.0, 1.0, 3.0, 2.0, 10.0]
    assert quantile(values, 0.1) == pytest.approx(1.4)  # sorted [1,2,3,4,10]: 1 + 0.4 * (2 - 1)
    assert quantile(values, 0.9) == pytest.approx(7.6)  # 4 + 0.6 * (10 - 4)
    assert quantile([5.0], 0.9) == 5.0
