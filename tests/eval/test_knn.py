"""Weighted k-NN against a brute-force loop over every test item."""

import math

import pytest
import torch
import torch.nn.functional as F

from ssl_bench.eval.knn import knn_accuracies, knn_classify


def brute_force_scores(train, labels, test, k, T, C):
    train = F.normalize(train, dim=1)
    out = torch.zeros(len(test), C)
    for i, q in enumerate(F.normalize(test, dim=1)):
        sims = [(float(q @ t), int(y)) for t, y in zip(train, labels)]
        sims.sort(key=lambda s: -s[0])
        for s, y in sims[:k]:
            out[i, y] += math.exp(s / T)
    return out


@pytest.mark.parametrize("k,chunk", [(1, 1024), (5, 3), (20, 7), (50, 1024)])
def test_knn_matches_brute_force(k, chunk):
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 8, generator=g), torch.randn(11, 8, generator=g)
    labels = torch.randint(0, 4, (40,), generator=g)
    ours = knn_classify(train, labels, test, k=k, temperature=0.07, num_classes=4, chunk_size=chunk)
    ref = brute_force_scores(train, labels, test, min(k, 40), 0.07, 4)
    assert torch.allclose(ours, ref, rtol=1e-4)


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


def test_knn_with_fewer_test_items_than_a_chunk_and_empty():
    train, labels = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    assert knn_classify(train, labels, torch.randn(1, 4), 200, 0.07, 3).shape == (1, 3)
    assert knn_classify(train, labels, torch.randn(0, 4), 20, 0.07, 3).shape == (0, 3)
