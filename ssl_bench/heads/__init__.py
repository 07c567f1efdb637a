"""Projection heads."""

from ssl_bench.heads.dino_head import DINOHead, WeightNormLinear

__all__ = ["DINOHead", "WeightNormLinear"]
