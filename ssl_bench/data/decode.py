"""Image files to uint8 tensors with torchvision.io (libjpeg-turbo / libpng on the CPU, nvJPEG on CUDA).

The tensor pipelines (``data.multicrop=tensor``) never build a PIL image: a file is read as its
encoded bytes (``read_encoded``) and decoded to a (3, H, W) uint8 RGB tensor (``decode``), in the
loader workers, or on the training device where nvJPEG can decode JPEGs (``decode_batch``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import torch
from torchvision import io as tvio

RGB = tvio.ImageReadMode.RGB


def read_encoded(path: Union[str, Path]) -> torch.Tensor:
    """The file's bytes as a 1-D uint8 tensor (what torchvision.io's decoders take)."""
    return tvio.read_file(str(path))


def decode(encoded: torch.Tensor) -> torch.Tensor:
    """Encoded bytes (JPEG, PNG, GIF, WebP, ...) -> (3, H, W) uint8 RGB tensor on the CPU."""
    return tvio.decode_image(encoded, mode=RGB)


def read_image(path: Union[str, Path]) -> torch.Tensor:
    """An image file -> (3, H, W) uint8 RGB tensor (grey and palette images are converted, as PIL's convert('RGB'))."""
    return decode(read_encoded(path))


def is_jpeg(encoded: torch.Tensor) -> bool:
    """Whether the bytes start with the JPEG SOI marker (FF D8 FF)."""
    return encoded.numel() >= 3 and encoded[:3].tolist() == [0xFF, 0xD8, 0xFF]


def decode_batch(encoded: Sequence[torch.Tensor], device: Union[str, torch.device]) -> list[torch.Tensor]:
    """Decode a batch of encoded images to (3, H, W) uint8 tensors on ``device``.

    On a CUDA device the JPEGs go to nvJPEG in one batched ``decode_jpeg`` call; other formats, and
    every image on a CPU device, are decoded on the CPU and moved.
    """
    device = torch.device(device)
    out: list = [None] * len(encoded)
    jpegs = [i for i, e in enumerate(encoded) if device.type == "cuda" and is_jpeg(e)]
    if jpegs:
        decoded = tvio.decode_jpeg([encoded[i].cpu() for i in jpegs], mode=RGB, device=device)
        for i, image in zip(jpegs, decoded):
            out[i] = image
    for i, e in enumerate(encoded):
        if out[i] is None:
            out[i] = decode(e.cpu()).to(device)
    return out


def as_uint8(image) -> torch.Tensor:
    """The tensor pipelines' dataset transform: a PIL image -> (3, H, W) uint8 tensor; a tensor passes through.

    Datasets that see it (``takes_uint8_tensor``) skip PIL: image folders decode with torchvision.io,
    in-memory datasets hand over their pixels.
    """
    if isinstance(image, torch.Tensor):
        return image
    from torchvision.transforms.v2.functional import pil_to_tensor

    return pil_to_tensor(image)


def keep_encoded(image) -> torch.Tensor:
    """``data.augment_on=device``'s training transform: image files stay encoded bytes (``takes_encoded``),
    decoded after the transfer (``decode_batch``); other datasets give uint8 tensors as ``as_uint8``."""
    return as_uint8(image)


as_uint8.takes_uint8_tensor = True  # type: ignore[attr-defined]
keep_encoded.takes_uint8_tensor = True  # type: ignore[attr-defined]
keep_encoded.takes_encoded = True  # type: ignore[attr-defined]
