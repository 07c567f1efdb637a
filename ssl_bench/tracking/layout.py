"""The run directory's layout (DESIGN.md §1): the one place that names its files, statuses and metric keys.

Torch-free, so that report/ and launch/ can read run directories without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["CONFIG_FILE", "ENV_FILE", "METRICS_FILE", "RESULT_FILE", "CHECKPOINT_DIR", "LAST_CHECKPOINT",
           "PREVIOUS_CHECKPOINT", "CONSOLIDATED_SUFFIX", "ATTEMPTS_DIR", "EVALS_DIR", "FEATURES_DIR", "RESULT_LOCK",
           "EVALS_KEY",
           "COLLAPSE_PREFIX", "TEACHER_ENTROPY", "KL_TEACHER_STUDENT", "RANKME", "FEATURE_STD", "COLLAPSED",
           "STATUS_RUNNING", "STATUS_COMPLETED", "STATUS_FAILED", "STATUS_PREEMPTED", "UNFINISHED",
           "STEP_KEY_PREFIXES", "KNN_TOP1", "ONLINE_KNN_PREFIX", "FP16_SKIPPED_STEPS", "CheckpointFiles",
           "checkpoint_files"]

CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"  # the last.ckpt before the latest save: the fallback
CONSOLIDATED_SUFFIX = "-consolidated.ckpt"  # a sharded last.ckpt directory -> last-consolidated.ckpt (one file)
ATTEMPTS_DIR = "attempts"
EVALS_DIR = "evals"  # post-hoc evaluations (ssl-bench eval ...): one JSON record each
FEATURES_DIR = "features"  # cached frozen features, keyed by weights + data + preprocessing
RESULT_LOCK = ".result.lock"  # serialises concurrent evaluations writing one result.json
EVALS_KEY = "evals"  # result.json: the post-hoc evaluation records, by eval id

# Collapse diagnostics in metrics.jsonl (DINO Fig. 7; see eval/collapse.py).
COLLAPSE_PREFIX = "collapse/"  # + the names of eval.collapse.diagnostics()
TEACHER_ENTROPY = COLLAPSE_PREFIX + "teacher_entropy"
KL_TEACHER_STUDENT = COLLAPSE_PREFIX + "kl_teacher_student"
RANKME = COLLAPSE_PREFIX + "rankme"
FEATURE_STD = COLLAPSE_PREFIX + "feature_std"
COLLAPSED = COLLAPSE_PREFIX + "collapsed"

STATUS_RUNNING = "running"
STATUS_COMPLETED = "completed"
STATUS_FAILED = "failed"
STATUS_PREEMPTED = "preempted"
UNFINISHED = (STATUS_RUNNING, STATUS_FAILED, STATUS_PREEMPTED)
# metrics.jsonl keys logged by the training step of the line's step (redone after a resume from that step).
STEP_KEY_PREFIXES = ("train/", COLLAPSE_PREFIX)

KNN_TOP1 = "knn_top1"
# Online k-NN during training (eval.knn_every_n_epochs): knn/top1, knn/top5, knn/k{k}_top1 by step.
ONLINE_KNN_PREFIX = "knn/"
FP16_SKIPPED_STEPS = "train/fp16_skipped_steps"  # 16-mixed: steps the GradScaler skipped so far


@dataclass(frozen=True)
class CheckpointFiles:
    """The files a training checkpoint is read from: the checkpoint, its fallback, the run's config."""

    checkpoint: Path
    fallback: Path | None  # previous.ckpt of a run directory, read when last.ckpt cannot be
    config: Path | None  # the run's config.yaml; None for a checkpoint outside a run directory


def checkpoint_files(path: str | Path) -> CheckpointFiles | None:
    """What to read for ``path``: a run directory (last.ckpt, falling back to previous.ckpt) or a file.

    None for a directory without checkpoints. A checkpoint file named by the user is read as given,
    never replaced by another (no fallback); its run's config.yaml is used when it sits in a run.
    """
    path = Path(path)
    if path.is_dir():
        last, previous = path / CHECKPOINT_DIR / LAST_CHECKPOINT, path / CHECKPOINT_DIR / PREVIOUS_CHECKPOINT
        if not last.exists() and not previous.exists():  # files, or directories of shards (trainer.strategy=fsdp)
            return None
        return CheckpointFiles(last, previous if previous.exists() else None, path / CONFIG_FILE)
    config = path.parent.parent / CONFIG_FILE  # <run>/checkpoints/<file>
    return CheckpointFiles(path, None, config if config.is_file() else None)
