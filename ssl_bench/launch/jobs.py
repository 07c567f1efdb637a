"""What runs inside a SLURM job: training one run (requeueable) and the evaluations chained after it."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from ssl_bench import config as config_lib
from ssl_bench import repro


def distributed_env(environ: dict[str, str]) -> dict[str, str]:
    """MASTER_ADDR/MASTER_PORT for a job's DDP rendezvous, derived from its allocation.

    The first node of ``SLURM_JOB_NODELIST`` hosts rank 0; the port is a function of the job id, so
    every task of a job agrees on it and two jobs sharing a node do not collide. Values the user set
    (profile ``env``) win.
    """
    out: dict[str, str] = {}
    job_id = environ.get("SLURM_JOB_ID")
    if job_id is None:
        return out
    nodelist = environ.get("SLURM_JOB_NODELIST", "")
    if "MASTER_ADDR" not in environ and nodelist:
        from lightning.pytorch.plugins.environments import SLURMEnvironment  # lazy: pulls in torch

        out["MASTER_ADDR"] = SLURMEnvironment.resolve_root_node_address(nodelist)  # "n[1-2],gpu7" -> "n1"
    if "MASTER_PORT" not in environ:
        out["MASTER_PORT"] = str(20000 + int(job_id) % 20000)
    return out


class TrainJob:
    """The callable of one array element: train one run (resuming it if a checkpoint exists)."""

    def __init__(self, config_tree: dict[str, Any], run_id: str, force: bool = False) -> None:
        self.config_tree = config_tree
        self.run_id = run_id
        self.force = force  # only the first start; a requeued job resumes

    def __call__(self) -> dict[str, Any]:
        from ssl_bench.run import preemption
        from ssl_bench.run import train

        os.environ.update(distributed_env(dict(os.environ)))
        cfg = config_lib.from_dict(self.config_tree)
        _record_job_start(config_lib.run_dir(cfg))
        submitit_handler = signal.getsignal(signal.SIGUSR2)

        def on_warning(signum: int, frame: Any) -> None:
            # Inside the training loop the checkpoint is taken at the end of the current step, then
            # submitit's handler requeues; elsewhere (evaluation) requeue at once from the last checkpoint.
            if preemption.training_active():
                print(f"[ssl-bench] signal {signum}: checkpointing {self.run_id} at the end of this step", flush=True)
                preemption.request_preemption_checkpoint()
            elif callable(submitit_handler):
                submitit_handler(signum, frame)

        signal.signal(signal.SIGUSR2, on_warning)
        force, self.force = self.force, False  # checkpoint() pickles self: the requeued job must not restart
        try:
            result = train.run(cfg, force=force)
        except preemption.Preempted as exc:
            print(f"[ssl-bench] {self.run_id}: checkpoint saved at step {exc.step}; requeueing", flush=True)
            if callable(submitit_handler) and repro.launch_rank(cfg.trainer.devices) == 0:
                submitit_handler(signal.SIGUSR2, None)  # calls self.checkpoint(), scontrol requeue, exits
            return {"run_id": self.run_id, "status": "preempted", "step": exc.step}
        return {"run_id": self.run_id, "status": result.status, "metrics": result.metrics,
                "run_dir": str(result.run_dir), "skipped": result.skipped}

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit: the job to requeue is this same job; ``train.run`` resumes from the run's checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _record_job_start(directory: Path) -> None:
    """Append this job's SLURM identity to ``<run_dir>/slurm.jsonl`` (rank 0 only)."""
    if os.environ.get("SLURM_PROCID", "0") != "0" or "SLURM_JOB_ID" not in os.environ:
        return
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    entry = {"job_id": job_id, "raw_job_id": os.environ["SLURM_JOB_ID"],
             "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
             "nodelist": os.environ.get("SLURM_JOB_NODELIST"), "ntasks": os.environ.get("SLURM_NTASKS"),
             "host": os.uname().nodename, "started_at": repro.utc_now()}
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "slurm.jsonl").open("a") as fh:
        fh.write(json.dumps(entry) + "\n")


class EvalJob:
    """Evaluations chained after training (``--eval knn,linear``): each run that completed is evaluated.

    ``kinds`` are names of the evaluation registry (``ssl_bench.eval.protocol``), read lazily in the
    job through ``run.evaluate``: launch/ does not import eval/. A job of several tasks forms one
    process group (rendezvous from the SLURM allocation, NCCL on GPUs, gloo on CPUs): k-NN and the
    linear probe shard their feature extraction over its ranks, other protocols run on rank 0.
    """

    def __init__(self, run_dir: str, kinds: list[str], device: str = "auto") -> None:
        self.run_dir, self.kinds, self.device = run_dir, list(kinds), device

    def __call__(self) -> dict[str, Any]:
        from ssl_bench import tracking
        from ssl_bench.run import evaluate

        result = tracking.read_result(Path(self.run_dir)) or {}
        if result.get("status") != tracking.STATUS_COMPLETED:  # every task reads it before any joins the group
            return {"run_dir": self.run_dir, "skipped": f"training status is {result.get('status', 'missing')!r}"}
        os.environ.update(distributed_env(dict(os.environ)))
        done, ranks = evaluate.evaluate_launched(self.run_dir, self.kinds, self.device, "slurm")
        return {"run_dir": self.run_dir, "evals": done, "ranks": ranks}
