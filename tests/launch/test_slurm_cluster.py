"""The SLURM launcher against the real 2-node test cluster (slurm/local-cluster/, marker ``slurm``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ssl_bench import config as config_lib
from ssl_bench.run import train
from ssl_bench.launch import submissions
from ssl_bench.launch.grid import load_study
from ssl_bench.launch.status import study_status
from tests.launch.conftest import release_held, squeue_state, wait_for

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[2]
PROFILE = str(REPO / "slurm" / "profiles" / "local-test.yaml")


def write_study(tmp_path: Path, tiny_tree: dict, name: str, grid: dict, **extra) -> Path:
    tree = config_lib.deep_merge(tiny_tree, {"data": {"subset": 64}, **extra})
    (tmp_path / f"{name}_base.yaml").write_text(yaml.safe_dump(tree))
    study = tmp_path / f"{name}.yaml"
    study.write_text(yaml.safe_dump({"study": name, "base": f"{name}_base.yaml", "grid": grid, "seeds": [0]}))
    return study


def cli(cluster, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ssl_bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **cluster.env})


def job_ids(study_file: Path) -> dict[str, str]:
    return {r: j["job_id"] for r, j in submissions.latest_jobs(load_study(study_file)).items()}


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max([json.loads(x).get("step") or 0 for x in lines if x.strip().endswith("}")], default=-1)


def test_array_of_two_node_ddp_runs_with_wandb(slurm_cluster, tmp_path, tiny_tree):
    """One array, two runs, each a 2-node x 1-task gloo DDP job; W&B offline files hold the grouped, tagged run."""
    study_file = write_study(tmp_path, tiny_tree, "ddp", {"method.name": ["dino", "dino_no_centering"]},
                             trainer={"num_nodes": 2, "max_steps": 3}, tracking={"wandb": "offline"})
    started = time.time()
    out = cli(slurm_cluster, "grid", "launch", str(study_file), "--cluster", "slurm", "--profile", PROFILE,
              "--eval", "collapse", "--wait", "--poll", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    print(f"array of 2 two-node runs: {time.time() - started:.1f} s end to end")
    assert "evals job" in out.stdout
    assert "submitted 2 run(s) as array(s)" in out.stdout
    study = load_study(study_file)
    (submission,) = submissions.read_submissions(study)
    assert len(submission["arrays"]) == 1 and len({j.split("_")[0] for j in submission["train_jobs"].values()}) == 1
    print(f"submission of the array: {submission['submit_s']:.2f} s")
    for spec in study.runs:
        result = json.loads((spec.run_dir / "result.json").read_text())
        assert result["status"] == "completed", result
        env = json.loads((spec.run_dir / "env.json").read_text())
        assert env["world_size"] == 2 and env["slurm_job_id"]
        assert env["git"]["snapshot"].startswith(submission["snapshot"])
        ddp = result["ddp"]  # every rank's teacher-weight hash, gathered after training
        assert ddp["world_size"] == 2 and len(set(ddp["teacher_sha256"])) == 1
        (start,) = [json.loads(x) for x in (spec.run_dir / "slurm.jsonl").read_text().splitlines()]
        assert start["nodelist"] == "n[1-2]" and start["ntasks"] == "2"
        wandb_files = list((spec.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
        assert wandb_files, "no offline W&B run"
        blob = wandb_files[0].read_bytes()
        assert b"ddp" in blob and f"method.name={spec.method}".encode() in blob  # group and axis tag
    for spec in study.runs:  # the chained eval array starts once the training array has ended
        (record,) = wait_for(lambda: list((spec.run_dir / "evals").glob("collapse-*.json")), timeout=180,
                             what="the chained collapse evaluation")
        assert json.loads(record.read_text())["metrics"]["rankme"] > 0
    status = cli(slurm_cluster, "grid", "status", str(study_file), cwd=tmp_path)
    assert status.returncode == 0 and "2 completed" in status.stdout and "n[1-2]" in status.stdout
    table = cli(slurm_cluster, "results", "table", str(study_file), cwd=tmp_path)
    assert table.returncode == 0 and "dino_no_centering" in table.stdout, table.stderr[-2000:]


def test_two_node_accumulated_arm_equals_the_large_batch_arm(slurm_cluster, tmp_path, tiny_tree):
    """A study with two arms on 2 nodes: batch 8 per rank against 2 accumulated micro-batches of 4 per rank.

    The arms vary data.batch_size and optim.accumulate_grad_batches together (``arms:``); with SGD and no
    drop path the two trajectories are the same up to float rounding (tests/methods/test_accumulation.py).
    """
    from tests.methods.test_accumulation import EXACT, _assert_states

    tree = config_lib.deep_merge(tiny_tree, {**EXACT, "trainer": {"num_nodes": 2, "max_steps": 3},
                                             "eval": {"knn_init": False}})
    (tmp_path / "accumulate_base.yaml").write_text(yaml.safe_dump(tree))
    study_file = tmp_path / "accumulate.yaml"
    study_file.write_text(yaml.safe_dump({"study": "accumulate", "base": "accumulate_base.yaml", "seeds": [0], "arms": [
        {"name": "large", "data.batch_size": 8},
        {"name": "accumulated", "data.batch_size": 4, "optim.accumulate_grad_batches": 2}]}))
    plan = cli(slurm_cluster, "grid", "plan", str(study_file), cwd=tmp_path)
    assert plan.returncode == 0 and "large" in plan.stdout and "accumulated" in plan.stdout, plan.stderr[-2000:]
    out = cli(slurm_cluster, "grid", "launch", str(study_file), "--cluster", "slurm", "--profile", PROFILE,
              "--wait", "--poll", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    states = {}
    for spec in load_study(study_file).runs:
        result = json.loads((spec.run_dir / "result.json").read_text())
        assert result["status"] == "completed" and result["timing"]["train_steps"] == 3, result
        assert result["ddp"]["world_size"] == 2 and len(set(result["ddp"]["teacher_sha256"])) == 1
        ckpt = torch.load(spec.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        states[spec.config.optim.accumulate_grad_batches] = ckpt["state_dict"]
    _assert_states(states[2], states[1], close=True)


def test_chained_knn_and_linear_shard_over_the_two_nodes_of_the_training_job(slurm_cluster, tmp_path, tiny_tree):
    """--eval knn,linear after a 2-node run: each eval job has the training job's 2 tasks (one gloo group),
    its records say 2 ranks, and the numbers are those of a one-process evaluation of the same checkpoint."""
    from ssl_bench.run import evaluate

    study_file = write_study(tmp_path, tiny_tree, "evalranks", {"method.name": ["dino"]},
                             trainer={"num_nodes": 2, "max_steps": 2},
                             eval={**tiny_tree["eval"], "knn_init": False, "test_subset": 17},
                             linear={"epochs": 1, "lrs": [0.01, 0.1], "augment": False, "batch_size": 16,
                                     "test_subset": 17})
    dry = cli(slurm_cluster, "grid", "launch", str(study_file), "--cluster", "slurm", "--profile", PROFILE,
              "--eval", "knn,linear", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "eval array (knn, linear) of 1 job(s), 2 node(s) x 1 task(s)" in dry.stdout, \
        dry.stdout[-2000:] + dry.stderr[-2000:]
    out = cli(slurm_cluster, "grid", "launch", str(study_file), "--cluster", "slurm", "--profile", PROFILE,
              "--eval", "knn,linear", "--wait", "--poll", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (spec,) = load_study(study_file).runs
    found = {}
    for kind in ("knn", "linear"):
        (path,) = wait_for(lambda: list((spec.run_dir / "evals").glob(f"{kind}-*.json")), timeout=240,
                           what=f"the chained {kind} evaluation")
        found[kind] = json.loads(path.read_text())
        assert found[kind]["protocol"]["ranks"] == 2, found[kind]["protocol"]
    cpu = torch.device("cpu")
    knn = evaluate.evaluate(evaluate.open_target(str(spec.run_dir)), "knn", cpu, no_cache=True)
    probe = evaluate.evaluate(evaluate.open_target(str(spec.run_dir)), "linear", cpu)
    assert knn.protocol["ranks"] == probe.protocol["ranks"] == 1
    assert found["knn"]["metrics"] == pytest.approx(knn.metrics, abs=1e-9)
    assert found["linear"]["metrics"] == pytest.approx(probe.metrics, abs=1e-9)


def test_two_node_fsdp_run_saves_shards_and_its_chained_knn_reads_the_export(slurm_cluster, tmp_path, tiny_tree):
    """trainer.strategy=fsdp on 2 nodes x 1 task (gloo): one checkpoint shard per node, the same gathered
    teacher on both ranks, and the chained 2-task k-NN job reads the consolidated export to the run's number."""
    study_file = write_study(tmp_path, tiny_tree, "fsdp", {"method.name": ["dino"]},
                             trainer={"num_nodes": 2, "max_steps": 3, "strategy": "fsdp"},
                             eval={**tiny_tree["eval"], "knn_init": False})
    out = cli(slurm_cluster, "grid", "launch", str(study_file), "--cluster", "slurm", "--profile", PROFILE,
              "--eval", "knn", "--wait", "--poll", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (spec,) = load_study(study_file).runs
    result = json.loads((spec.run_dir / "result.json").read_text())
    assert result["status"] == "completed" and result["timing"]["train_steps"] == 3, result
    assert result["ddp"]["world_size"] == 2 and len(set(result["ddp"]["teacher_sha256"])) == 1
    shards = sorted(p.name for p in (spec.run_dir / "checkpoints" / "last.ckpt").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]
    (path,) = wait_for(lambda: list((spec.run_dir / "evals").glob("knn-*.json")), timeout=240,
                       what="the chained k-NN evaluation")
    record = json.loads(path.read_text())
    assert record["protocol"]["ranks"] == 2 and record["checkpoint"]["path"].endswith("last-consolidated.ckpt")
    assert record["metrics"]["knn_top1"] == pytest.approx(result["metrics"]["knn_top1"], abs=1e-9)


def test_requeued_run_resumes_to_the_weights_of_an_uninterrupted_run(slurm_cluster, tmp_path, tiny_tree):
    study_file = write_study(tmp_path, tiny_tree, "requeue", {"method.name": ["dino"]},
                             optim={"epochs": 40}, trainer={"max_steps": 120, "num_threads": 1},
                             train={"diagnostics_every_n_steps": 10, "checkpoint_every_n_steps": 25},
                             eval={**tiny_tree["eval"], "knn_init": False})
    out = cli(slurm_cluster, "grid", "launch", str(study_file), "--cluster", "slurm", "--profile", PROFILE,
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    (spec,) = load_study(study_file).runs
    (job_id,) = job_ids(study_file).values()
    wait_for(lambda: steps_logged(spec.run_dir) >= 30, timeout=180, what="30 training steps")
    interrupted = time.time()
    # submitit's preemption: SIGTERM, then the USR2 warning signal, to the job's tasks
    subprocess.run(["scancel", job_id, "--signal", "TERM"], check=True, env={**os.environ, **slurm_cluster.env})
    subprocess.run(["scancel", job_id, "--signal", "USR2"], check=True, env={**os.environ, **slurm_cluster.env})
    wait_for(lambda: squeue_state(job_id, env=slurm_cluster.env) in ("PENDING", "REQUEUED"), timeout=60,
             what="the requeue")
    release_held(job_id, env=slurm_cluster.env)
    wait_for(lambda: (json.loads((spec.run_dir / "result.json").read_text()).get("resumes")), timeout=120,
             what="the resume")
    resumed_at = time.time()
    wait_for(lambda: json.loads((spec.run_dir / "result.json").read_text())["status"] == "completed",
             timeout=300, what="completion")
    result = json.loads((spec.run_dir / "result.json").read_text())
    (resume,) = result["resumes"]
    print(f"interrupt -> resumed: {resumed_at - interrupted:.1f} s; resumed from step {resume['from_step']}")
    assert 30 <= resume["from_step"] < 120 and resume["slurm_restart_count"] == 1
    steps = [json.loads(x)["step"] for x in (spec.run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/loss" in json.loads(x)]
    assert steps == list(range(120))
    status = cli(slurm_cluster, "grid", "status", str(study_file), cwd=tmp_path).stdout
    assert "completed (resumed 1x after preemption)" in status
    reference = config_lib.build_config(config_lib.deep_merge(config_lib.to_dict(spec.config),
                                                              {"tracking": {"runs_root": str(tmp_path / "ref")}}))
    train.run(reference)
    mine = torch.load(spec.run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ref = torch.load(config_lib.run_dir(reference) / "checkpoints" / "last.ckpt", map_location="cpu",
                     weights_only=False)
    different = [k for k, v in ref["state_dict"].items() if not torch.equal(v, mine["state_dict"][k])]
    assert not different, f"resumed weights differ from the uninterrupted run: {different[:5]}"


def test_cancelled_run_is_lost_then_resubmitted(slurm_cluster, tmp_path, tiny_tree):
    study_file = write_study(tmp_path, tiny_tree, "cancel", {"method.name": ["dino"]},
                             optim={"epochs": 1000}, trainer={"max_steps": 100000})
    profile_args = ("--cluster", "slurm", "--profile", PROFILE)
    assert cli(slurm_cluster, "grid", "launch", str(study_file), *profile_args, cwd=tmp_path).returncode == 0
    (spec,) = load_study(study_file).runs
    (first,) = job_ids(study_file).values()
    wait_for(lambda: steps_logged(spec.run_dir) >= 1, timeout=120, what="training to start")
    out = cli(slurm_cluster, "grid", "cancel", str(study_file), cwd=tmp_path)
    assert out.returncode == 0 and f"job {first}" in out.stdout
    # The record still says running but its job is gone: lost (issue 16), never running, and resubmitted.
    wait_for(lambda: study_status(load_study(study_file))[0].state == "lost", timeout=60, what="lost state")
    (row,) = study_status(load_study(study_file))
    assert row.slurm_state == "CANCELLED" and "SLURM CANCELLED, run record says running" in row.label
    again = cli(slurm_cluster, "grid", "launch", str(study_file), *profile_args, cwd=tmp_path)
    assert again.returncode == 0 and "submitted 1 run(s)" in again.stdout
    (second,) = job_ids(study_file).values()
    assert second != first
    dup = cli(slurm_cluster, "grid", "launch", str(study_file), *profile_args, cwd=tmp_path)
    assert "already" in dup.stdout and f"job {second}" in dup.stdout  # queued runs are not submitted twice
    assert cli(slurm_cluster, "grid", "cancel", str(study_file), cwd=tmp_path).returncode == 0


def test_run_killed_on_a_node_is_reported_not_hung_on(slurm_cluster, tmp_path, tiny_tree):
    study_file = write_study(tmp_path, tiny_tree, "killed", {"method.name": ["dino"]},
                             optim={"epochs": 1000}, trainer={"max_steps": 100000})
    launch = subprocess.Popen([sys.executable, "-m", "ssl_bench.cli", "grid", "launch", str(study_file), "--cluster",
                               "slurm", "--profile", PROFILE, "--wait", "--poll", "1"], cwd=tmp_path,
                              env={**os.environ, **slurm_cluster.env}, stdout=subprocess.PIPE, text=True)
    (spec,) = load_study(study_file).runs
    wait_for(lambda: steps_logged(spec.run_dir) >= 1, timeout=120, what="training to start")
    (job_id,) = job_ids(study_file).values()
    raw = json.loads((spec.run_dir / "slurm.jsonl").read_text().splitlines()[-1])["raw_job_id"]
    pids = [p for p in _pids_of_job(raw) if _is_python(p)]
    assert pids, "no python task of the job found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    stdout, _ = launch.communicate(timeout=120)
    assert launch.returncode == 1, stdout[-2000:]
    assert "FAILED" in stdout
    (row,) = study_status(load_study(study_file))
    assert row.state == "lost" and "run record says running" in row.label


def _pids_of_job(raw_job_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={raw_job_id}".encode() in environ and b"SUBMITIT_EXECUTOR=slurm" in environ:
            pids.append(int(entry.name))
    return pids


def _is_python(pid: int) -> bool:
    try:
        return b"submitit.core._submit" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
