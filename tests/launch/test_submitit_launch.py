"""The SLURM launch path without SLURM: submitit's local executor runs the same jobs in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from ssl_bench import config as config_lib
from ssl_bench.run import train
from ssl_bench.launch import slurm, submissions
from ssl_bench.launch.grid import load_study
from ssl_bench.launch.profiles import Profile
from ssl_bench.launch.status import study_status

REPO = Path(__file__).resolve().parents[2]


def write_study(tmp_path: Path, tiny_tree: dict, grid: dict, **extra) -> Path:
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(config_lib.deep_merge(tiny_tree, extra)))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"study": "s", "base": "base.yaml", "grid": grid, "seeds": [0]}))
    return study


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_bench.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def teacher_state(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("teacher.", "student."))}


def test_submitit_local_launch_status_and_relaunch(tmp_path, tiny_tree):
    study_file = write_study(tmp_path, tiny_tree, {"method.name": ["dino", "dino_no_centering"]})
    out = cli("grid", "launch", str(study_file), "--cluster", "submitit-local", "--wait", "--poll", "1",
              cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "submitted 2 run(s) as array(s)" in out.stdout
    study = load_study(study_file)
    for spec in study.runs:
        result = json.loads((spec.run_dir / "result.json").read_text())
        assert result["status"] == "completed", result
    (submission,) = submissions.read_submissions(study)
    assert submission["cluster"] == "local" and set(submission["train_jobs"]) == {s.run_id for s in study.runs}
    snapshot = Path(submission["snapshot"])
    assert (snapshot / "ssl_bench" / "run" / "train.py").is_file()
    recorded = json.loads((snapshot / slurm.SNAPSHOT_FILE).read_text())
    assert recorded["sha"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                             text=True).stdout.strip()
    assert [s.state for s in study_status(study)] == ["completed", "completed"]
    again = cli("grid", "launch", str(study_file), "--cluster", "submitit-local", cwd=tmp_path)
    assert again.returncode == 0 and "nothing to submit" in again.stdout
    assert again.stdout.count("not submitted (completed)") == 2
    status = cli("grid", "status", str(study_file), cwd=tmp_path)
    assert status.returncode == 0 and "2 completed" in status.stdout


def test_dry_run_prints_sbatch_per_run_and_submits_nothing(tmp_path, tiny_tree):
    study_file = write_study(tmp_path, tiny_tree, {"method.name": ["dino", "dino_no_centering"]},
                             trainer={"num_nodes": 2})
    out = cli("grid", "launch", str(study_file), "--cluster", "slurm", "--profile", str(REPO / "slurm" / "profiles" /
              "local-test.yaml"), "--dry-run", "--eval", "knn", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for flag in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                 "#SBATCH --array=0-1%2", "#SBATCH --time=30", "#SBATCH --signal=USR2@30",
                 "export OMP_NUM_THREADS=\"1\"", "afterany"):
        assert flag in out.stdout, flag
    for spec in load_study(study_file).runs:
        assert spec.run_id in out.stdout
    assert not (tmp_path / "runs" / "s" / submissions.SLURM_DIR).exists()


def test_eval_devices_choose_the_shape_of_each_eval_job(tmp_path, tiny_tree):
    """knn/linear shard over the training job's nodes x tasks; collapse (not sharded) keeps one task;
    --eval-devices overrides both ways. All of it in the dry run, and bad choices fail before submitting."""
    study_file = write_study(tmp_path, tiny_tree, {"method.name": ["dino"]}, trainer={"num_nodes": 2})
    profile = str(REPO / "slurm" / "profiles" / "local-test.yaml")
    launch = ("grid", "launch", str(study_file), "--cluster", "slurm", "--profile", profile, "--dry-run")
    cases = {("--eval", "knn,collapse"): "2 node(s) x 1 task(s)",
             ("--eval", "collapse"): "1 node(s) x 1 task(s)",
             ("--eval", "knn", "--eval-devices", "1"): "1 node(s) x 1 task(s)",
             ("--eval", "collapse", "--eval-devices", "train"): "2 node(s) x 1 task(s)"}
    for extra, shape in cases.items():
        out = cli(*launch, *extra, cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
        (line,) = [ln for ln in out.stdout.splitlines() if "eval array" in ln]
        assert f"of 1 job(s), {shape} per node" in line, (extra, line)
    bad = cli(*launch, "--eval", "knn", "--eval-devices", "4", cwd=tmp_path)
    assert bad.returncode == 2 and "--eval-devices '4'; valid: train, 1" in bad.stderr
    alone = cli(*launch, "--eval-devices", "train", cwd=tmp_path)
    assert alone.returncode == 2 and "--eval-devices needs --eval" in alone.stderr
    local = cli("grid", "launch", str(study_file), "--eval-devices", "1", cwd=tmp_path)
    assert local.returncode == 2 and "need --cluster slurm" in local.stderr
    assert not (tmp_path / "runs").exists()


def test_bad_profile_and_eval_fail_before_submitting(tmp_path, tiny_tree):
    study_file = write_study(tmp_path, tiny_tree, {"method.name": ["dino"]}, trainer={"num_nodes": 3})
    profile = str(REPO / "slurm" / "profiles" / "local-test.yaml")
    out = cli("grid", "launch", str(study_file), "--cluster", "slurm", "--profile", profile, cwd=tmp_path)
    assert out.returncode == 2 and "trainer.num_nodes=3 but the partition has 2 node(s)" in out.stderr
    out = cli("grid", "launch", str(study_file), "--cluster", "slurm", "--profile", profile, "--eval", "knn,lin",
              "trainer.num_nodes=1", cwd=tmp_path)
    assert out.returncode == 2 and "unknown evaluation(s) ['lin']; valid: " in out.stderr
    out = cli("grid", "launch", str(study_file), "--cluster", "slurm", "trainer.num_nodes=1", cwd=tmp_path)
    assert out.returncode == 2 and "--cluster slurm needs --profile" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_preempted_local_job_resumes_to_the_same_weights(tmp_path, tiny_tree):
    """submitit's interrupt mid-training: checkpoint at the step end, requeue, resume; final weights are
    those of an uninterrupted run of the same config and seed."""
    long = {"data": {**tiny_tree["data"], "subset": 64}, "optim": {"epochs": 20},
            "trainer": {"max_steps": 60, "num_threads": 1},  # thread count changes float sums
            "train": {"diagnostics_every_n_steps": 5, "checkpoint_every_n_steps": 7},
            "eval": {**tiny_tree["eval"], "knn_init": False}}
    study_file = write_study(tmp_path, tiny_tree, {"method.name": ["dino"]}, **long)
    study = load_study(study_file)
    (spec,) = study.runs
    sub = slurm.submit(study, study.runs, Profile(name="local", time_min=30), cluster="local")
    (job,) = sub.jobs
    metrics = spec.run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(json.loads(x).get("step", 0) >= 10 for x in lines):
            break
        time.sleep(0.05)
    # What SLURM's --signal does: USR2 to the task (submitit's local controller would not forward it).
    tasks = _children(job._process.pid)
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    job.result()  # waits for the requeued job to finish
    result = json.loads((spec.run_dir / "result.json").read_text())
    assert result["status"] == "completed", result
    (resume,) = result["resumes"]
    assert 10 <= resume["from_step"] < 60
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if "train/loss" in json.loads(x)]
    assert steps == list(range(60))  # each step logged once
    reference_cfg = config_lib.build_config(config_lib.deep_merge(
        config_lib.to_dict(spec.config), {"tracking": {"runs_root": str(tmp_path / "ref")}}))
    train.run(reference_cfg)
    resumed, reference = teacher_state(spec.run_dir), teacher_state(config_lib.run_dir(reference_cfg))
    assert resumed.keys() == reference.keys()
    different = [k for k in reference if not torch.equal(resumed[k], reference[k])]
    assert not different, different[:5]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out
