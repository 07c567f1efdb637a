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


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """``parts`` equal micro-batches of ``batch``, in order, for ``optim.accumulate_grad_batches``.

    Micro-batch i holds images ``i*B/parts ... (i+1)*B/parts - 1`` of every view; its masks are the
    same images' rows of both global views, so they stay in ``torch.cat(crops[:2])`` order.

    Args: batch: crops V tensors (B, 3, H_v, W_v), labels (B,), masks (2B, N) or None; B divisible by ``parts``.
    """
    if parts == 1:
        return [batch]
    size = batch.crops[0].shape[0]
    if size % parts:
        raise ValueError(f"a batch of {size} images does not split into {parts} equal micro-batches")
    crops = [view.chunk(parts) for view in batch.crops]
    labels = batch.labels.chunk(parts)
    masks = None
    if batch.masks is not None:  # (2B, N) -> (2, B, N): split the images, keep both global views of each
        masks = [m.reshape(-1, m.shape[-1]) for m in batch.masks.reshape(2, size, -1).chunk(parts, dim=1)]
    return [Batch([view[i] for view in crops], labels[i], masks[i] if masks is not None else None)
            for i in range(parts)]
