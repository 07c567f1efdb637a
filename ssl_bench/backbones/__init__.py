"""Backbones: timm models that return ``Features(cls, patches)``."""

from ssl_bench.backbones.timm_backbone import Backbone, Features, build_backbone

__all__ = ["Backbone", "Features", "build_backbone"]
