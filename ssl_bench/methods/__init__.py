"""Registered SSL methods; importing this package registers all of them."""

from ssl_bench.methods.base import METHODS, SSLMethod, build_method
from ssl_bench.methods import dino  # noqa: F401  (registers dino and its ablations)

__all__ = ["METHODS", "SSLMethod", "build_method"]
