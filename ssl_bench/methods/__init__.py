"""Registered SSL methods; importing this package registers every method."""

from ssl_bench.methods import dino, dinov2  # noqa: F401  (registration)
from ssl_bench.methods.base import METHODS, SSLMethod, build_method

__all__ = ["METHODS", "SSLMethod", "build_method"]
