"""Run-directory helpers and the W&B mirror (real wandb library, offline mode)."""

import json

from ssl_bench import config as config_lib
from ssl_bench import tracking, train


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


def test_truncated_result_reads_as_not_completed(tmp_path):
    (tmp_path / "result.json").write_text('{"status": "compl')
    assert tracking.read_result(tmp_path) is None


def test_wandb_offline_mirror(tiny_tree, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = config_lib.build_config(tiny_tree, {"tracking": {"wandb": "offline"}, "study": "wb"})
    result = train.run(cfg)
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
