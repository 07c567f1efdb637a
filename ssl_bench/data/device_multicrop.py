"""``data.augment_on=device``: the tensor multi-crop made on the training device, after the transfer.

The collate function (ImageBatchCollate, in the loader workers) only gathers each batch's uint8 images
(or their encoded bytes), labels and the per-batch generator seed into an ImageBatch, which is what
crosses to the device; the masks of MaskingCollate are made there too, since they do not depend on
pixels. After Lightning's transfer, ``SSLDataModule.on_after_batch_transfer`` hands the ImageBatch to
DeviceMultiCrop, which decodes encoded images (``decode.decode_batch``: nvJPEG on CUDA) and runs
``TensorMultiCrop`` with a CPU generator seeded from that seed. The random parameters are then those
``data.augment_on=workers`` draws for the same batch, so on the CPU the crops are bitwise the same and
on CUDA they agree up to float rounding (``tensor_multicrop``'s docstring).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Sequence, Union

import torch

from ssl_bench.config import DataConfig
from ssl_bench.data.batch import Batch
from ssl_bench.data.decode import decode_batch
from ssl_bench.data.tensor_multicrop import TensorMultiCrop, split_samples


class ImageBatch(NamedTuple):
    """One batch before its crops are made: what the loader hands over with ``data.augment_on=device``.

    A NamedTuple, so the DataLoader's ``pin_memory`` and Lightning's device transfer rebuild it field by
    field (``seed`` is a plain int, ``masks=None`` passes through both).

    Fields:
        images: B uint8 images, either a (B, 3, H, W) tensor (all of one size), a list of (3, H_i, W_i)
            tensors, or a list of 1-D tensors of encoded file bytes (JPEG, PNG, ...) to decode on the device.
        labels: (B,) int64.
        seed: the seed of the batch's crop generator (``tensor_multicrop.split_samples``).
        masks: (2B, N) bool iBOT block masks of the global crops (MaskingCollate), None unmasked.
    """

    images: Union[torch.Tensor, list[torch.Tensor]]
    labels: torch.Tensor
    seed: int
    masks: Optional[torch.Tensor] = None


def is_encoded(images: Union[torch.Tensor, Sequence[torch.Tensor]]) -> bool:
    """Whether ``images`` are encoded file bytes (a list of 1-D uint8 tensors), not decoded pixels."""
    if isinstance(images, torch.Tensor):
        return False
    kinds = {image.dim() == 1 for image in images}
    if len(kinds) > 1:
        raise ValueError("a batch mixes encoded images (1-D byte tensors) with decoded (3, H, W) ones; "
                         "the dataset must yield one kind")
    return kinds == {True}


def gather_images(images: list[torch.Tensor]) -> Union[torch.Tensor, list[torch.Tensor]]:
    """Decoded images of one size as one (B, 3, H, W) tensor (one pinned copy, one transfer); else the list."""
    if images and all(image.dim() == 3 and image.shape == images[0].shape for image in images):
        return torch.stack(images)
    if images and is_encoded(images):
        # One storage for the whole batch: the worker queue shares each storage by a file descriptor, and
        # torchvision.io.read_file's own storages cannot be shared (EBADF); B descriptors a batch would not scale.
        return list(torch.cat(images).split([image.numel() for image in images]))
    return images


class ImageBatchCollate:
    """DataLoader ``collate_fn`` of ``data.augment_on=device``: B samples ``(image, label)`` -> ImageBatch.

    ``image`` is a uint8 (3, H, W) tensor or a 1-D uint8 tensor of the encoded file. The seed is drawn
    as TensorMultiCropCollate draws it (``split_samples``), under the same per-batch seeding.
    """

    def __call__(self, samples: list[tuple[torch.Tensor, Any]]) -> ImageBatch:
        images, labels, seed = split_samples(samples)
        return ImageBatch(gather_images(images), labels, seed)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def transfer_fields(batch: ImageBatch) -> tuple[ImageBatch, Optional[list[torch.Tensor]]]:
    """(the part of ``batch`` to move to the device, encoded images to keep on the host or None).

    Encoded bytes stay in host memory: nvJPEG reads them from there (``decode_batch``).
    """
    if is_encoded(batch.images):
        return batch._replace(images=None), list(batch.images)
    return batch, None


class DeviceMultiCrop:
    """ImageBatch (after the transfer) -> ``Batch(crops, labels, masks)``, on the device of its labels.

    Args:
        cfg: data config, as TensorMultiCrop's.
        mean, std: per-channel normalisation (3 floats each).

    Returns (when called): a Batch whose crops are ``2 + local_crops_number`` float32 tensors, two
    (B, 3, G, G) then (B, 3, L, L), on ``batch.labels.device``.
    """

    def __init__(self, cfg: DataConfig, mean: Sequence[float], std: Sequence[float]):
        self.multicrop = TensorMultiCrop(cfg, mean, std)

    def __call__(self, batch: ImageBatch) -> Batch:
        images = batch.images
        if is_encoded(images):
            images = decode_batch(images, batch.labels.device)
        generator = torch.Generator().manual_seed(int(batch.seed))  # on the CPU, as in the workers
        return Batch(self.multicrop(images, generator), batch.labels, batch.masks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.multicrop!r})"
