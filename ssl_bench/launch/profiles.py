"""Cluster profiles (``slurm/profiles/*.yaml``) and plan-time validation of a study's resources.

A profile says where and how jobs run (partition, account, GPUs, CPUs, memory, time); the study
says what each run needs (``trainer.devices`` x ``trainer.num_nodes`` processes, batch size). The
two are checked against each other, and against the partition as ``sinfo`` reports it when SLURM
is reachable, before anything is submitted: an impossible request fails here, not after hours in
the queue.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ssl_bench import config as config_lib

PROFILES_DIR = Path("slurm") / "profiles"


@dataclass
class Limits:
    """What one node of the partition offers; None = unknown (then ``sinfo`` is asked, if reachable)."""

    nodes: Optional[int] = None  # nodes in the partition
    cpus_per_node: Optional[int] = None
    gpus_per_node: Optional[int] = None
    mem_gb_per_node: Optional[float] = None
    time_min: Optional[int] = None  # partition's maximum time limit


@dataclass
class Profile:
    """One cluster's submission settings (submitit's ``slurm_*`` parameters)."""

    name: str = "default"
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = 0  # must equal trainer.devices for GPU runs (one task per GPU)
    cpus_per_task: int = 1  # per process; data workers run inside it
    mem_gb: Optional[float] = None  # per node; None = the partition's default
    time_min: int = 60  # per job; a longer run is checkpointed and requeued
    array_parallelism: int = 16  # array elements running at once
    max_requeues: int = 20  # timeouts a run may be requeued after (preemptions are not counted)
    signal_delay_s: int = 120  # seconds between SLURM's warning signal and the kill
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in every job
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch flags, e.g. {exclusive: true}
    limits: Limits = field(default_factory=Limits)
    source: str = ""  # the file this profile was read from

    def slurm_options(self) -> dict[str, Any]:
        """submitit ``slurm_*`` parameters (without the prefix) that do not depend on the job's shape."""
        optional = {"partition": self.partition, "account": self.account, "qos": self.qos,
                    "constraint": self.constraint, "mem": f"{int(self.mem_gb * 1024)}M" if self.mem_gb else None,
                    "additional_parameters": dict(self.sbatch) or None}
        return {"signal_delay_s": self.signal_delay_s, **{k: v for k, v in optional.items() if v is not None}}

    def sbatch_parameters(self, nodes: int, tasks_per_node: int) -> dict[str, Any]:
        """The sbatch parameters of a job of this shape (for ``--dry-run``)."""
        params: dict[str, Any] = {"nodes": nodes, "ntasks_per_node": tasks_per_node,
                                  "cpus_per_task": self.cpus_per_task, "time": self.time_min}
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        return {**params, **self.slurm_options()}


PROFILE_KEYS = tuple(f.name for f in dataclasses.fields(Profile) if f.name != "source")
LIMIT_KEYS = tuple(f.name for f in dataclasses.fields(Limits))


def available_profiles(root: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(root).glob("*.yaml"))


