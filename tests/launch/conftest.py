"""Launcher fixtures: a real local 2-node Slurm 22.05 cluster (slurm/local-cluster/start.sh).

The cluster is one slurmctld plus two slurmd (n1, n2) on this host, with
slurmdbd and MariaDB so that ``sacct`` works as submitit expects. It starts once
per pytest session in a fresh state dir and is always torn down with stop.sh.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO / "slurm" / "local-cluster"
PARTITION = "debug"
NODES = ("n1", "n2")
PORTS_PER_CLUSTER = 5  # slurmctld, slurmd n1, slurmd n2, slurmdbd, MariaDB
REQUIRED = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db", "sbatch")

T = TypeVar("T")


@dataclass(frozen=True)
class SlurmCluster:
    """A running local cluster: where it lives and how to talk to it."""

    state_dir: Path
    partition: str = PARTITION
    nodes: tuple[str, ...] = NODES
    env: dict[str, str] = field(default_factory=dict)
    startup_s: float = 0.0

    def run(self, *args: str, check: bool = True) -> str:
        """Run a Slurm command (sbatch, squeue, ...) against this cluster; return stdout."""
        return slurm_cmd(*args, env=self.env, check=check)

    def sacct_state(self, job_id: int | str) -> str:
        """The job's accounting state ("COMPLETED", "CANCELLED by 0", ...), "" until recorded."""
        return sacct_state(job_id, env=self.env)

    def release_held(self, job_id: int | str, timeout: float = 30.0) -> None:
        """Start a requeued job now instead of after its BeginTime hold."""
        release_held(job_id, timeout=timeout, env=self.env)


def slurm_cmd(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run a Slurm client command with ``env`` merged into os.environ; return stdout."""
    proc = subprocess.run(args, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.2,
             what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def squeue_state(job_id: int | str, env: dict[str, str] | None = None) -> str:
    """The job's state in squeue ("PENDING", "RUNNING", ...), "" once it has left the queue."""
    return slurm_cmd("squeue", "-h", "-j", str(job_id), "-o", "%T", env=env, check=False).strip()


def sacct_state(job_id: int | str, env: dict[str, str] | None = None) -> str:
    """The allocation's state in sacct, "" until slurmdbd has recorded the job."""
    out = slurm_cmd("sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State",
                    env=env, check=False)
    return out.strip().splitlines()[-1] if out.strip() else ""


REQUEUE_SETTLE_S = 3.0


def release_held(job_id: int | str, timeout: float = 30.0,
                 env: dict[str, str] | None = None) -> None:
    """Let a requeued job start at once.

    Slurm holds a requeued job until BeginTime (now + AuthInfo cred_expire: 30 s
    here, 120 s by default). Waits for the job to be PENDING again, then sets
    its StartTime to now, a few seconds after the requeue: slurmd revokes the old
    instance's job credential at the requeue, and a credential issued within the
    same second is revoked too ("Killing non-startable batch JobId=X: Job
    credential revoked"), which ends the job instead of restarting it.
    """
    wait_for(lambda: squeue_state(job_id, env) == "PENDING", timeout, what=f"job {job_id} pending")
    time.sleep(REQUEUE_SETTLE_S)
    slurm_cmd("scontrol", "update", f"JobId={job_id}", "StartTime=now", env=env)


def skip_reason() -> str | None:
    """Why the local cluster cannot start here, or None when it can."""
    missing = [b for b in REQUIRED if shutil.which(b) is None]
    if missing:
        return (f"Slurm/munge/MariaDB binaries missing ({', '.join(missing)}): "
                "apt-get install slurm-wlm munge slurmdbd mariadb-server")
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root; run the slurm tests as root"
    return None


def _ports_free(base: int) -> bool:
    for port in range(base, base + PORTS_PER_CLUSTER):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return False
    return True


def free_port_base(first: int = 17000, step: int = 100, tries: int = 20) -> int:
    """A port base whose 5 ports are free, so two sessions never share a cluster."""
    for base in range(first, first + step * tries, step):
        if _ports_free(base):
            return base
    raise RuntimeError(f"no free port block of {PORTS_PER_CLUSTER} from {first}")


def _script(name: str, state_dir: Path, extra_env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_DIR / name), str(state_dir)], capture_output=True,
                          text=True, env={**os.environ, **extra_env}, timeout=300, check=False)


def _log_tails(state_dir: Path, lines: int = 15) -> str:
    parts = []
    for log in sorted((state_dir / "log").glob("*.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def start_cluster(state_dir: Path, port_base: int | None = None) -> SlurmCluster:
    """Run start.sh on ``state_dir``; stop.sh and raise with the daemon logs if it fails."""
    extra = {"SSL_BENCH_SLURM_PORT_BASE": str(port_base or free_port_base())}
    t0 = time.perf_counter()
    proc = _script("start.sh", state_dir, extra)
    if proc.returncode != 0:
        stop_cluster(state_dir)
        raise RuntimeError(f"start.sh failed:\n{proc.stdout}{proc.stderr}\n{_log_tails(state_dir)}")
    sys.stderr.write(proc.stdout)
    env = {"SLURM_CONF": str(state_dir / "etc" / "slurm.conf")}
    return SlurmCluster(state_dir=state_dir, env=env, startup_s=time.perf_counter() - t0)


def stop_cluster(state_dir: Path) -> subprocess.CompletedProcess:
    """Run stop.sh on ``state_dir``: no daemon or job of that cluster is left."""
    proc = _script("stop.sh", state_dir, {})
    sys.stderr.write(proc.stdout + proc.stderr)
    return proc


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The session's local 2-node cluster; SLURM_CONF points at it while the session runs."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    state_dir = tmp_path_factory.mktemp("slurm")
    cluster = start_cluster(state_dir)
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    try:
        yield cluster
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        stop_cluster(state_dir)


def job_output(path: Path) -> list[str]:
    """Lines of a job's output file ([] before the job has created it)."""
    return path.read_text().splitlines() if path.exists() else []

