"""Smoke tests of the local 2-node Slurm cluster (slurm/local-cluster) that the slurm tests use."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.launch.conftest import (
    CLUSTER_DIR,
    SlurmCluster,
    job_output,
    squeue_state,
    start_cluster,
    stop_cluster,
    wait_for,
)

pytestmark = pytest.mark.slurm


def submit(cluster: SlurmCluster, path: Path, body: str, *opts: str) -> tuple[int, Path]:
    """sbatch a bash script with ``body``; return the job id and its output file."""
    script, out = path.with_suffix(".sh"), path.with_suffix(".out")
    script.write_text("#!/bin/bash\n" + body + "\n")
    job = cluster.run("sbatch", "--parsable", f"--output={out}", *opts, str(script))
    return int(job.strip().split(";")[0]), out


def wait_state(cluster: SlurmCluster, job: int, prefix: str, timeout: float = 30.0) -> str:
    """Wait until sacct records the job in a state starting with ``prefix``."""
    return wait_for(lambda: (s := cluster.sacct_state(job)).startswith(prefix) and s,
                    timeout, what=f"job {job} {prefix} in sacct")


@pytest.fixture(scope="module")
def two_node_job(slurm_cluster, tmp_path_factory) -> tuple[int, Path]:
    """A finished 2-node job whose tasks print their rank and node name."""
    body = 'srun bash -c \'echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_JOB_NODELIST"\''
    job, out = submit(slurm_cluster, tmp_path_factory.mktemp("two_node") / "job", body,
                      "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1")
    wait_for(lambda: squeue_state(job) in ("", "COMPLETED", "FAILED", "CANCELLED"), 30,
             what=f"job {job} to end")
    return job, out


def test_sinfo_shows_two_idle_nodes(slurm_cluster):
    def idle_nodes():
        out = slurm_cluster.run("sinfo", "-h", "-N", "-p", slurm_cluster.partition, "-o", "%N %t")
        rows = sorted(set(out.split("\n")) - {""})
        return rows if rows == ["n1 idle", "n2 idle"] else None

    assert wait_for(idle_nodes, 15, what="two idle nodes") == ["n1 idle", "n2 idle"]
    partitions = slurm_cluster.run("sinfo", "-h", "-o", "%P").split()
    assert partitions == [slurm_cluster.partition + "*"]  # the only partition, and the default


def test_two_node_job_runs_one_task_per_node(two_node_job):
    _, out = two_node_job
    lines = sorted(line for line in job_output(out) if line.strip())
    assert lines == ["0 n1 n[1-2]", "1 n2 n[1-2]"]


def test_sacct_reports_completed_and_cancelled(slurm_cluster, two_node_job, tmp_path):
    job, _ = two_node_job
    assert wait_state(slurm_cluster, job, "COMPLETED") == "COMPLETED"
    exit_code = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", str(job), "-o", "ExitCode")
    assert exit_code.strip() == "0:0"

    sleeper, _ = submit(slurm_cluster, tmp_path / "sleeper", "sleep 300")
    wait_for(lambda: squeue_state(sleeper) == "RUNNING", 20, what="sleeper running")
    slurm_cluster.run("scancel", str(sleeper))
    assert wait_state(slurm_cluster, sleeper, "CANCELLED").startswith("CANCELLED by ")


def test_requeue_round_trip(slurm_cluster, tmp_path):
    body = 'echo "restart=${SLURM_RESTART_COUNT:-0}"\nsleep 300'
    job, out = submit(slurm_cluster, tmp_path / "requeue", body, "--requeue", "--open-mode=append")
    wait_for(lambda: "restart=0" in job_output(out), 20, what="first run")

    t0 = time.perf_counter()
    slurm_cluster.run("scontrol", "requeue", str(job))
    wait_for(lambda: squeue_state(job) == "PENDING", 20, what="job pending after requeue")
    reason = slurm_cluster.run("squeue", "-h", "-j", str(job), "-o", "%r").strip()
    assert reason == "BeginTime"  # the hold that release_held lifts
    slurm_cluster.release_held(job)
    wait_for(lambda: "restart=1" in job_output(out), 20, what="second run")
    round_trip = time.perf_counter() - t0
    print(f"requeue round trip: {round_trip:.1f} s")

    assert [line for line in job_output(out) if line.startswith("restart=")] == \
        ["restart=0", "restart=1"]
    assert "Restarts=1" in slurm_cluster.run("scontrol", "show", "job", str(job))
    slurm_cluster.run("scancel", str(job))


def test_start_is_idempotent_and_stop_leaves_nothing(slurm_cluster, tmp_path_factory):
    """A second cluster (own ports): start twice, stop, and no process of it survives."""
    state = tmp_path_factory.mktemp("slurm_second")
    second = start_cluster(state)
    pidfiles = sorted(state.glob("run/*.pid")) + [state / "munge/munged.pid",
                                                    state / "mysql/mysqld.pid"]
    pids = [int(p.read_text()) for p in pidfiles]
    assert len(pids) == 6
    again = subprocess.run(["bash", str(CLUSTER_DIR / "start.sh"), str(state)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0
    assert "already running" in again.stdout
    assert f"export SLURM_CONF={second.env['SLURM_CONF']}" in again.stdout
    t0 = time.perf_counter()
    assert stop_cluster(state).returncode == 0
    print(f"second cluster: up {second.startup_s:.1f} s, down {time.perf_counter() - t0:.1f} s")
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