def resolve_profile_path(name_or_path: str, root: Path = PROFILES_DIR) -> Path:
    """A path to a profile file, or a profile name in ``slurm/profiles/``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    named = Path(root) / f"{name_or_path}.yaml"
    if named.is_file():
        return named
    choices = ", ".join(available_profiles(root)) or "none"
    raise config_lib.ConfigError(f"cluster profile {name_or_path!r} not found (neither a file nor a name in "
                                 f"{root}/); available profiles: {choices}")


def load_profile(name_or_path: str, root: Path = PROFILES_DIR) -> Profile:
    """Read a profile; unknown keys and wrong types are errors naming the file and the valid keys."""
    path = resolve_profile_path(name_or_path, root)
    data = config_lib.read_yaml(path)
    _check_keys(data, PROFILE_KEYS, str(path), "")
    limits = data.pop("limits", None) or {}
    if not isinstance(limits, dict):
        raise config_lib.ConfigError(f"cluster profile {str(path)!r}: 'limits' must be a mapping")
    _check_keys(limits, LIMIT_KEYS, str(path), "limits.")
    data.setdefault("name", path.stem)
    try:
        profile = Profile(**data, limits=Limits(**limits), source=str(path))
    except TypeError as exc:
        raise config_lib.ConfigError(f"cluster profile {str(path)!r}: {exc}") from exc
    _check_types(profile, path)
    return profile


def _check_keys(data: dict[str, Any], valid: tuple[str, ...], source: str, prefix: str) -> None:
    unknown = sorted(set(data) - set(valid))
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], valid, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
        raise config_lib.ConfigError(f"cluster profile {source!r}: unknown key(s) {[prefix + k for k in unknown]}"
                                     f"{hint} Valid keys: {', '.join(prefix + k for k in valid)}")


def _check_types(p: Profile, path: Path) -> None:
    ints = {"gpus_per_node": (p.gpus_per_node, 0), "cpus_per_task": (p.cpus_per_task, 1),
            "time_min": (p.time_min, 1), "array_parallelism": (p.array_parallelism, 1),
            "max_requeues": (p.max_requeues, 0), "signal_delay_s": (p.signal_delay_s, 0)}
    for key, (value, low) in ints.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise config_lib.ConfigError(f"cluster profile {str(path)!r}: {key} must be an integer >= {low}, "
                                         f"got {value!r}")
    if p.mem_gb is not None and (not isinstance(p.mem_gb, (int, float)) or p.mem_gb <= 0):
        raise config_lib.ConfigError(f"cluster profile {str(path)!r}: mem_gb must be a positive number or null")
    if not isinstance(p.setup, list) or not isinstance(p.env, dict) or not isinstance(p.sbatch, dict):
        raise config_lib.ConfigError(f"cluster profile {str(path)!r}: setup must be a list of shell lines, "
                                     f"env and sbatch mappings")


# ---------------------------------------------------------------------------------------------
# Validation of a study against a profile


@dataclass(frozen=True)
class JobShape:
    """What one run asks SLURM for: ``nodes`` x ``tasks_per_node`` processes (one per device)."""

    nodes: int
    tasks_per_node: int
    gpus_per_node: int


def job_shape(cfg: config_lib.Config) -> JobShape:
    gpu = cfg.trainer.accelerator in ("gpu", "cuda")
    return JobShape(cfg.trainer.num_nodes, cfg.trainer.devices, cfg.trainer.devices if gpu else 0)


def partition_limits(partition: Optional[str]) -> Optional[Limits]:
    """The partition as ``sinfo`` sees it (None when SLURM is not reachable from here)."""
    if shutil.which("sinfo") is None:
        return None
    cmd = ["sinfo", "-h", "-o", "%P|%D|%c|%m|%G|%l"]
    if partition:
        cmd += ["-p", partition]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    rows = [line.split("|") for line in out.stdout.splitlines() if line.strip()]
    if partition and not rows:
        raise config_lib.ConfigError(f"partition {partition!r} does not exist on this cluster; available: "
                                     f"{', '.join(sorted(list_partitions())) or 'none'}")
    if not rows:
        return None
    rows = [r for r in rows if not partition or r[0].rstrip("*") == partition] or rows
    return Limits(nodes=sum(int(r[1]) for r in rows), cpus_per_node=max(_int(r[2]) for r in rows),
                  gpus_per_node=max(_gpus(r[4]) for r in rows), mem_gb_per_node=max(_int(r[3]) for r in rows) / 1024,
                  time_min=max(_minutes(r[5]) or 0 for r in rows) or None)


def list_partitions() -> list[str]:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    return [p.rstrip("*") for p in out.stdout.split()]


def _int(text: str) -> int:
    digits = re.match(r"\d+", text.strip())
    return int(digits.group()) if digits else 0


def _gpus(gres: str) -> int:
    """``gpu:a100:8(S:0-1)`` -> 8; ``(null)`` -> 0."""
    total = 0
    for part in gres.split(","):
        fields = part.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def _minutes(limit: str) -> Optional[int]:
    """SLURM time ``[D-]HH:MM:SS`` / ``MM:SS`` / ``infinite`` -> minutes (None = unlimited)."""
    limit = limit.strip()
    if limit in ("infinite", "UNLIMITED", "n/a", ""):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts
    return int(days or 0) * 1440 + h * 60 + m + math.ceil(s / 60)


def effective_limits(profile: Profile, live: Optional[Limits]) -> Limits:
    """The profile's own limits, filled in (and tightened) by what sinfo reports."""
    merged = dataclasses.replace(profile.limits)
    if live is None:
        return merged
    for key in LIMIT_KEYS:
        mine, theirs = getattr(merged, key), getattr(live, key)
        if theirs is not None and (mine is None or theirs < mine):
            setattr(merged, key, theirs)
    return merged


