"""A 2-process CPU DDP run (Lightning's launcher, gloo) leaves one clean run directory."""

import json
import subprocess
import sys

import pytest
import yaml

from ssl_bench import repro


def test_launch_rank_reads_the_launchers_variables(monkeypatch):
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert repro.launch_rank(4) == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("NODE_RANK", "2")
    assert repro.launch_rank(4) == 9
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert repro.launch_rank(4) == 5
    monkeypatch.setenv("RANK", "3")
    assert repro.launch_rank(4) == 3


@pytest.mark.ddp
def test_two_process_run_writes_one_record(tmp_path, tiny_tree):
    # 64 images / 2 ranks / batch 8 = 4 steps per epoch, so max_steps ends the run
    tree = {**tiny_tree, "method": {**tiny_tree["method"], "name": "dinov2"},
            "data": {**tiny_tree["data"], "subset": 64},
            "trainer": {"max_steps": 3, "devices": 2}}
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    out = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "train", str(cfg_file)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count(": completed; k-NN top-1") == 1  # rank 0 reports, rank 1 stays quiet
    (run_dir,) = (tmp_path / "runs" / "ddp").iterdir()
    assert not (run_dir / "attempts").exists()  # rank 1 must not archive rank 0's fresh directory
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["timing"]["train_steps"] == 3
    assert 0 <= result["metrics"]["knn_top1"] <= 100
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(x)]
    assert steps == [0, 1, 2]  # one line per step: only rank 0 logs
    # The final k-NN ran sharded (each rank held half the bank); one process over the whole bank agrees.
    assert result["protocol"]["knn"]["ranks"] == 2
    single = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "eval", "knn", str(run_dir), "--device", "cpu",
                             "--no-cache"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    assert f"top-1 {result['metrics']['knn_top1']:.2f}%" in single.stdout


@pytest.mark.ddp
def test_two_process_run_that_diverges_fails_on_every_rank_at_one_step(tmp_path, tiny_tree):
    """Both ranks read the all-reduced non-finite flag at the same steps and stop together."""
    tree = {**tiny_tree, "data": {**tiny_tree["data"], "subset": 64}, "optim": {"lr": 1e30, "epochs": 2},
            "trainer": {"max_steps": 8, "devices": 2}, "train": {"diagnostics_every_n_steps": 0}}
    cfg_file = tmp_path / "ddp.yaml"
    cfg_file.write_text(yaml.safe_dump(tree))
    out = subprocess.run([sys.executable, "-m", "ssl_bench.cli", "train", str(cfg_file)], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode != 0
    assert out.stdout.count(": failed: non-finite") == 1, out.stdout[-3000:] + out.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "ddp").iterdir()
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "failed" and result["error"] == f"non-finite teacher output at step {result['step']}"
    assert "knn_top1" not in result["metrics"]
