"""Position embeddings at other image sizes the way official DINO resizes them.

Follows facebookresearch/dino ``vision_transformer.VisionTransformer.interpolate_pos_encoding`` at
7c446df5 (Caron et al. 2021): the patch-position grid is resized by bicubic interpolation with the
scale factor ``(new_grid + 0.1) / old_grid`` (align_corners=False, no antialias), so the sampling
positions differ slightly from a resize to the exact new size; the class-token position is kept.
timm's own dynamic-size path (``resample_abs_pos_embed``) resizes to the exact size with antialiasing,
which gives other numbers whenever the grid shrinks (local crops).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

DINO_SCALE_OFFSET = 0.1  # official: added to the new grid "to avoid floating point error" (dino issue #8)


def dino_interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                               num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize ``pos_embed`` from ``old_grid`` to ``new_grid`` patches as official DINO does.

    Args:
        pos_embed: (1, P + H0*W0, D), the P prefix (class) positions first.
        old_grid: (H0, W0) grid the embedding was made for; new_grid: (H, W) patch grid of the input.
    Returns:
        (1, P + H*W, D); ``pos_embed`` itself at the native grid. Computed in ``pos_embed``'s dtype.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    scale = ((new_grid[0] + DINO_SCALE_OFFSET) / old_grid[0], (new_grid[1] + DINO_SCALE_OFFSET) / old_grid[1])
    grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != tuple(new_grid):
        raise ValueError(f"DINO position-embedding interpolation gave a {tuple(grid.shape[-2:])} grid "
                         f"for {tuple(new_grid)} patches")
    return torch.cat([prefix, grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], dim=1)


def _dino_pos_embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Replacement for timm ``VisionTransformer._pos_embed`` (dynamic_img_size): x (B, H, W, D) patch tokens."""
    b, h, w, d = x.shape
    tokens = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, h * w, d)], dim=1)
    pos = dino_interpolate_pos_embed(self.pos_embed, tuple(self.patch_embed.grid_size), (h, w),
                                     self.num_prefix_tokens)
    return self.pos_drop(tokens + pos)


def use_dino_pos_embed(model: nn.Module) -> None:
    """Make a timm ViT (created with ``dynamic_img_size=True``) resize its position embedding as DINO.

    Only DINO's layout is supported: one class token whose position is part of ``pos_embed``.
    """
    if not isinstance(model, VisionTransformer):  # other timm ViTs (EVA, ...) embed positions their own way
        raise ValueError("backbone.pos_embed_interpolation='dino' applies to timm VisionTransformer models only; "
                         f"got a {type(model).__name__}")
    if (not getattr(model, "dynamic_img_size", False) or getattr(model, "no_embed_class", False)
            or getattr(model, "reg_token", None) is not None or model.cls_token is None):
        raise ValueError("backbone.pos_embed_interpolation='dino' needs DINO's ViT layout: a class token with a "
                         "position, no registers, no_embed_class=False, dynamic_img_size=True")
    model._pos_embed = types.MethodType(_dino_pos_embed, model)
