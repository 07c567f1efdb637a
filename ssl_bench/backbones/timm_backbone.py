"""Any ``timm`` model as an SSL backbone returning ``Features(cls, patches)``."""

from __future__ import annotations

from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from ssl_bench.config import BackboneConfig
from ssl_bench.registry import unknown_choice_message


class Features(NamedTuple):
    """Backbone output.

    cls: (B, D) global feature (ViT: final CLS token after norm; CNN: pooled map).
    patches: (B, N, D) patch tokens (ViT) or flattened final feature map (CNN).
    """

    cls: torch.Tensor
    patches: torch.Tensor


class Backbone(nn.Module):
    """Wraps a classifier-free timm model; ``embed_dim`` is the CLS feature size."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.embed_dim: int = model.num_features
        self.num_prefix_tokens: int = getattr(model, "num_prefix_tokens", 0)
        self.is_vit = hasattr(model, "patch_embed")

    def forward(self, images: torch.Tensor) -> Features:
        """Args: images: (B, 3, H, W). Crops of one size share a call."""
        x = self.model.forward_features(images)
        cls = self.model.forward_head(x, pre_logits=True)
        if x.ndim == 4:  # CNN feature map (B, C, H, W)
            patches = x.flatten(2).transpose(1, 2)
        else:
            patches = x[:, self.num_prefix_tokens:]
        return Features(cls, patches)


def timm_kwargs(cfg: BackboneConfig) -> dict[str, Any]:
    """create_model kwargs: ViTs get patch size, grid, depth and dynamic image size."""
    kwargs: dict[str, Any] = {"pretrained": False, "num_classes": 0, "drop_path_rate": cfg.drop_path_rate}
    if is_vit_name(cfg.name):
        kwargs["dynamic_img_size"] = True  # local crops are smaller than global ones
        for key in ("patch_size", "img_size", "depth"):
            if getattr(cfg, key) is not None:
                kwargs[key] = getattr(cfg, key)
    kwargs.update(cfg.kwargs)
    return kwargs


def is_vit_name(name: str) -> bool:
    return any(tag in name for tag in ("vit", "deit", "eva"))


def build_backbone(cfg: BackboneConfig) -> Backbone:
    """Create the timm model with random weights (never downloads)."""
    if not timm.is_model(cfg.name):
        raise KeyError(unknown_choice_message("timm model", cfg.name, timm.list_models("*vit_*tiny*")
                                              + timm.list_models("resnet*")[:8]))
    try:
        model = timm.create_model(cfg.name, **timm_kwargs(cfg))
    except TypeError as exc:
        raise ValueError(f"backbone {cfg.name!r} rejected its options {timm_kwargs(cfg)}: {exc}") from exc
    if cfg.cifar_stem:
        apply_cifar_stem(model)
    return Backbone(model)


def apply_cifar_stem(model: nn.Module) -> None:
    """3x3 stride-1 first conv and no max-pool, the usual ResNet stem for 28-32 px images."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError("backbone.cifar_stem=true needs a ResNet-style model with a conv1 layer")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    if hasattr(model, "maxpool"):
        model.maxpool = nn.Identity()
