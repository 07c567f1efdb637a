"""SLURM launcher: one submitit job array per study, one multi-node DDP job per run, requeue on preemption.

Each array element runs :class:`TrainJob` with ``nodes = trainer.num_nodes`` and ``tasks_per_node =
trainer.devices`` (one process per device; Lightning reads the SLURM environment). The package is
copied at submit time into ``<runs_root>/<study>/.slurm/<submission>/code`` and jobs import it from
there, so editing the working tree does not change queued runs. On SLURM's warning signal (USR2,
``signal_delay_s`` before the time limit, or submitit's ``_interrupt``) the run saves a checkpoint at
the end of the current step, then submitit's handler calls :meth:`TrainJob.checkpoint` and requeues
the job, which resumes from that checkpoint (``train.run``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ssl_bench import config as config_lib
from ssl_bench import repro
from ssl_bench.launch import status
from ssl_bench.launch.grid import RunSpec, Study
from ssl_bench.launch.jobs import EvalJob, TrainJob
from ssl_bench.launch.profiles import JobShape, Profile, job_shape
from ssl_bench.launch.submissions import SLURM_DIR, append_submission, study_root

SNAPSHOT_FILE = repro.SNAPSHOT_FILE  # next to the copied package: the git state it was copied from
CLUSTERS = ("slurm", "local", "debug")  # submitit executors; "local"/"debug" test the same path without SLURM
EVAL_ON_TRAIN_SHAPE = "train"
EVAL_DEVICES = (EVAL_ON_TRAIN_SHAPE, "1")  # grid launch --eval-devices (its default: "train" for sharded protocols)
# The evaluations chained by --eval are the registry's chained protocols (ssl_bench.eval.protocol.chained_names);
# cli/grid.py checks the names, since launch/ may not import eval/, and the job runs them through run/evaluate.py.


# ---------------------------------------------------------------------------------------------
# The code snapshot


def snapshot_code(destination: Path) -> dict[str, Any]:
    """Copy the ``ssl_bench`` package into ``destination`` and record the git state it came from.

    A dirty working tree is recorded as such, with its diff (``diff.patch``), so the run stays traceable.
    """
    import ssl_bench

    source = Path(ssl_bench.__file__).resolve().parent
    destination.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, destination / "ssl_bench", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    state = repro.git_state(source)
    state["source"] = str(source)
    state["copied_at"] = repro.utc_now()
    if state.get("dirty"):
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=source, capture_output=True, text=True)
        (destination / "diff.patch").write_text(diff.stdout)
        state["diff"] = str(destination / "diff.patch")
    (destination / SNAPSHOT_FILE).write_text(json.dumps(state, indent=2) + "\n")
    return state


# ---------------------------------------------------------------------------------------------
# Submission


@dataclass
class Submission:
    """What one ``grid launch --cluster slurm`` submitted (also a line of submissions.jsonl)."""

    id: str
    cluster: str
    profile: str
    snapshot: str
    submitted_at: str
    train_jobs: dict[str, str] = field(default_factory=dict)  # run id -> job id ("123_0")
    eval_jobs: dict[str, str] = field(default_factory=dict)
    arrays: list[str] = field(default_factory=list)
    submit_s: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # run id -> why not submitted
    jobs: list[Any] = field(default_factory=list, repr=False)  # submitit Job objects (not saved)

    def record(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("jobs")
        return data


def executor_parameters(profile: Profile, shape: JobShape, study: str, cluster: str) -> dict[str, Any]:
    """AutoExecutor parameters for jobs of one shape (slurm_* ones are ignored by local/debug)."""
    params: dict[str, Any] = {"name": f"ssl-bench-{study}", "timeout_min": profile.time_min,
                              "nodes": shape.nodes, "tasks_per_node": shape.tasks_per_node,
                              "cpus_per_task": profile.cpus_per_task}
    if shape.gpus_per_node:
        params["gpus_per_node"] = shape.gpus_per_node
    if cluster != "slurm":
        return params
    params.update({f"slurm_{k}": v for k, v in profile.slurm_options().items()})
    params["slurm_array_parallelism"] = profile.array_parallelism
    return params


def _setup_lines(profile: Profile, code_dir: Path) -> list[str]:
    exports = [f"export {k}={json.dumps(str(v))}" for k, v in profile.env.items()]
    return [*profile.setup, *exports, f'export PYTHONPATH="{code_dir}${{PYTHONPATH:+:$PYTHONPATH}}"',
            "export PYTHONUNBUFFERED=1"]


def job_config(spec: RunSpec, tags: bool = True) -> dict[str, Any]:
    """The run's config for the job: absolute runs_root (jobs may start elsewhere), W&B tags from axes."""
    cfg = dataclasses.replace(spec.config, tracking=dataclasses.replace(
        spec.config.tracking, runs_root=str(Path(spec.config.tracking.runs_root).resolve()),
        progress_bar=False,
        wandb_tags=[f"{k}={v}" for k, v in spec.axes] + [f"seed={spec.seed}"] if tags else []))
    return config_lib.to_dict(cfg)