def check_run(cfg: config_lib.Config, profile: Profile, limits: Limits, label: str,
              train_size: Optional[int] = None) -> list[str]:
    """Raise ConfigError for a request the cluster can never run; return warnings for wasteful ones."""
    shape = job_shape(cfg)
    t = cfg.trainer
    where = f"{label} on profile {profile.name!r} ({profile.source or 'built-in'})"
    gpu = shape.gpus_per_node > 0
    errors = []
    if gpu and profile.gpus_per_node != t.devices:
        errors.append(f"trainer.devices={t.devices} GPU processes per node need gpus_per_node={t.devices} in the "
                      f"profile (one task per GPU), but the profile has gpus_per_node={profile.gpus_per_node}")
    if not gpu and profile.gpus_per_node:
        errors.append(f"trainer.accelerator={t.accelerator!r} runs on CPU, but the profile requests "
                      f"{profile.gpus_per_node} GPU(s) per node; use trainer.accelerator=gpu or a CPU profile")
    if limits.nodes is not None and shape.nodes > limits.nodes:
        errors.append(f"trainer.num_nodes={shape.nodes} but the partition has {limits.nodes} node(s)")
    if limits.gpus_per_node is not None and shape.gpus_per_node > limits.gpus_per_node:
        errors.append(f"{shape.gpus_per_node} GPUs per node requested; nodes have {limits.gpus_per_node}")
    cpus = shape.tasks_per_node * profile.cpus_per_task
    if limits.cpus_per_node is not None and cpus > limits.cpus_per_node:
        errors.append(f"{shape.tasks_per_node} task(s) x cpus_per_task={profile.cpus_per_task} = {cpus} CPUs per "
                      f"node requested; nodes have {limits.cpus_per_node}")
    if limits.mem_gb_per_node is not None and profile.mem_gb and profile.mem_gb > limits.mem_gb_per_node:
        errors.append(f"mem_gb={profile.mem_gb} per node requested; nodes have {limits.mem_gb_per_node:.1f} GB")
    if limits.time_min is not None and profile.time_min > limits.time_min:
        errors.append(f"time_min={profile.time_min} exceeds the partition's limit of {limits.time_min} min")
    world = shape.nodes * shape.tasks_per_node
    rank_batch = config_lib.rank_batch_size(cfg)
    if train_size is not None and train_size // world < rank_batch:
        errors.append(f"{world} processes x {config_lib.rank_batch_terms(cfg)} = total batch "
                      f"{world * rank_batch}, but each process gets only {train_size // world} of the "
                      f"{train_size} training images: no full batch per epoch; lower the batch size or the devices")
    if errors:
        raise config_lib.ConfigError(f"{where}: " + "; ".join(errors))
    warnings = []
    if cfg.data.num_workers + 1 > profile.cpus_per_task:
        warnings.append(f"{label}: data.num_workers={cfg.data.num_workers} loader processes + the training "
                        f"process share cpus_per_task={profile.cpus_per_task} CPU(s)")
    return warnings
