"""Distributed centering and Sinkhorn-Knopp: 2 gloo processes == 1 process on the same global batch.

One module-scoped fixture spawns 2 CPU ranks once (gloo, file:// rendezvous under a tmp dir).
Each rank first computes everything on its own rows *without* a process group (the negative
control), then joins the group and computes the same things again; it ``torch.save``s both to
``rank{r}.pt``. The parent compares against a single-process run on the whole batch.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssl_bench import dist
from tests.gloo_ranks import run_ranks
from ssl_bench.losses import Centering, sinkhorn_knopp

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
BATCH, K = 8, 16
TEACHER_TEMP = 0.1
MOMENTUM = 0.9
ATOL = 1e-6
# Rows of the global batch owned by each rank.
EQUAL_SPLIT = [(0, 4), (4, 8)]
UNEQUAL_SPLIT = [(0, 3), (3, 8)]


def _global_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """Two deterministic (BATCH, K) global batches of teacher logits, one per centering step."""
    gen = torch.Generator().manual_seed(1234)
    first = torch.randn(BATCH, K, generator=gen) * 2.0
    second = torch.randn(BATCH, K, generator=gen) * 2.0 + 0.5
    return first, second


def _compute(rank: int) -> dict[str, Any]:
    """Everything a rank computes on its own rows; collectives run iff a group is initialised."""
    first, second = _global_batches()
    lo, hi = EQUAL_SPLIT[rank]
    ulo, uhi = UNEQUAL_SPLIT[rank]
    centering = Centering(K, momentum=MOMENTUM)
    centering.update(first[lo:hi])
    center_1 = centering.center.clone()
    centering.update(second[lo:hi])
    center_2 = centering.center.clone()
    return {
        "world_size": dist.world_size(),
        "rank": dist.rank(),
        "sk_equal": sinkhorn_knopp(first[lo:hi], TEACHER_TEMP),
        "sk_unequal": sinkhorn_knopp(first[ulo:uhi], TEACHER_TEMP),
        "center_1": center_1,
        "center_2": center_2,
    }


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("ddp")
    return run_ranks(_compute, out_dir, WORLD_SIZE)


@pytest.fixture(scope="module")
def reference() -> dict[str, Any]:
    """Single process, whole global batch."""
    assert not dist.is_distributed()
    first, second = _global_batches()
    centering = Centering(K, momentum=MOMENTUM)
    centering.update(first)
    center_1 = centering.center.clone()
    centering.update(second)
    return {"sk": sinkhorn_knopp(first, TEACHER_TEMP), "center_1": center_1, "center_2": centering.center.clone()}


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    def message(default: str) -> str:
        diff = (actual - expected).abs()
        worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        return (f"{what}: max |2-rank - 1-process| = {diff.max().item():.3e} at {worst} "
                f"(2-rank {actual[worst].item():.8f} vs 1-process {expected[worst].item():.8f}), atol {ATOL}\n"
                f"{default}")

    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0.0, msg=message)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_ranks_really_ran_distributed(ranks):
    for r, result in enumerate(ranks):
        assert (result["distributed"]["rank"], result["distributed"]["world_size"]) == (r, WORLD_SIZE)
        assert (result["local"]["rank"], result["local"]["world_size"]) == (0, 1)


@pytest.mark.parametrize("split_name, split", [("equal 4+4", EQUAL_SPLIT), ("unequal 3+5", UNEQUAL_SPLIT)])
def test_sinkhorn_knopp_matches_single_process(ranks, reference, split_name, split):
    key = "sk_equal" if split == EQUAL_SPLIT else "sk_unequal"
    for r, (lo, hi) in enumerate(split):
        _assert_close(ranks[r]["distributed"][key], reference["sk"][lo:hi],
                      f"Sinkhorn-Knopp, {split_name} split, rank {r} rows {lo}:{hi}")
    gathered = torch.cat([ranks[r]["distributed"][key] for r in range(WORLD_SIZE)])
    _assert_close(gathered, reference["sk"], f"Sinkhorn-Knopp, {split_name} split, concatenated ranks")
    # Sanity on the reference itself: rows are probability vectors.
    torch.testing.assert_close(gathered.sum(dim=1), torch.ones(BATCH), atol=1e-5, rtol=0.0)


@pytest.mark.parametrize("step", [1, 2])
def test_centering_matches_single_process(ranks, reference, step):
    key = f"center_{step}"
    for r in range(WORLD_SIZE):
        _assert_close(ranks[r]["distributed"][key], reference[key],
                      f"Centering after {step} update(s), equal 4+4 split, rank {r}")


def test_negative_control_without_process_group_results_differ(ranks, reference):
    """Without init_process_group each rank normalises only its own rows: the comparison must notice."""
    for key, split in [("sk_equal", EQUAL_SPLIT), ("sk_unequal", UNEQUAL_SPLIT)]:
        local = torch.cat([ranks[r]["local"][key] for r in range(WORLD_SIZE)])
        assert _max_diff(local, reference["sk"]) > 100 * ATOL, (
            f"{key}: per-rank Sinkhorn-Knopp without a process group should differ from the full batch")
    for step in (1, 2):
        key = f"center_{step}"
        for r in range(WORLD_SIZE):
            assert _max_diff(ranks[r]["local"][key], reference[key]) > 100 * ATOL, (
                f"{key} rank {r}: a center from half the batch should differ from the full-batch center")
