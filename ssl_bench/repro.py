"""Seeding and environment capture (git sha, dirty flag, versions, hardware)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import random
import resource
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch

SNAPSHOT_FILE = "ssl_bench_snapshot.json"  # written next to a package copied at submit time
PACKAGES = ("torch", "torchvision", "timm", "lightning", "wandb", "submitit", "numpy", "pandas", "omegaconf")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch on every device."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy ships with torch here
        pass


def git_state(path: Path | None = None) -> dict[str, Any]:
    """``{"sha", "dirty", "branch"}`` of the repository holding ``path`` (the package by default).

    A package copied by the SLURM launcher (a code snapshot) reports the git state it was copied
    from, recorded at submit time, not that of whatever repository the snapshot happens to sit in.
    """
    if path is None:
        snapshot = Path(__file__).resolve().parent.parent / SNAPSHOT_FILE
        if snapshot.is_file():
            state = json.loads(snapshot.read_text())
            return {"sha": state.get("sha"), "dirty": state.get("dirty"), "branch": state.get("branch"),
                    "snapshot": str(snapshot.parent)}
    cwd = str(path or Path(__file__).resolve().parent)

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha, "dirty": bool(status) if status is not None else None,
            "branch": git("rev-parse", "--abbrev-ref", "HEAD")}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        versions["ssl-bench"] = importlib.metadata.version("ssl-bench")
    except importlib.metadata.PackageNotFoundError:
        versions["ssl-bench"] = None
    return versions


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16 and AMX; Arm's bf16 (Features)


def cpu_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The CPU's model name and which bf16 instructions it has, from ``/proc/cpuinfo`` (or the given text).

    Machines of one kind differ from day to day (an AVX2 EPYC one day, an AVX-512 Xeon with AMX the
    next), so a speed figure names its CPU, and bf16 autocast on the CPU pays only with these flags.
    Where there is no ``/proc/cpuinfo``: the model ``platform.processor()`` gives, and no flags.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return {"cpu_model": platform.processor() or None, "cpu_bf16": []}
    model, flags = None, set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {"cpu_model": model, "cpu_bf16": [flag for flag in BF16_CPU_FLAGS if flag in flags]}


def hardware() -> dict[str, Any]:
    info: dict[str, Any] = {"hostname": socket.gethostname(), "platform": platform.platform(),
                            "processor": platform.machine(), "cpu_count": os.cpu_count(), **cpu_info(),
                            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def environment(seed: int, world_size: int) -> dict[str, Any]:
    """Everything env.json records about where and how a run ran."""
    return {"git": git_state(), "versions": package_versions(), "hardware": hardware(),
            "world_size": world_size, "seed": seed,
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started_at": utc_now()}


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second: the timestamp of every record."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def owner() -> dict[str, Any]:
    """Who runs this attempt (result.json ``owner``): host, pid, SLURM ids (None outside SLURM), UTC times."""
    now = utc_now()
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
            "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"), "started_at": now, "heartbeat_at": now}


def process_start_time(pid: int) -> float | None:
    """Epoch seconds at which process ``pid`` started (Linux /proc: boot time + start ticks), else None."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    if pid <= 0:  # os.kill(0 or -1, ...) would address process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: Linux's ``VmHWM``, else ``ru_maxrss``.

    Not ``ru_maxrss`` on Linux: it survives ``fork`` + ``exec``, so a fresh benchmark process started by a
    1 GiB parent would report at least 1 GiB. ``VmHWM`` belongs to the process's own address space.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def launch_rank(devices_per_node: int = 1) -> int:
    """Global rank of this process as its launcher set it, before torch.distributed starts.

    Lightning's DDP launcher re-runs the command with ``NODE_RANK``/``LOCAL_RANK`` set;
    torchrun sets ``RANK``; SLURM sets ``SLURM_PROCID``. 0 when none is set (one process).
    """
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local = os.environ.get("LOCAL_RANK", "")
    if local.isdigit():
        return int(os.environ.get("NODE_RANK", "0") or 0) * devices_per_node + int(local)
    return 0
