"""k-NN with the bank sharded over 2 gloo processes == the same k-NN in one process on the whole bank.

One module-scoped fixture spawns 2 CPU ranks once (gloo, file:// rendezvous under a tmp dir), as in
``tests/losses/test_distributed.py``. Each rank holds only its contiguous rows of the bank and the
full test set; it first searches its shard without a process group (the negative control), then
with ``sharded=True`` inside the group, and ``torch.save``s both. The parent compares with a
single-process run. Cases: an uneven 19/18 split (``shard_range``), a 3/34 split where rank 0's
shard is smaller than k, an empty shard, an fp16 bank with blocks, and exact ties (lattice
features, duplicate rows with other labels placed on the other rank).

Non-finite cases: NaN/inf in one rank's shard, on both, in the test features, an all-NaN bank beside
an empty shard. Every rank must raise ``NonFiniteFeaturesError`` with the global counts (a rank whose
own shard is clean too, instead of waiting in a collective), and the group must stay usable after.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssl_bench import dist
from tests.gloo_ranks import run_ranks
from ssl_bench.eval.finite import NonFiniteFeaturesError
from ssl_bench.eval.knn import knn_accuracies, knn_neighbours, shard_range

pytestmark = pytest.mark.ddp

WORLD_SIZE = 2
N_BANK, N_TEST, CLASSES, TEMPERATURE = 37, 13, 5, 0.07
KS = [1, 5, 10, 50]  # 50 > bank size: capped at 37
# name -> (split: rows [start, stop) per rank, features, chunk_size, bank_block, fp16_bank)
CASES = {
    "shard_range 19/18": ([shard_range(N_BANK, r, WORLD_SIZE) for r in range(WORLD_SIZE)], "gaussian", 4, None, False),
    "3/34, shard < k, blocks": ([(0, 3), (3, 37)], "gaussian", 5, 7, False),
    "empty shard": ([(0, 0), (0, 37)], "gaussian", 1024, None, False),
    "fp16 bank, blocks": ([(0, 19), (19, 37)], "gaussian", 3, 8, True),
    "exact ties": ([(0, 19), (19, 37)], "lattice", 4, 5, False),
}


# name -> (split, chunk_size, bank_block, fp16_bank, what, bad rows, rows, NaN values, inf values)
NONFINITE = {
    "nan on rank 1 only": ([(0, 19), (19, 37)], 4, None, False, "k-NN bank features", 1, 37, 8, 0),
    "nan and inf on both ranks, fp16": ([(0, 19), (19, 37)], 3, 8, True, "k-NN bank features", 2, 37, 1, 2),
    "nan in test": ([(0, 19), (19, 37)], 5, 7, False, "k-NN test features", 1, 13, 1, 0),
    "all nan beside an empty shard": ([(0, 0), (0, 37)], 1024, None, False, "k-NN bank features", 37, 37, 296, 0),
}


def _poisoned(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bank, labels, test, test_labels = _data("gaussian")
    if name == "nan on rank 1 only":
        bank[25] = float("nan")
    elif name == "nan and inf on both ranks, fp16":
        bank[2, 0], bank[30, 3], bank[30, 4] = float("inf"), float("-inf"), float("nan")
    elif name == "nan in test":
        test[5, 1] = float("nan")
    else:
        bank[:] = float("nan")
    return bank, labels, test, test_labels


def _compute_nonfinite(rank: int) -> dict[str, Any]:
    """Per case: the error's (message, counts) on this rank, or the accuracies if nothing was raised."""
    out = {}
    for name, (split, chunk, block, fp16, *_) in NONFINITE.items():
        bank, labels, test, test_labels = _poisoned(name)
        lo, hi = split[rank]
        if hi == lo and not dist.is_distributed():
            continue
        try:
            out[name] = knn_accuracies(bank[lo:hi], labels[lo:hi], test, test_labels, KS, TEMPERATURE, CLASSES,
                                       chunk, bank_block=block, fp16_bank=fp16, sharded=True)
        except NonFiniteFeaturesError as err:
            out[name] = (str(err), (err.what, err.bad_rows, err.rows, err.nan, err.inf))
    return out


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(bank, bank labels, test, test labels); the same on every process."""
    gen = torch.Generator().manual_seed(11)
    if kind == "gaussian":
        bank, test = torch.randn(N_BANK, 8, generator=gen), torch.randn(N_TEST, 8, generator=gen)
    else:  # 4 entries of +-1: every similarity is a multiple of 0.25, exact in any summation order
        signs = torch.randint(0, 2, (N_BANK + N_TEST, 8), generator=gen).float() * 2 - 1
        mask = torch.rand(N_BANK + N_TEST, 8, generator=gen).argsort(dim=1) < 4
        bank, test = (signs * mask).split([N_BANK, N_TEST])
        bank = bank.clone()
        bank[30:34] = bank[2:6]  # duplicates on rank 1 of rows on rank 0 ...
    labels = torch.randint(0, CLASSES, (N_BANK,), generator=gen)
    if kind == "lattice":
        labels[30:34] = (labels[2:6] + 1) % CLASSES  # ... with other labels, so the tie rule matters
    return bank, labels, test, torch.randint(0, CLASSES, (N_TEST,), generator=gen)


def _compute(rank: int) -> dict[str, Any]:
    """Every case on this rank's shard; collectives run iff a process group is initialised."""
    out = {"world_size": dist.world_size(), "rank": dist.rank()}
    for name, (split, kind, chunk, block, fp16) in CASES.items():
        bank, labels, test, test_labels = _data(kind)
        lo, hi = split[rank]
        if hi == lo and not dist.is_distributed():  # an empty bank alone cannot be searched
            out[name] = None
            continue
        kwargs = {"bank_block": block, "fp16_bank": fp16, "sharded": True}
        out[name] = {"neighbours": knn_neighbours(bank[lo:hi], labels[lo:hi], test, max(KS), chunk, **kwargs),
                     "accs": knn_accuracies(bank[lo:hi], labels[lo:hi], test, test_labels, KS, TEMPERATURE,
                                            CLASSES, chunk, **kwargs)}
    out["nonfinite"] = _compute_nonfinite(rank)
    bank, labels, test, test_labels = _data("gaussian")  # after the errors: the group still works
    lo, hi = shard_range(N_BANK, rank, WORLD_SIZE)
    out["after errors"] = knn_accuracies(bank[lo:hi], labels[lo:hi], test, test_labels, KS, TEMPERATURE, CLASSES,
                                         4, sharded=True)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, Any]]:
    out_dir = tmp_path_factory.mktemp("knn_ddp")
    return run_ranks(_compute, out_dir, WORLD_SIZE)


