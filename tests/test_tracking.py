"""Run-directory helpers and the W&B mirror (real wandb library, offline mode)."""

import json

import pytest

from ssl_bench import config as config_lib
from ssl_bench import tracking
from ssl_bench.run import train


def test_archive_previous_attempt_keeps_files(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    (d / "result.json").write_text('{"status": "failed"}')
    (d / "metrics.jsonl").write_text("{}\n")
    assert tracking.archive_previous_attempt(d) == d / "attempts" / "1"
    (d / "result.json").write_text('{"status": "running"}')
    assert tracking.archive_previous_attempt(d) == d / "attempts" / "2"
    assert json.loads((d / "attempts" / "1" / "result.json").read_text())["status"] == "failed"
    assert not (d / "result.json").exists()


def _strict(text):
    """json.loads that refuses NaN/Infinity tokens, as strict JSON readers (jq, JavaScript) do."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def test_write_json_is_strict_and_lists_non_finite_paths(tmp_path):
    import numpy as np
    import torch

    record = {"status": "completed", "metrics": {"knn_top1": 51.5, "loss": float("nan"),
                                                  "linear_grid": [{"val_top1": 1.0}, {"val_top1": float("inf")}],
                                                  "np": np.float32("nan"), "t": torch.tensor(float("-inf")),
                                                  "t_ok": torch.tensor(2.5), "arr": np.array([1.0, np.nan])},
              "timing": (1.0, -float("inf")), "path": tmp_path}
    tracking.write_json(tmp_path / "r.json", record)
    with pytest.raises(ValueError, match="NaN"):
        _strict('{"a": NaN}')  # the strict parser does refuse what json.dumps writes by default
    back = _strict((tmp_path / "r.json").read_text())
    assert back["non_finite"] == ["metrics.loss", "metrics.linear_grid.1.val_top1", "metrics.np", "metrics.t",
                                  "metrics.arr.1", "timing.1"]
    m = back["metrics"]
    assert m["loss"] is None and m["linear_grid"] == [{"val_top1": 1.0}, {"val_top1": None}]
    assert m["knn_top1"] == 51.5 and m["t_ok"] == 2.5 and m["arr"] == [1.0, None] and back["timing"] == [1.0, None]
    assert back["path"] == str(tmp_path)
    # A clean rewrite of the record drops the old flag, a new non-finite value sets it again.
    tracking.write_json(tmp_path / "r.json", {**back, "metrics": {"knn_top1": 1.0}, "timing": {}})
    assert "non_finite" not in _strict((tmp_path / "r.json").read_text())


def test_result_and_eval_records_are_strict(tmp_path):
    tracking.RunDir(tmp_path).write_result({"status": "completed", "metrics": {"knn_top1": float("nan")}})
    tracking.record_eval(tmp_path, "linear-1", {"kind": "linear", "metrics": {"linear_top1": float("inf")}})
    result = _strict((tmp_path / "result.json").read_text())
    assert result["non_finite"] == ["metrics.knn_top1", "evals.linear-1.metrics.linear_top1"]
    record = _strict((tmp_path / "evals" / "linear-1.json").read_text())
    assert record["non_finite"] == ["metrics.linear_top1"] and record["metrics"]["linear_top1"] is None


def test_truncated_result_is_corrupt_not_missing(tmp_path):
    assert tracking.read_result(tmp_path) is None  # absent: no record yet
    (tmp_path / "result.json").write_text('{"status": "compl')
    with pytest.raises(tracking.CorruptRecordError, match=r"result\.json is corrupt \(not JSON: Unterminated"):
        tracking.read_result(tmp_path)
    (tmp_path / "result.json").write_text("")
    with pytest.raises(tracking.CorruptRecordError) as info:
        tracking.read_result(tmp_path)
    assert info.value.reason == "empty file" and info.value.path == tmp_path / "result.json"
    (tmp_path / "result.json").write_text("[1, 2]")
    with pytest.raises(tracking.CorruptRecordError, match="a JSON list, not an object"):
        tracking.read_result(tmp_path)


def test_record_eval_never_overwrites_a_corrupt_result(tmp_path):
    (tmp_path / "result.json").write_text('{"status": "completed", "metr')
    with pytest.raises(tracking.CorruptRecordError):
        tracking.record_eval(tmp_path, "knn-1", {"kind": "knn", "metrics": {"knn_top1": 1.0}})
    assert (tmp_path / "result.json").read_text() == '{"status": "completed", "metr'


def test_read_metrics_counts_torn_lines(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo\n'
                                            '\n[1]\n{"step": 3}\n{"step": 4, "tr')
    lines = tracking.read_metrics_counted(tmp_path)
    assert [r["step"] for r in lines.records] == [1, 3] and lines.torn == 3
    assert tracking.read_metrics(tmp_path) == lines.records  # the old reader: readable lines only
    assert tracking.read_metrics_counted(tmp_path / "absent").torn == 0


def test_wandb_offline_mirror(tiny_tree, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = config_lib.build_config(tiny_tree, {"tracking": {"wandb": "offline"}, "study": "wb"})
    result = train.run(cfg)
    # run.finish() returns once wandb's service has the run; the service may close the .wandb file
    # later (CI once read only its 7-byte header). teardown() waits for the service to exit.
    import wandb

    wandb.teardown()
    wandb_id = f"wb-{result.run_id}"  # <study>-<run_id>: the same config in two studies is two W&B runs
    offline = list((result.run_dir / "wandb").glob(f"offline-run-*-{wandb_id}"))
    assert len(offline) == 1, list((result.run_dir / "wandb").iterdir())
    blob = (offline[0] / f"run-{wandb_id}.wandb").read_bytes()
    assert result.metrics["knn_top1"] is not None and b"knn_top1" in blob  # the summary was published
    assert tracking.read_metrics(result.run_dir)  # the run directory is still written


def test_progress_lines_when_bar_is_off(tiny_tree, capsys):
    cfg = config_lib.build_config(tiny_tree, {"trainer": {"max_steps": 5}, "data": {"subset": 64}})
    train.run(cfg)
    out = capsys.readouterr().out
    assert "[ssl-bench] step 5/" in out and "img/s" in out and "ETA" in out
