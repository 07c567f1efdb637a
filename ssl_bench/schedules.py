"""Schedules as pure functions of the global step.

Follows DINO (Caron et al. 2021), facebookresearch/dino ``utils.cosine_scheduler``
and the teacher-temperature warmup of ``DINOLoss``: linear warmup, then a
half-cosine from the base value to the final value over the remaining steps. The teacher
temperature warms up per step (``linspace_at``) or, as the official code, per epoch
(``teacher_temp_per_epoch``, still a function of the global step).
"""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, base: float, final: float,
           warmup_steps: int = 0, warmup_start: float = 0.0) -> float:
    """Value at ``step`` of DINO's per-iteration cosine schedule.

    Same numbers as the official array ``cosine_scheduler(...)[step]``: warmup is
    ``linspace(warmup_start, base, warmup_steps)``, then for ``i = step - warmup_steps``
    ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` with ``n = total - warmup``.
    Steps past the end keep the last value.
    """
    step = min(step, max(total_steps - 1, 0))
    if step < warmup_steps:
        return linspace_at(step, warmup_steps, warmup_start, base)
    n = max(total_steps - warmup_steps, 1)
    i = step - warmup_steps
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


def linspace_at(step: int, num: int, start: float, end: float) -> float:
    """``numpy.linspace(start, end, num)[step]``, and ``end`` past it (``step >= num``).

    As numpy, a one-point warmup is its ``start``: official DINO's ``cosine_scheduler`` with one
    warmup iteration gives lr 0 at step 0, and a one-epoch teacher-temperature warmup its start value.
    """
    if step >= num:
        return end
    if num == 1:
        return start
    return start + (end - start) * step / (num - 1)


def teacher_temp_per_epoch(step: int, steps_per_epoch: int, warmup_epochs: int, start: float, end: float) -> float:
    """DINO's teacher temperature at global ``step``, held constant within each epoch.

    The official ``DINOLoss.teacher_temp_schedule[epoch]``: ``linspace(start, end, warmup_epochs)`` for the
    first ``warmup_epochs`` epochs, then ``end``, with ``epoch = step // steps_per_epoch``.
    """
    return linspace_at(step // max(steps_per_epoch, 1), warmup_epochs, start, end)


def scaled_lr(base_lr: float, total_batch_size: int, rule: str = "linear_256") -> float:
    """DINO's linear rule ``lr * B / 256`` or DINOv2's ``lr * sqrt(B / 1024)`` (``sqrt_1024``)."""
    if rule == "linear_256":
        return base_lr * total_batch_size / 256.0
    if rule == "sqrt_1024":
        return base_lr * math.sqrt(total_batch_size / 1024.0)
    raise ValueError(f"unknown lr scaling rule {rule!r}; valid: linear_256, sqrt_1024")
