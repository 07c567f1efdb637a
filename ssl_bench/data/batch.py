"""The typed training batch: multi-crop views, labels and (for iBOT) the block masks of the global views."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch.utils.data import default_collate


class Batch(NamedTuple):
    """One training batch, as the collate functions deliver it.

    A NamedTuple, so Lightning's device transfer and the DataLoader's ``pin_memory`` rebuild it
    field by field (``masks=None`` passes through both), and positional reads keep working.

    Fields:
        crops: V tensors (B, 3, H_v, W_v): the 2 global views first, then the local views.
        labels: (B,) labels of the source images (unused by training, kept for diagnostics).
        masks: (2B, N) bool iBOT block masks, rows in ``torch.cat(crops[:2])`` order; None unmasked.
    """

    crops: list[torch.Tensor]
    labels: torch.Tensor
    masks: Optional[torch.Tensor] = None


def collate_batch(samples: list[tuple[list[torch.Tensor], Any]]) -> Batch:
    """DataLoader ``collate_fn`` for multi-crop samples ``(crops, label)``: stacks each view into a Batch."""
    crops, labels = default_collate(samples)
    return Batch(crops, labels)


def as_batch(batch: Batch | Sequence[Any]) -> Batch:
    """``batch`` as a Batch; a hand-made ``(crops, labels[, masks])`` sequence (tests, the golden
    trajectories' batches) is converted, since its fields come in the same order."""
    if isinstance(batch, Batch):
        return batch
    if hasattr(batch, "_fields"):  # another typed batch, e.g. an ImageBatch whose crops were never made
        raise TypeError(f"got a {type(batch).__name__}, not a training Batch: with data.augment_on=device the "
                        "crops are made by SSLDataModule.on_after_batch_transfer; train with the datamodule")
    return Batch(*batch)
