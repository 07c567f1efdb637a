"""Backbones: timm models that return ``Features(cls, patches)``, and checkpoint import / export."""

from ssl_bench.backbones.checkpoints import (CheckpointError, CheckpointInfo, export_official,
                                             infer_backbone_config, load_backbone, weights_sha256)
from ssl_bench.backbones.timm_backbone import Backbone, Features, build_backbone, has_batchnorm

__all__ = ["Backbone", "CheckpointError", "CheckpointInfo", "Features", "build_backbone", "export_official",
           "has_batchnorm", "infer_backbone_config", "load_backbone", "weights_sha256"]
