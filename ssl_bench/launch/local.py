"""Local launcher: runs a study's runs one after another in this process."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ssl_bench.launch.grid import RunSpec, Study


@dataclass
class LaunchSummary:
    completed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    stopped: str | None = None  # why the study stopped before its last run (a SIGTERM)
    not_started: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed and self.stopped is None


def launch_local(study: Study, force: bool = False) -> LaunchSummary:
    """Run every run not yet completed; a failure is recorded and the next run still starts.

    A SIGTERM (``kill``, ``timeout``, a scheduler other than SLURM) stops the whole study, as Ctrl-C
    does: the run it hit checkpoints its step and is recorded as preempted, the runs after it are not
    started, and the same command resumes where it stopped.
    """
    from ssl_bench.run import train  # lazy: pulls in torch
    from ssl_bench.run.preemption import Preempted

    summary = LaunchSummary()
    total = len(study.runs)
    for i, spec in enumerate(study.runs, 1):
        header = f"[{i}/{total}] {spec.run_id} ({describe(spec)})"
        started = time.time()
        print(f"{header}: starting in {spec.run_dir}", flush=True)
        try:
            result = train.run(spec.config, force=force)
        except Preempted as exc:
            summary.failed[spec.run_id] = str(exc)
            summary.not_started = [s.run_id for s in study.runs[i:]]
            summary.stopped = (f"a SIGTERM during {spec.run_id} ({exc}); {len(summary.not_started)} later run(s) not "
                               f"started; the same command resumes from the checkpoint")
            print(f"{header}: stopped by SIGTERM after {time.time() - started:.0f}s ({exc}); the study stops here",
                  flush=True)
            break
        except Exception as exc:  # KeyboardInterrupt stops the whole study
            summary.failed[spec.run_id] = f"{type(exc).__name__}: {exc}"
            print(f"{header}: FAILED after {time.time() - started:.0f}s: {exc} (see {spec.run_dir}/result.json)",
                  flush=True)
            continue
        if result.skipped:
            summary.skipped.append(spec.run_id)
            print(f"{header}: already completed, skipped", flush=True)
        else:
            summary.completed.append(spec.run_id)
            knn = result.metrics.get("knn_top1")
            knn_s = f"k-NN top-1 {knn:.2f}%" if knn is not None else "no k-NN"
            print(f"{header}: completed in {time.time() - started:.0f}s, {knn_s}", flush=True)
    return summary


def describe(spec: RunSpec) -> str:
    return ", ".join([f"{k}={v}" for k, v in spec.axes] + [f"seed={spec.seed}"])