def group_by_shape(specs: list[RunSpec], shape_of: Optional[Callable[[RunSpec], JobShape]] = None
                   ) -> dict[JobShape, list[RunSpec]]:
    """Runs by the shape of their job: the training job's by default, or ``shape_of``'s (eval jobs)."""
    groups: dict[JobShape, list[RunSpec]] = {}
    for spec in specs:
        groups.setdefault(shape_of(spec) if shape_of else job_shape(spec.config), []).append(spec)
    return groups


def validate_for_cluster(study: Study, profile: Profile, cluster: str,
                         train_size: Callable[[config_lib.Config], int]) -> list[str]:
    """Every run against the profile (and the live partition): raise on the impossible, return warnings.

    ``train_size(cfg)`` counts a run's training images (the caller builds the data: launch/ does not import it).
    """
    from ssl_bench.launch.profiles import check_run, effective_limits, partition_limits

    live = partition_limits(profile.partition) if cluster == "slurm" else None
    limits = effective_limits(profile, live)
    warnings: list[str] = []
    sizes: dict[str, int] = {}
    for spec in study.runs:
        key = repr(spec.config.data)
        if key not in sizes:
            sizes[key] = train_size(spec.config)
        label = f"run {spec.run_id} ({', '.join(f'{k}={v}' for k, v in spec.axes) or 'base'}, seed={spec.seed})"
        warnings += check_run(spec.config, profile, limits, label, sizes[key])
    return sorted(set(warnings))


def select_runs(study: Study, force: bool = False) -> tuple[list[RunSpec], dict[str, str]]:
    """Runs to submit: not completed (unless ``force``) and not already pending/running in SLURM.

    A failed or lost run (record said running, owner gone) is submitted again; its job resumes it.
    """
    states = {s.run_id: s for s in status.study_status(study)}
    chosen, skipped = [], {}
    for spec in study.runs:
        row = states[spec.run_id]
        if row.state in status.ACTIVE and row.job_id:
            skipped[spec.run_id] = f"already {row.state} as job {row.job_id}"
        elif row.state in (status.COMPLETED, status.COLLAPSED) and not force:
            skipped[spec.run_id] = "completed"
        elif row.state == status.CORRUPT and not force:  # the job would stop on it: say so before submitting
            skipped[spec.run_id] = f"{row.label}; repair or move it away, or use --force"
        else:
            chosen.append(spec)
    return chosen, skipped


def eval_shape(spec: RunSpec, eval_devices: str) -> JobShape:
    """The shape of a run's evaluation job: ``"train"``, the training job's nodes x devices; ``"1"``, one device."""
    train_shape = job_shape(spec.config)
    if eval_devices == EVAL_ON_TRAIN_SHAPE:
        return train_shape
    return JobShape(1, 1, 1 if train_shape.gpus_per_node else 0)


