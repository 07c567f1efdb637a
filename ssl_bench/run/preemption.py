"""Preemption of a training run: a request flag a signal handler may set, agreed by all ranks.

SLURM sends a signal before it preempts or times out a job; submitit's checkpoint hook
(launch/jobs.py) sets the request, and training saves a checkpoint at the next step boundary
that every rank agrees on, then raises :class:`Preempted` for the launcher to requeue.
"""

from __future__ import annotations

import torch

from ssl_bench import dist

_state = {"requested": False, "training": False}


class Preempted(Exception):
    """Training stopped on a preemption request; ``checkpoints/last.ckpt`` holds step ``step``."""

    def __init__(self, step: int) -> None:
        super().__init__(f"preempted: checkpoint saved at step {step}")
        self.step = step


def request_preemption_checkpoint() -> None:
    """Ask the training loop to checkpoint at the end of the current step and stop (safe in a signal handler)."""
    _state["requested"] = True


def preemption_requested() -> bool:
    return _state["requested"]


def clear_preemption_request() -> None:
    _state["requested"] = False


def set_training_active(active: bool) -> None:
    """Called by the checkpoint callback as training starts and ends (or fails)."""
    _state["training"] = active


def training_active() -> bool:
    """True while the training loop runs, i.e. while a request is answered at the end of the current step."""
    return _state["training"]


def agreed_preemption(device: torch.device, also: bool = False) -> bool:
    """Whether any rank has a preemption request (or ``also``): all-reduce max, so every rank stops at the same step."""
    requested = preemption_requested() or also
    if not dist.is_distributed():
        return requested  # no device tensor, no synchronisation in one process
    flag = torch.tensor([1.0 if requested else 0.0], device=device)
    return bool(dist.all_reduce_max(flag).item() > 0)