def _reference(name: str) -> dict[str, Any]:
    """One process, whole bank, same chunking, blocks and dtype."""
    assert not dist.is_distributed()
    _, kind, chunk, block, fp16 = CASES[name]
    bank, labels, test, test_labels = _data(kind)
    kwargs = {"bank_block": block, "fp16_bank": fp16}
    return {"neighbours": knn_neighbours(bank, labels, test, max(KS), chunk, **kwargs),
            "accs": knn_accuracies(bank, labels, test, test_labels, KS, TEMPERATURE, CLASSES, chunk, **kwargs)}


def test_ranks_really_ran_distributed(ranks):
    for r, result in enumerate(ranks):
        assert (result["distributed"]["rank"], result["distributed"]["world_size"]) == (r, WORLD_SIZE)
        assert (result["local"]["rank"], result["local"]["world_size"]) == (0, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_equals_the_single_process_result(ranks, name):
    ref = _reference(name)
    exact_sims = CASES[name][1] == "lattice"
    for r in range(WORLD_SIZE):
        got = ranks[r]["distributed"][name]
        assert got["neighbours"].indices.tolist() == ref["neighbours"].indices.tolist(), f"rank {r} indices"
        assert got["neighbours"].labels.tolist() == ref["neighbours"].labels.tolist(), f"rank {r} labels"
        if exact_sims:
            assert torch.equal(got["neighbours"].sims, ref["neighbours"].sims), f"rank {r} sims"
        else:  # other matmul shapes may round a dot product differently by ~1 ulp
            torch.testing.assert_close(got["neighbours"].sims, ref["neighbours"].sims, atol=1e-6, rtol=0)
        assert got["accs"] == ref["accs"], f"rank {r} accuracies"
    assert ref["neighbours"].indices.shape == (N_TEST, N_BANK)  # k = 50 capped at the global bank size


def test_exact_tie_case_really_has_cross_rank_ties():
    """The duplicates of rows 2..5 (rank 0) at rows 30..33 (rank 1) tie, and the lower index comes first."""
    ref = _reference("exact ties")["neighbours"]
    for row_idx, row_sims in zip(ref.indices.tolist(), ref.sims.tolist()):
        pos = {j: p for p, j in enumerate(row_idx)}
        for j in range(2, 6):
            assert row_sims[pos[j]] == row_sims[pos[j + 28]] and pos[j] < pos[j + 28]


def test_negative_control_shards_alone_differ(ranks):
    """Without a process group a rank sees only its shard (local indices): the comparison must notice."""
    for name in CASES:
        ref = _reference(name)
        for r in range(WORLD_SIZE):
            local = ranks[r]["local"][name]
            if local is None or CASES[name][0][r] == (0, N_BANK):  # empty shard, or the whole bank
                continue
            assert local["neighbours"].indices.tolist() != ref["neighbours"].indices.tolist(), (name, r)


@pytest.mark.parametrize("name", list(NONFINITE))
def test_non_finite_features_raise_on_every_rank_with_global_counts(ranks, name):
    _, _, _, _, what, bad_rows, rows, nan, inf = NONFINITE[name]
    message = (f"{what}: {bad_rows} of {rows} rows (samples) hold NaN or inf ({nan} NaN and {inf} inf among "
               f"{rows * 8} values)")
    for r in range(WORLD_SIZE):
        got = ranks[r]["distributed"]["nonfinite"][name]
        assert isinstance(got, tuple), f"rank {r} reported accuracies {got}"
        assert got[0].startswith(message) and got[1] == (what, bad_rows, rows, nan, inf), (r, got)


def test_group_is_usable_after_non_finite_errors(ranks):
    bank, labels, test, test_labels = _data("gaussian")
    ref = knn_accuracies(bank, labels, test, test_labels, KS, TEMPERATURE, CLASSES, 4)
    assert all(ranks[r]["distributed"]["after errors"] == ref for r in range(WORLD_SIZE))


def test_negative_control_a_clean_shard_alone_sees_no_nan(ranks):
    """Rank 0's own shard is clean: only the all-reduced counts make it raise inside the group."""
    local = ranks[0]["local"]["nonfinite"]["nan on rank 1 only"]
    assert isinstance(local, dict) and 0 <= local[1]["top1"] <= 100
