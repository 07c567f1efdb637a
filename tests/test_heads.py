"""DINO head: shapes, normalised bottleneck and fixed-norm prototypes."""

import torch

from ssl_bench.heads import DINOHead


def test_dino_head_shapes_and_weight_norm():
    head = DINOHead(in_dim=32, out_dim=100, hidden_dim=64, bottleneck_dim=16, nlayers=3, norm_last_layer=True)
    out = head(torch.randn(5, 32))
    assert out.shape == (5, 100)
    # prototypes have unit norm, so each logit is a cosine between unit vectors: |logit| <= 1
    assert out.abs().max().item() <= 1.0 + 1e-5
    assert not head.last_layer.scale.requires_grad
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 64), (64, 64), (64, 16)]


def test_unnormalised_last_layer_learns_its_scale():
    head = DINOHead(8, 10, 16, 4, nlayers=2, norm_last_layer=False)
    assert head.last_layer.scale.requires_grad
