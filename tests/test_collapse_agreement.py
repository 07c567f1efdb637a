"""Under DDP every rank judges collapse on the same numbers, so ``train.stop_on_collapse`` stops all ranks together.

Each rank measures the diagnostics on its own batch. ``callbacks.agree`` averages them in one all-reduce before
the monitor decides. Two gloo ranks whose own batches disagree (rank 0 sees a near-zero teacher entropy, rank 1 a
healthy one) must reach the same decision at the same step. Alone, as the control, they do not.
"""

from __future__ import annotations

import math

import pytest

from ssl_bench import tracking
from ssl_bench.eval.collapse import CollapseMonitor
from ssl_bench.run.callbacks import agree
from tests.gloo_ranks import run_ranks

K = 64
STEPS = 8


def _values(rank: int, step: int) -> dict[str, float]:
    """Rank 0: entropy 0.05 nats (one prototype dominates); rank 1: 0.6 log K. KL 0.5 on both."""
    entropy = 0.05 if rank == 0 else 0.6 * math.log(K)
    return {tracking.TEACHER_ENTROPY: entropy, tracking.KL_TEACHER_STUDENT: 0.5 + 0.01 * step,
            tracking.RANKME: 10.0 + rank, tracking.FEATURE_STD: 0.1}


def decide(rank: int) -> dict:
    monitor = CollapseMonitor(num_prototypes=K, window=2)
    seen, decisions = [], []
    for step in range(STEPS):
        values = agree(_values(rank, step))
        seen.append(values)
        decisions.append(monitor.update(step, values[tracking.TEACHER_ENTROPY], values[tracking.KL_TEACHER_STUDENT]))
    return {"values": seen, "decisions": decisions, "collapsed_step": monitor.collapsed_step}


@pytest.mark.ddp
def test_ranks_with_different_batches_agree_on_collapse(tmp_path):
    ranks = run_ranks(decide, tmp_path)
    alone = [r["local"] for r in ranks]
    together = [r["distributed"] for r in ranks]
    # The control: alone, rank 0 calls collapse at its window's first step and rank 1 never does.
    assert alone[0]["collapsed_step"] == 0 and alone[1]["collapsed_step"] is None
    # Together: the same averaged numbers, hence the same decision at every step, on both ranks.
    assert together[0]["values"] == together[1]["values"]
    mean_entropy = (0.05 + 0.6 * math.log(K)) / 2
    assert together[0]["values"][0][tracking.TEACHER_ENTROPY] == pytest.approx(mean_entropy, abs=1e-12)
    assert together[0]["decisions"] == together[1]["decisions"]
    assert together[0]["collapsed_step"] == together[1]["collapsed_step"]


def test_agree_is_the_identity_in_one_process():
    values = _values(0, 3)
    assert agree(values) == values
