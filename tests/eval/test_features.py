"""Feature shards, the weights hash and the on-disk feature cache."""

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ssl_bench.backbones import Features
from ssl_bench.eval.features import FeatureCache, cached_features, weights_sha256


class Doubler(nn.Module):
    """A 'backbone' whose CLS is 2x its input, counting its calls."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.calls = 0
        self.embed_dim = 3

    def forward(self, x):
        self.calls += 1
        return Features(x * self.scale, x[:, None])


def loader(n=10):
    x = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
    return DataLoader(TensorDataset(x, torch.arange(n) % 3), batch_size=4)


def test_cache_hit_returns_the_same_features_without_a_forward(tmp_path):
    model, cache = Doubler(), FeatureCache(tmp_path)
    spec = {"dataset": "toy", "split": "train"}
    f1, y1, off = cached_features(model, loader(), spec, cache, weights_sha256(model))
    assert model.calls == 3 and off == 0 and cache.hits == 0
    assert torch.equal(f1, 2 * torch.arange(30, dtype=torch.float32).view(10, 3))
    f2, y2, _ = cached_features(model, loader(), spec, cache, weights_sha256(model))
    assert model.calls == 3 and cache.hits == 1  # no forward pass the second time
    assert torch.equal(f1, f2) and torch.equal(y1, y2)


def test_cache_key_changes_with_weights_and_spec(tmp_path):
    model, cache = Doubler(), FeatureCache(tmp_path)
    before = weights_sha256(model)
    cached_features(model, loader(), {"split": "train"}, cache, before)
    cached_features(model, loader(), {"split": "test"}, cache, before)  # other data: a miss
    assert model.calls == 6
    with torch.no_grad():
        model.scale.fill_(3.0)
    after = weights_sha256(model)
    assert after != before
    f, _, _ = cached_features(model, loader(), {"split": "train"}, cache, after)  # other weights: a miss
    assert model.calls == 9 and f[1, 0].item() == 9.0


def test_corrupt_cache_file_is_recomputed(tmp_path):
    model, cache = Doubler(), FeatureCache(tmp_path)
    w = weights_sha256(model)
    cached_features(model, loader(), {"s": 1}, cache, w)
    path = next(tmp_path.glob("*.pt"))
    path.write_bytes(path.read_bytes()[:20])  # a killed writer's leftovers
    f, _, _ = cached_features(model, loader(), {"s": 1}, cache, w)
    assert model.calls == 6 and f.shape == (10, 3)


def test_weights_hash_ignores_the_mask_token_only():
    model = Doubler()
    plain = weights_sha256(model)
    model.mask_token = nn.Parameter(torch.ones(1, 3))
    assert weights_sha256(model) == plain
    model.other = nn.Parameter(torch.ones(1))
    assert weights_sha256(model) != plain
