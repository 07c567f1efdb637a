"""train.stop_on_collapse: the compute a stopped run did not spend, priced by hand, and how tables show it."""

import json

import pytest

from ssl_bench.report.collect import collect
from ssl_bench.report.table import TableSpec, render
from ssl_bench.run.callbacks import compute_saved


def test_remaining_steps_are_priced_at_the_attempts_own_pace():
    # resumed at step 10, ran 20 steps in 40 s (2 s/step), stopped at 30 of 100 planned, on 2 devices:
    # 70 steps x 2 s x 2 devices = 280 device-seconds = 0.0777... device-hours
    assert compute_saved(100, 20, 30, 40.0, 2, stopped=True) == {"planned_steps": 100,
                                                                "device_hours_saved": pytest.approx(280 / 3600, abs=1e-6)}
    assert compute_saved(100, 20, 30, 40.0, 2, stopped=False) == {"planned_steps": 100}  # not stopped: nothing saved
    assert compute_saved(30, 20, 30, 40.0, 2, stopped=True) == {"planned_steps": 30}  # stopped on the last step
    assert compute_saved(100, 0, 30, 0.0, 1, stopped=True) == {"planned_steps": 100}  # no step to price it by


def _run(root, run_id, method, knn, steps, saved=None, hardware=None):
    d = root / run_id
    d.mkdir(parents=True)
    timing = {"wall_s": 60.0, "train_steps": steps, "planned_steps": 100}
    collapse = {"collapsed": saved is not None, "collapse_step": 20 if saved is not None else None,
                "stopped_early": None}
    if saved is not None:
        timing["device_hours_saved"] = saved
        collapse["stopped_early"] = f"stopped: collapsed at step 20 (kl -> 0; train.stop_on_collapse), after step {steps}"
    (d / "result.json").write_text(json.dumps({"run_id": run_id, "method": method, "seed": 0, "status": "completed",
                                               "metrics": {"knn_top1": knn}, "timing": timing,
                                               "collapse": collapse}))
    (d / "env.json").write_text(json.dumps({"git": {"sha": "abcdef1234567", "dirty": False}, "world_size": 1,
                                            "hardware": hardware or {"cpu_count": 2, "processor": "x86_64"}}))
    return {"run_id": run_id, "run_dir": d, "seed": 0, "method": method, "axes": {"method": method}}


def test_table_says_where_runs_stopped_and_what_it_saved(tmp_path):
    df = collect([_run(tmp_path, "a", "dino", 80.0, 100), _run(tmp_path, "b", "dino_no_centering", 60.0, 40, 0.25),
                  _run(tmp_path, "c", "dino_no_sharpening", 61.0, 60, 0.5)])
    text = render(df, "s", TableSpec(rows=["method"], metrics=["knn_top1"]))
    assert "| dino | 1/1 | **80.00** |" in text
    assert "60.00 (1 collapsed; stopped at step 40)" in text and "61.00 (1 collapsed; stopped at step 60)" in text
    assert "train.stop_on_collapse stopped 2 of 3 completed runs early: 0.75 device-hours not spent (45 min)" in text
    gpu = {"cuda": True, "gpus": [{"name": "NVIDIA H100"}]}
    df = collect([_run(tmp_path / "g", "b", "dino_no_centering", 60.0, 40, 0.5, hardware=gpu)])
    assert "stopped 1 of 1 completed runs early: 0.5 GPU-hours not spent (30 min)" in render(
        df, "s", TableSpec(rows=["method"], metrics=["knn_top1"]))


def test_no_footer_line_when_nothing_stopped(tmp_path):
    df = collect([_run(tmp_path, "a", "dino", 80.0, 100)])
    assert "stop_on_collapse" not in render(df, "s", TableSpec(rows=["method"], metrics=["knn_top1"]))
