"""Registered SSL methods, each DINO's training step with the parts it names; importing registers them all.

``parts``: teacher targets (centering, zero center, Sinkhorn-Knopp) and optional loss terms (iBOT,
KoLeo); ``dino``: the composed step and the DINO family; ``dinov2``: the DINOv2 family.
"""

from ssl_bench.methods import dino, dinov2  # noqa: F401  (registration)
from ssl_bench.methods.base import METHODS, SSLMethod, build_method

__all__ = ["METHODS", "SSLMethod", "build_method"]
