"""Frozen-backbone feature extraction over a DataLoader."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: Iterable, device: torch.device | str = "cpu",
                     progress: Callable[[int, int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS features (N, D) and labels (N,) of every batch; the backbone is put in eval mode.

    The backbone must return an object with a ``cls`` field (``Features``).
    """
    was_training = backbone.training
    backbone.eval()
    feats, labels = [], []
    total = len(loader) if hasattr(loader, "__len__") else -1
    for i, (images, targets) in enumerate(loader):
        feats.append(backbone(images.to(device, non_blocking=True)).cls.float().cpu())
        labels.append(torch.as_tensor(targets))
        if progress is not None:
            progress(i + 1, total)
    backbone.train(was_training)
    return torch.cat(feats), torch.cat(labels)
