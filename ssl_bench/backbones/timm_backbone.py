"""Any ``timm`` model as an SSL backbone returning ``Features(cls, patches)``."""

from __future__ import annotations

from typing import Any, NamedTuple

import timm
import torch
from torch import nn

from ssl_bench.backbones.pos_embed import use_dino_pos_embed
from ssl_bench.config import BackboneConfig, is_vit_name
from ssl_bench.registry import unknown_choice_message


class Features(NamedTuple):
    """Backbone output.

    cls: (B, D) global feature (ViT: final CLS token after norm; CNN: pooled map).
    patches: (B, N, D) patch tokens (ViT) or flattened final feature map (CNN).
    """

    cls: torch.Tensor
    patches: torch.Tensor


class Backbone(nn.Module):
    """Wraps a classifier-free timm model; ``embed_dim`` is the CLS feature size.

    With ``mask_token=True`` (ViTs only) it owns iBOT's learned mask token: patch
    embeddings selected by ``masks`` are replaced by it before the position
    embedding, as in iBOT / DINOv2 (facebookresearch/dinov2 ``DinoVisionTransformer.prepare_tokens_with_masks``).
    A forward hook on timm's ``patch_embed`` does the replacement, so timm's own
    ``forward_features`` (and its gradient checkpointing) stays in charge.
    """

    def __init__(self, model: nn.Module, mask_token: bool = False) -> None:
        super().__init__()
        self.model = model
        self.embed_dim: int = model.num_features
        self.num_prefix_tokens: int = getattr(model, "num_prefix_tokens", 0)
        self.is_vit = hasattr(model, "patch_embed")
        self.patch_size: int | None = int(model.patch_embed.patch_size[0]) if self.is_vit else None
        self._masks: torch.Tensor | None = None
        self.channels_last = False  # speed.channels_last: images go in as NHWC (ssl_bench/run/speed.py)
        if mask_token:
            if not self.is_vit:
                raise ValueError("masked-patch (iBOT) methods need a ViT backbone with patch tokens")
            self.mask_token = nn.Parameter(torch.zeros(1, self.embed_dim))
            model.patch_embed.register_forward_hook(self._replace_masked)

    def _replace_masked(self, module: nn.Module, inputs: Any, tokens: torch.Tensor) -> torch.Tensor | None:
        if self._masks is None:
            return None
        masks = self._masks.reshape(tokens.shape[:-1]).unsqueeze(-1)  # (B, N) -> (B, H, W, 1) or (B, N, 1)
        return torch.where(masks, self.mask_token.to(tokens.dtype), tokens)

    def forward(self, images: torch.Tensor, masks: torch.Tensor | None = None) -> Features:
        """Args: images: (B, 3, H, W), crops of one size share a call; masks: (B, N) bool or None."""
        self._masks = masks
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        try:
            x = self.model.forward_features(images)
        finally:
            self._masks = None
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
        if cfg.layerscale is not None:
            kwargs["init_values"] = cfg.layerscale  # timm's LayerScale init (DINOv2: 1e-5)
    kwargs.update(cfg.kwargs)
    return kwargs


def build_backbone(cfg: BackboneConfig, mask_token: bool = False) -> Backbone:
    """Create the timm model with random weights (never downloads); ``mask_token`` for iBOT."""
    if not timm.is_model(cfg.name):
        raise KeyError(unknown_choice_message("timm model", cfg.name, timm.list_models("*vit_*tiny*")
                                              + timm.list_models("resnet*")[:8]))
    try:
        model = timm.create_model(cfg.name, **timm_kwargs(cfg))
    except TypeError as exc:
        raise ValueError(f"backbone {cfg.name!r} rejected its options {timm_kwargs(cfg)}: {exc}") from exc
    if cfg.cifar_stem:
        apply_cifar_stem(model, cfg.stem_stride)
    elif cfg.stem_stride != 1:
        raise ValueError(f"backbone.stem_stride={cfg.stem_stride} applies to the small-image stem only: "
                         "set backbone.cifar_stem=true with it")
    if cfg.layerscale is not None and not hasattr(model, "patch_embed"):
        raise ValueError(f"backbone.layerscale applies to ViTs only; {cfg.name!r} has no transformer blocks")
    if cfg.pos_embed_interpolation == "dino":
        if not hasattr(model, "patch_embed"):
            raise ValueError(f"backbone.pos_embed_interpolation='dino' applies to ViTs only; {cfg.name!r} has no "
                             "position embedding (use the default 'timm')")
        use_dino_pos_embed(model)
    return Backbone(model, mask_token=mask_token)


def apply_cifar_stem(model: nn.Module, stride: int = 1) -> None:
    """3x3 first conv (stride 1, or 2 for half the maps' cost) and no max-pool: the usual ResNet stem for 28-32 px."""
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError("backbone.cifar_stem=true needs a ResNet-style model with a conv1 layer")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, stride, 1, bias=False)
    if hasattr(model, "maxpool"):
        model.maxpool = nn.Identity()


def has_batchnorm(module: nn.Module) -> bool:
    """Whether ``module`` holds a BatchNorm layer (what ``backbone.sync_batchnorm`` converts)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
