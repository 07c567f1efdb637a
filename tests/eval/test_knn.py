"""Weighted k-NN against a brute-force loop over every test item, plus tie, block, fp16 and edge cases.

The brute force sorts every bank item by descending similarity with Python's stable sort, so ties
keep ascending bank index: the canonical neighbour order. Exact-tie tests use "lattice" features
(4 entries of +-1, the rest 0): normalised entries are +-0.5, so every dot product is a multiple of
0.25 computed exactly in any summation order, and ties are exact in every layout.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_bench.eval.knn import (FP16_SIM_ATOL, knn_accuracies, knn_classify, knn_neighbours, knn_topk,
                                label_rank, normalised_bank, shard_range)
from ssl_bench import dist


def brute_force_neighbours(train, labels, test, k):
    """Per test item: [(sim, bank index, label)] of the k nearest, canonical order, from 1-D dot products."""
    train = F.normalize(train.float(), dim=1)
    out = []
    for q in F.normalize(test.float(), dim=1):
        items = [(float(q @ t), j, int(y)) for j, (t, y) in enumerate(zip(train, labels))]
        items.sort(key=lambda s: -s[0])  # stable: equal sims stay in ascending index order
        out.append(items[:k])
    return out


def brute_force_scores(train, labels, test, k, T, C):
    out = torch.zeros(len(test), C)
    for i, items in enumerate(brute_force_neighbours(train, labels, test, k)):
        for s, _, y in items:
            out[i, y] += math.exp(s / T)
    return out


def brute_force_accuracy(scores, targets, top):
    """% of rows whose target is among the first ``top`` classes ordered by (-score, class index)."""
    hits = 0
    for row, y in zip(scores.tolist(), targets.tolist()):
        ranked = sorted(range(len(row)), key=lambda c: (-row[c], c))
        hits += y in ranked[:top]
    return 100.0 * hits / len(scores)


def lattice(n, dim, gen):
    """n vectors with exactly 4 entries of +-1 (norm 2), the rest 0."""
    out = torch.zeros(n, dim)
    for i in range(n):
        cols = torch.randperm(dim, generator=gen)[:4]
        out[i, cols] = torch.randint(0, 2, (4,), generator=gen).float() * 2 - 1
    return out


def gaussian_case(seed=0, n=40, m=11, dim=8, classes=4):
    g = torch.Generator().manual_seed(seed)
    train, test = torch.randn(n, dim, generator=g), torch.randn(m, dim, generator=g)
    return train, torch.randint(0, classes, (n,), generator=g), test


def min_gap(train, test):
    """Smallest gap between distinct sorted similarities: BLAS rounding (~1e-7) must not reorder them."""
    sims = (F.normalize(test, dim=1) @ F.normalize(train, dim=1).T).sort(dim=1).values
    return sims.diff(dim=1).min().item()


@pytest.mark.parametrize("k,chunk,block", [(1, 1024, None), (5, 3, None), (20, 7, None), (50, 1024, None),
                                           (5, 3, 1), (20, 4, 7), (50, 2, 16), (13, 1024, 39), (40, 5, 64)])
def test_knn_matches_brute_force(k, chunk, block):
    train, labels, test = gaussian_case()
    assert min_gap(train, test) > 1e-5  # no near-ties: the neighbour order is unambiguous
    ours = knn_classify(train, labels, test, k=k, temperature=0.07, num_classes=4, chunk_size=chunk, bank_block=block)
    ref = brute_force_scores(train, labels, test, min(k, 40), 0.07, 4)
    assert torch.allclose(ours, ref, rtol=1e-4)
    sims, idx = knn_topk(train, test, k, chunk, bank_block=block)
    expected = brute_force_neighbours(train, labels, test, k)
    assert idx.tolist() == [[j for _, j, _ in row] for row in expected]
    assert torch.allclose(sims, torch.tensor([[s for s, _, _ in row] for row in expected]), atol=1e-6)


@pytest.mark.parametrize("chunk,block", [(1024, None), (3, None), (4, 7), (1, 1), (5, 32)])
def test_knn_accuracies_match_brute_force_with_a_small_class(chunk, block):
    g = torch.Generator().manual_seed(3)
    train, test = torch.randn(60, 6, generator=g), torch.randn(25, 6, generator=g)
    labels = torch.randint(1, 6, (60,), generator=g)
    labels[[4, 41]] = 0  # class 0 has 2 items, fewer than every k but 1
    targets = torch.randint(0, 6, (25,), generator=g)
    accs = knn_accuracies(train, labels, test, targets, [1, 10, 20, 100], 0.07, 6, chunk, bank_block=block)
    for k in (1, 10, 20, 100):
        ref = brute_force_scores(train, labels, test, min(k, 60), 0.07, 6)
        assert accs[k]["top1"] == pytest.approx(brute_force_accuracy(ref, targets, 1))
        assert accs[k]["top5"] == pytest.approx(brute_force_accuracy(ref, targets, 5))
    assert len({accs[k]["top5"] for k in (1, 10, 20, 100)}) > 1  # k matters on this data


@pytest.mark.parametrize("k", [1, 5, 13, 100])
@pytest.mark.parametrize("chunk,block", [(1024, None), (4, None), (1, 7), (6, 1), (3, 32)])
def test_exact_ties_follow_the_canonical_order(k, chunk, block):
    g = torch.Generator().manual_seed(7)
    train, test = lattice(60, 8, g), lattice(15, 8, g)
    train[50:55] = train[3:8]  # duplicates, placed in other blocks, with other labels
    labels = torch.randint(0, 5, (60,), generator=g)
    labels[50:55] = (labels[3:8] + 1) % 5
    expected = brute_force_neighbours(train, labels, test, k)
    kth = torch.tensor([row[-1][0] for row in expected]).view(-1, 1)
    all_sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    if k < 60:  # the k-th value is tied beyond k somewhere, so a plain topk may pick any of them
        assert ((all_sims >= kth).sum(dim=1) > k).any()
    found = knn_neighbours(train, labels, test, k, chunk, bank_block=block)
    assert found.indices.tolist() == [[j for _, j, _ in row] for row in expected]
    assert found.labels.tolist() == [[y for _, _, y in row] for row in expected]
    assert found.sims.tolist() == [[s for s, _, _ in row] for row in expected]


def test_exact_ties_give_identical_accuracies_in_every_layout():
    g = torch.Generator().manual_seed(8)
    train, test = lattice(80, 8, g), lattice(30, 8, g)
    labels, targets = torch.randint(0, 7, (80,), generator=g), torch.randint(0, 7, (30,), generator=g)
    ks = [1, 3, 10, 20]
    ref = knn_accuracies(train, labels, test, targets, ks, 0.07, 7)
    for chunk, block in [(4, None), (1, 1), (7, 9), (30, 16)]:
        assert knn_accuracies(train, labels, test, targets, ks, 0.07, 7, chunk, bank_block=block) == ref


def test_duplicate_bank_rows_lower_index_wins_and_class_ties_go_to_lower_class():
    bank = torch.tensor([[0.0, 1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [2.0, 0.0]])
    labels = torch.tensor([2, 2, 1, 2, 2, 0])  # rows 2 and 5 are the same direction, labels 1 and 0
    query = torch.tensor([[3.0, 0.0]])
    for block in (None, 1, 3, 4):
        sims, idx = knn_topk(bank, query, 1, bank_block=block)
        assert idx.tolist() == [[2]] and sims.tolist() == [[1.0]]
        assert knn_accuracies(bank, labels, query, torch.tensor([1]), [1], 0.1, 3, bank_block=block)[1]["top1"] == 100
        # k=2: classes 1 and 0 get equal votes exp(1/T); the lower class (0) is ranked first.
        two = knn_accuracies(bank, labels, torch.cat([query, query]), torch.tensor([0, 1]), [2], 0.1, 3,
                             bank_block=block)[2]
        assert two == {"top1": 50.0, "top5": 100.0}


def test_label_rank_counts_higher_scores_and_lower_tied_classes():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    assert label_rank(scores, torch.tensor([2, 0])).tolist() == [1, 0]
    assert label_rank(scores, torch.tensor([0, 3])).tolist() == [2, 3]


def test_fp16_bank_within_tolerance_of_fp32():
    g = torch.Generator().manual_seed(5)
    centers = F.normalize(torch.randn(6, 32, generator=g), dim=1) * 4
    labels, targets = torch.arange(6).repeat_interleave(50), torch.arange(6).repeat_interleave(8)
    train = centers[labels] + torch.randn(300, 32, generator=g)
    test = centers[targets] + torch.randn(48, 32, generator=g)
    bank16 = normalised_bank(train, fp16=True)
    assert bank16.dtype == torch.float16 and bank16.element_size() * 2 == normalised_bank(train).element_size()
    s32, _ = knn_topk(train, test, 50, 16)
    s16, _ = knn_topk(train, test, 50, 16, fp16_bank=True, bank_block=64)
    diff = (s16 - s32).abs().max().item()
    assert 0 < diff <= 2 ** -11 <= FP16_SIM_ATOL  # CPU bound from the docstring; and the fp16 path really ran
    ks = [1, 10, 20, 50]
    acc32 = knn_accuracies(train, labels, test, targets, ks, 0.07, 6, 16)
    acc16 = knn_accuracies(train, labels, test, targets, ks, 0.07, 6, 16, fp16_bank=True, bank_block=64)
    assert acc16 == acc32 and acc32[20]["top1"] > 80  # identical, on clusters that are not trivially apart


def test_knn_hand_example():
    # bank on the unit circle; query at angle 0. k=2 neighbours: class 0 at 0 rad (sim 1), class 1 at 0.5 rad.
    angles = torch.tensor([0.0, 0.5, 2.0, 3.0])
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    scores = knn_classify(bank, torch.tensor([0, 1, 1, 1]), torch.tensor([[2.0, 0.0]]), k=2,
                          temperature=0.5, num_classes=2)
    assert scores[0, 0].item() == pytest.approx(math.exp(1 / 0.5))
    assert scores[0, 1].item() == pytest.approx(math.exp(math.cos(0.5) / 0.5))


def test_knn_accuracies_top1_top5_and_every_k():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(3).repeat_interleave(30)
    train = centers[labels] + torch.randn(90, 16, generator=g)
    test_labels = torch.arange(3).repeat_interleave(5)
    test = centers[test_labels] + torch.randn(15, 16, generator=g)
    accs = knn_accuracies(train, labels, test, test_labels, [10, 20, 200], 0.07, 3, chunk_size=4)
    assert set(accs) == {10, 20, 200}
    assert accs[20]["top1"] == 100.0 and accs[20]["top5"] == 100.0
    flipped = knn_accuracies(train, labels, test, (test_labels + 1) % 3, [20], 0.07, 3)
    assert flipped[20]["top1"] == 0.0
    assert flipped[20]["top5"] == 100.0  # 3 classes: top-5 is capped at top-3, always a hit


def test_knn_with_fewer_test_items_than_a_chunk_and_empty():
    train, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert knn_classify(train, labels, torch.randn(1, 4), 200, 0.07, 3).shape == (1, 3)
    assert knn_classify(train, labels, torch.randn(0, 4), 20, 0.07, 3).shape == (0, 3)
    sims, idx = knn_topk(train, torch.randn(0, 4), 200, bank_block=2)
    assert sims.shape == idx.shape == (0, 5)
    empty = knn_accuracies(train, labels, torch.randn(0, 4), torch.zeros(0), [1, 20], 0.07, 3, bank_block=2)
    assert set(empty) == {1, 20} and all(math.isnan(v) for acc in empty.values() for v in acc.values())


def test_invalid_sizes_and_empty_bank_raise():
    with pytest.raises(ValueError, match="non-empty bank"):
        knn_topk(torch.zeros(0, 4), torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match="k, chunk_size"):
        knn_topk(torch.randn(3, 4), torch.randn(3, 4), 0)
    with pytest.raises(ValueError, match="chunk_size"):
        knn_topk(torch.randn(3, 4), torch.randn(3, 4), 5, chunk_size=0)
    with pytest.raises(ValueError, match="bank_block"):
        knn_topk(torch.randn(3, 4), torch.randn(3, 4), 5, bank_block=0)


@pytest.mark.parametrize("n,world", [(37, 2), (0, 3), (1, 3), (10, 4), (12, 3), (5, 1)])
def test_shard_range_is_contiguous_and_balanced(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_shard_range_values_and_errors():
    assert [shard_range(37, r, 2) for r in range(2)] == [(0, 19), (19, 37)]
    assert [shard_range(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    with pytest.raises(ValueError):
        shard_range(5, 2, 2)


def test_all_gather_cat_is_identity_in_one_process():
    x = torch.arange(6).view(3, 2)
    assert dist.all_gather_cat(x) is x


def test_bench_knn_reports_figures_on_a_tiny_problem():
    from ssl_bench.bench.knn import bench_knn

    for method in ("full", "ours"):
        out = bench_knn(bank=300, dim=16, test=40, k=10, chunk_size=16, bank_block=64, fp16_bank=True,
                        classes=7, repeats=2, method=method)
        assert out["images_per_s"] > 0 and out["seconds"] > 0 and out["peak_rss_mb"] > 0
        assert 0 <= out["top1"] <= 100 and out["config"]["bank"] == 300 and out["method"] == method


# ---- non-finite features: an error with counts, never an accuracy ---------------------------------------

def _poison(case):
    """(bank (40, 8), test (11, 8), which tensor is bad, bad rows, NaN values, inf values)."""
    train, _, test = gaussian_case()
    if case == "nan in bank":
        train[[3, 17, 30], 2] = math.nan
        train[17, 5] = math.nan
        return train, test, "bank", 3, 4, 0
    if case == "nan in test":
        test[[0, 10]] = math.nan
        return train, test, "test", 2, 16, 0
    if case == "+inf in bank":
        train[8, 0] = math.inf
        return train, test, "bank", 1, 0, 1
    if case == "one nan value in one test row":
        test[4, 7] = math.nan
        return train, test, "test", 1, 1, 0
    assert case == "all nan"  # without the check: top-1 = 100% (see the negative control below)
    return torch.full_like(train, math.nan), torch.full_like(test, math.nan), "bank", 40, 320, 0


NONFINITE_CASES = ["nan in bank", "nan in test", "+inf in bank", "one nan value in one test row", "all nan"]
PATHS = {"plain": {}, "chunked": {"chunk_size": 3}, "blocked": {"chunk_size": 4, "bank_block": 7},
         "fp16 bank": {"chunk_size": 5, "bank_block": 16, "fp16_bank": True}}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_non_finite_features_never_give_an_accuracy(case, path):
    from ssl_bench.eval.finite import NonFiniteFeaturesError

    train, test, bad, rows, nan, inf = _poison(case)
    labels, targets = torch.arange(40) % 4, torch.arange(11) % 4
    kw = dict(PATHS[path])
    chunk = kw.pop("chunk_size", 1024)
    n, what = (40, "k-NN bank features") if bad == "bank" else (11, "k-NN test features")
    expected = (rf"^{what}: {rows} of {n} rows \(samples\) hold NaN or inf \({nan} NaN and {inf} inf among "
                rf"{n * 8} values\)")
    calls = [lambda: knn_accuracies(train, labels, test, targets, [1, 5, 20], 0.07, 4, chunk, **kw),
             lambda: knn_classify(train, labels, test, 5, 0.07, 4, chunk, **kw),
             lambda: knn_neighbours(train, labels, test, 5, chunk, **kw),
             lambda: knn_topk(train, test, 5, chunk, **kw)]
    for call in calls:
        with pytest.raises(NonFiniteFeaturesError, match=expected) as info:
            call()
        assert (info.value.bad_rows, info.value.rows, info.value.nan, info.value.inf) == (rows, n, nan, inf)


def test_negative_control_without_the_check_all_nan_scores_100_percent(monkeypatch):
    """What the check prevents: NaN similarities fail every comparison, so every label ranks first."""
    from ssl_bench.eval import knn

    monkeypatch.setattr(knn, "check_finite", lambda *a, **k: None)
    train, test, *_ = _poison("all nan")
    accs = knn.knn_accuracies(train, torch.arange(40) % 4, test, torch.arange(11) % 4, [1, 20], 0.07, 4)
    assert accs[20]["top1"] == 100.0


def test_finite_features_still_checked_once_per_tensor(monkeypatch):
    """One check of the bank and one of the test features per call, however many chunks and blocks."""
    from ssl_bench.eval import knn

    seen = []
    real = knn.check_finite
    monkeypatch.setattr(knn, "check_finite", lambda x, what, **k: seen.append(what) or real(x, what, **k))
    train, labels, test = gaussian_case()
    knn.knn_accuracies(train, labels, test, torch.arange(11) % 4, [1, 20], 0.07, 4, 2, bank_block=5)
    assert seen == ["k-NN bank features", "k-NN test features"]
