"""Deterministic initial weights and crops shared by the golden-trajectory test and its generation.

``tests/test_golden_trajectory.py`` compares a short ssl-bench DINO run with numbers produced once by
the official facebookresearch/dino code. Both sides must start from the same weights and see the same
crops, so both take them from this module: the generation script (kept outside the repo, see the
test's docstring) imports it from here, and the test loads the same values into ssl-bench's networks.

Nothing here uses torch's RNG: every value comes from integer hashing (splitmix64) of the tensor's
official parameter name and the element index, or from ``sin`` of an arange, in float64, so the
numbers are the same on any torch version, platform or device. Two initialisations (timm's and the
official ``vision_transformer.py``'s, or timm's and torchvision's ResNet) would draw different random
numbers in a different order, which is why neither is used.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
SMALL = 0.02  # std of biases
TOKEN = 0.1  # std of cls_token and pos_embed (large enough that position interpolation shows in the loss)


def uniform(name: str, numel: int) -> np.ndarray:
    """``numel`` float64 values in [0, 1): splitmix64 of (CRC-32 of ``name``, element index)."""
    with np.errstate(over="ignore"):
        z = (np.uint64(zlib.crc32(name.encode())) << np.uint64(32)) + np.arange(numel, dtype=np.uint64)
        z = z * np.uint64(_GOLDEN) + np.uint64(_GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(_MUL1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(_MUL2)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def centred(name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Zero-mean values of standard deviation ``std`` (uniform on [-sqrt(3) std, sqrt(3) std])."""
    u = uniform(name, math.prod(shape))
    return torch.from_numpy((2.0 * u - 1.0) * math.sqrt(3.0) * std).reshape(shape)


def reference_value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The reference initial value of one tensor, by its official name (float64; int64 counters).

    Conv / linear weights (and the weight-normed layer's ``weight_v``): std 1/sqrt(fan_in); norm weights
    (LayerNorm, BatchNorm) 1; biases std 0.02; ``cls_token`` / ``pos_embed`` std 0.1; the weight-norm
    scale ``weight_g`` 1; BatchNorm running mean 0, running variance 1, batch counter 0.
    """
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=torch.int64)
    if name.endswith(("running_mean",)):
        return torch.zeros(shape, dtype=torch.float64)
    if name.endswith(("running_var", "weight_g")):
        return torch.ones(shape, dtype=torch.float64)
    if name.endswith(("cls_token", "pos_embed")):
        return centred(name, shape, TOKEN)
    if name.endswith(".bias"):
        return centred(name, shape, SMALL)
    if name.endswith(("weight", "weight_v")) and len(shape) >= 2:
        return centred(name, shape, 1.0 / math.sqrt(math.prod(shape[1:])))
    if name.endswith(".weight") and len(shape) == 1:
        return torch.ones(shape, dtype=torch.float64)
    raise KeyError(f"no reference initialisation for {name!r} {shape}")


def reference_state(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``{official name: shape}`` -> ``{official name: reference value}``."""
    return {name: reference_value(name, tuple(shape)) for name, shape in shapes.items()}


# ----- crops ---------------------------------------------------------------------------------------------
def crop(image: int, view: int, size: int) -> torch.Tensor:
    """(3, size, size) float64 crop ``view`` of image ``image``: two sines of the element index."""
    k = torch.arange(3 * size * size, dtype=torch.float64)
    a, b = 0.37 + 0.013 * view + 0.007 * image, 0.5 * image + 1.1 * view
    x = torch.sin(a * k + b) + 0.5 * torch.sin(0.031 * k * k / size + 0.3 * image - 0.2 * view)
    return x.reshape(3, size, size)


class GoldenCrops(torch.utils.data.Dataset):
    """``num_images`` items ``(crops, 0)``: 2 global then ``local_number`` local crops, as the multi-crop
    transform delivers them; a DataLoader's default collate turns them into DINO's batch
    ``(list of (B, 3, S, S) crop batches, (B,) labels)``."""

    def __init__(self, num_images: int, global_size: int, local_size: int, local_number: int) -> None:
        self.sizes = [global_size] * 2 + [local_size] * local_number
        self.num_images = num_images

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], int]:
        return [crop(index, v, s) for v, s in enumerate(self.sizes)], 0