def submit(study: Study, specs: list[RunSpec], profile: Profile, cluster: str = "slurm",
           evals: list[str] = (), executor_factory: Any = None, force: bool = False,
           eval_devices: str = "1") -> Submission:
    """Snapshot the code and submit ``specs`` as one job array per job shape (one, normally).

    ``evals`` follow as one array per evaluation-job shape (``eval_devices``, see :func:`eval_shape`).
    """
    import submitit

    if cluster not in CLUSTERS:
        raise config_lib.ConfigError(f"--cluster {cluster!r}; valid: {', '.join(CLUSTERS)}")
    if eval_devices not in EVAL_DEVICES:
        raise config_lib.ConfigError(f"--eval-devices {eval_devices!r}; valid: {', '.join(EVAL_DEVICES)}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    base = study_root(study).resolve() / SLURM_DIR / stamp
    snapshot_code(base / "code")
    sub = Submission(stamp, cluster, profile.source or profile.name, str(base / "code"), repro.utc_now())
    factory = executor_factory or (lambda folder: submitit.AutoExecutor(
        folder=folder, cluster=cluster, slurm_max_num_timeout=profile.max_requeues))
    started = time.time()
    for shape, group in group_by_shape(specs).items():
        executor = factory(base / "submitit")
        executor.update_parameters(**executor_parameters(profile, shape, study.name, cluster))
        if cluster == "slurm":
            executor.update_parameters(slurm_setup=_setup_lines(profile, base / "code"))
        with executor.batch():
            jobs = [executor.submit(TrainJob(job_config(spec), spec.run_id, force)) for spec in group]
        sub.jobs.extend(jobs)
        sub.train_jobs.update({spec.run_id: str(job.job_id) for spec, job in zip(group, jobs)})
        sub.arrays.append(str(jobs[0].job_id).split("_")[0])
    sub.submit_s = round(time.time() - started, 3)
    if evals:
        _submit_evals(study, specs, profile, cluster, evals, base, sub, factory, eval_devices)
    append_submission(study, sub.record())
    return sub


def _submit_evals(study: Study, specs: list[RunSpec], profile: Profile, cluster: str, evals: list[str],
                  base: Path, sub: Submission, factory: Any, eval_devices: str) -> None:
    """Eval arrays (one per job shape) that start after every training array has ended (afterany: a
    failed run is skipped by its eval job)."""
    for shape, group in group_by_shape(specs, lambda spec: eval_shape(spec, eval_devices)).items():
        executor = factory(base / "submitit")
        executor.update_parameters(**executor_parameters(profile, shape, f"{study.name}-eval", cluster))
        if cluster == "slurm":
            executor.update_parameters(slurm_setup=_setup_lines(profile, base / "code"),
                                       slurm_additional_parameters={**profile.sbatch, "dependency": "afterany:" +
                                                                    ":".join(sub.arrays)})
        device = "cuda" if shape.gpus_per_node else "cpu"
        with executor.batch():
            jobs = [executor.submit(EvalJob(str(Path(spec.run_dir).resolve()), evals, device)) for spec in group]
        sub.jobs.extend(jobs)
        sub.eval_jobs.update({spec.run_id: str(job.job_id) for spec, job in zip(group, jobs)})


def dry_run_text(study: Study, specs: list[RunSpec], profile: Profile, evals: list[str] = (),
                 eval_devices: str = "1") -> str:
    """The sbatch header of each array that would be submitted, and the runs in it."""
    lines = []
    for shape, group in group_by_shape(specs).items():
        params = profile.sbatch_parameters(shape.nodes, shape.tasks_per_node)
        if shape.gpus_per_node:
            params["gpus_per_node"] = shape.gpus_per_node
        params["setup"] = _setup_lines(profile, Path("<snapshot>/code"))
        params["array_parallelism"] = profile.array_parallelism
        text = sbatch_text(job_name=f"ssl-bench-{study.name}", map_count=len(group), **params)
        lines.append(f"# array of {len(group)} run(s): {shape.nodes} node(s) x {shape.tasks_per_node} task(s) "
                     f"per node" + (f", {shape.gpus_per_node} GPU(s) per node" if shape.gpus_per_node else ""))
        lines += [ln for ln in text.splitlines() if ln.startswith(("#SBATCH", "export", "srun"))]
        for index, spec in enumerate(group):
            axes = ", ".join(f"{k}={v}" for k, v in spec.axes) or "base"
            lines.append(f"#   [{index}] {spec.run_id}  {axes}, seed={spec.seed}  -> {spec.run_dir}")
        lines.append("")
    if evals:
        for shape, group in group_by_shape(specs, lambda spec: eval_shape(spec, eval_devices)).items():
            lines.append(f"# then an eval array ({', '.join(evals)}) of {len(group)} job(s), {shape.nodes} node(s) x "
                         f"{shape.tasks_per_node} task(s) per node"
                         + (f", {shape.gpus_per_node} GPU(s) per node" if shape.gpus_per_node else "")
                         + ", --dependency=afterany:<training arrays>")
    return "\n".join(lines)


def sbatch_text(**params: Any) -> str:
    """The sbatch file submitit would write for ``params``, without submitting anything.

    Private submitit API, on purpose: submitit 1.5 renders this file only inside ``submit``
    (``SlurmExecutor._make_submission_file_text`` is private too) and has no public dry run.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    return _make_sbatch_string(command="python -u -m submitit.core._submit <folder>", folder="<submitit>/%j",
                               **params)


def print_flush(*parts: Any) -> None:
    print(*parts, flush=True, file=sys.stdout)


def wait(study: Study, sub: Submission, poll_s: float = 5.0, timeout_s: Optional[float] = None) -> dict[str, str]:
    """Poll until no run of ``sub`` is pending or running; print each state change. Returns run id -> state."""
    started = time.time()
    seen: dict[str, str] = {}
    while True:
        rows = {r.run_id: r for r in status.study_status(study) if r.run_id in sub.train_jobs}
        for run_id, row in rows.items():
            label = row.label
            if seen.get(run_id) != label:
                print_flush(f"[ssl-bench] {run_id} (job {row.job_id}): {label}"
                            + (f", step {row.last_step}" if row.last_step is not None else ""))
                seen[run_id] = label
        if not any(r.state in status.ACTIVE for r in rows.values()):
            return {run_id: r.state for run_id, r in rows.items()}
        if timeout_s is not None and time.time() - started > timeout_s:
            raise TimeoutError(f"runs still active after {timeout_s:.0f} s: "
                               f"{[k for k, r in rows.items() if r.state in status.ACTIVE]}")
        time.sleep(poll_s)
