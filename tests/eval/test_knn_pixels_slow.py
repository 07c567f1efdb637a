"""The k-NN protocol on raw Fashion-MNIST pixels reproduces the known baselines (84.6% raw, 86.1% centred)."""

import pytest
import torch

from ssl_bench.data import DataNotFoundError
from ssl_bench.data.fashion_mnist import read_idx

DEBIAN = "/usr/share/datasets/fashion-mnist/"


def load(split):
    try:
        images = read_idx(f"{DEBIAN}{split}-images-idx3-ubyte.gz")
        labels = read_idx(f"{DEBIAN}{split}-labels-idx1-ubyte.gz")
    except (OSError, DataNotFoundError):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    return torch.tensor(images).float().flatten(1) / 255, torch.tensor(labels).long()


@pytest.mark.slow
def test_pixel_knn_baselines():
    from ssl_bench.eval.knn import knn_accuracies

    x_train, y_train = load("train")
    x_test, y_test = load("t10k")
    raw = knn_accuracies(x_train, y_train, x_test, y_test, [20], 0.07, 10)[20]["top1"]
    mean = x_train.mean(0)
    centred = knn_accuracies(x_train - mean, y_train, x_test - mean, y_test, [20], 0.07, 10)[20]["top1"]
    assert raw == pytest.approx(84.6, abs=0.1)
    assert centred == pytest.approx(86.1, abs=0.1)


def test_pixel_knn_on_the_seeded_subsets_of_the_pilots():
    """experiments/references/fashion_mnist_pixels_subset.yaml: the 10000/2000 subsets (seed 0) of the pilots."""
    from ssl_bench.data.datasets import seeded_subset
    from ssl_bench.eval.knn import knn_accuracies

    x_train, y_train = load("train")
    x_test, y_test = load("t10k")
    bank = torch.tensor(seeded_subset(list(range(len(x_train))), 10000, 0).indices)
    test = torch.tensor(seeded_subset(list(range(len(x_test))), 2000, 0).indices)
    xb, yb, xt, yt = x_train[bank], y_train[bank], x_test[test], y_test[test]
    raw = knn_accuracies(xb, yb, xt, yt, [20], 0.07, 10)[20]["top1"]
    mean = xb.mean(0)
    centred = knn_accuracies(xb - mean, yb, xt - mean, yt, [20], 0.07, 10)[20]["top1"]
    assert raw == pytest.approx(80.80, abs=0.01)
    assert centred == pytest.approx(83.95, abs=0.01)
