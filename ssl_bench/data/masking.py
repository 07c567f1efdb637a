"""iBOT block masking of global-view patches, and the collate function that adds the masks.

Follows BEiT (Bao et al. 2021, arXiv 2106.08254, Algorithm 1) as used by iBOT and
DINOv2 (Oquab et al. 2023, arXiv 2304.07193), facebookresearch/dinov2 at commit
05c66df0 ``dinov2/data/masking.py`` ``MaskingGenerator`` and
``dinov2/data/collate.py`` ``collate_data_and_cast``. Written from the papers'
description and that code's behaviour; no code is copied.

Randomness comes from a ``random.Random`` drawn from Python's global ``random``
state; the training loader seeds that state per batch from (seed, epoch, batch,
rank) (``data/resumable.py`` SeededCollate), so masks do not depend on workers or
on whether the run was resumed.
"""

from __future__ import annotations

import math
import random
from typing import Any, Callable, Sequence

import torch

from ssl_bench.data.batch import Batch, collate_batch

BLOCK_ATTEMPTS = 10  # tries per block before giving up, as in BEiT / DINOv2


def patch_grid(global_crop_size: int, patch_size: int) -> tuple[int, int]:
    """The (H, W) patch grid of a square global crop, e.g. 224 px / 14 px -> (16, 16)."""
    if patch_size < 1 or global_crop_size < 1:
        raise ValueError(f"crop size and patch size must be positive, got {global_crop_size} and {patch_size}")
    if global_crop_size % patch_size:
        raise ValueError(f"global crop size {global_crop_size} is not a multiple of the patch size "
                         f"{patch_size}: masks need a whole number of patches per side")
    side = global_crop_size // patch_size
    return side, side


class BlockMaskGenerator:
    """BEiT-style block masking: random rectangles of patches until a target count.

    BEiT Algorithm 1, as DINOv2's ``MaskingGenerator``: each block has an area
    uniform in [min_num_patches, min(budget left, max_num_patches)] and a
    log-uniform aspect ratio in [min_aspect, max_aspect]; a block must add at least
    one new patch and no more than the budget left. The mask may fall short of the
    target (BLOCK_ATTEMPTS failed tries end it) but never exceeds it.

    Args:
        grid: (H, W) patches per side.
        min_num_patches: smallest block area tried.
        max_num_patches: largest block area; None = half the grid (DINOv2's setting).
        min_aspect: smallest height/width ratio of a block.
        max_aspect: largest ratio; None = 1 / min_aspect.

    Returns (when called): a (H, W) bool mask, True = masked.
    """

    def __init__(self, grid: tuple[int, int], min_num_patches: int = 4, max_num_patches: int | None = None,
                 min_aspect: float = 0.3, max_aspect: float | None = None):
        self.height, self.width = grid
        if self.height < 1 or self.width < 1 or min_aspect <= 0:
            raise ValueError(f"need a non-empty grid and min_aspect > 0, got {grid} and {min_aspect}")
        self.min_num_patches = min_num_patches
        self.max_num_patches = (self.height * self.width) // 2 if max_num_patches is None else max_num_patches
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @property
    def num_patches(self) -> int:
        return self.height * self.width

    def __call__(self, num_masking_patches: int, rng: random.Random) -> torch.Tensor:
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < num_masking_patches:
            budget = min(num_masking_patches - count, self.max_num_patches)
            added = self.place_block(mask, budget, rng)
            if added == 0:
                break
            count += added
        return mask

    def place_block(self, mask: torch.Tensor, budget: int, rng: random.Random) -> int:
        """Mask one random rectangle in place, adding 1..budget new patches; returns how many (0 = failed).

        Args:
            mask: (H, W) bool, modified in place.
            budget: most new patches this block may add.
        """
        for _ in range(BLOCK_ATTEMPTS):
            h, w = self._block_shape(budget, rng)
            # Strict bounds as in BEiT / DINOv2: a block never spans a whole side.
            if not (0 < h < self.height and 0 < w < self.width):
                continue
            top = rng.randint(0, self.height - h)
            left = rng.randint(0, self.width - w)
            block = mask[top:top + h, left:left + w]
            new = h * w - int(block.sum())
            # A block that overlaps only masked patches adds nothing; one over budget would overshoot.
            if 0 < new <= budget:
                block.fill_(True)
                return new
        return 0

    def _block_shape(self, budget: int, rng: random.Random) -> tuple[int, int]:
        area = rng.uniform(self.min_num_patches, budget)
        aspect = math.exp(rng.uniform(*self.log_aspect))
        return round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))

    def __repr__(self) -> str:
        lo, hi = (math.exp(a) for a in self.log_aspect)
        return (f"{type(self).__name__}(grid=({self.height}, {self.width}), "
                f"area=[{self.min_num_patches}, {self.max_num_patches}], aspect=[{lo:.3g}, {hi:.3g}])")


def sample_masks(num_images: int, grid: tuple[int, int], mask_probability: float,
                 mask_ratio: Sequence[float], rng: random.Random,
                 generator: BlockMaskGenerator | None = None) -> torch.Tensor:
    """Block masks for a batch: int(num_images * mask_probability) masked images, ratios spread over mask_ratio.

    As DINOv2's ``collate_data_and_cast``: [low, high] is cut into n_masked equal
    sub-intervals and masked image i targets a ratio uniform in the i-th, so one
    batch covers the whole range; the other images get an empty mask, and the
    order is shuffled so masked images land on random rows.

    Args:
        num_images: rows of the result (DINOv2: every global crop of the batch).
        grid: (H, W) patch grid.
        mask_probability: share of images that get a mask.
        mask_ratio: (low, high) share of the H*W patches to mask.
        generator: block masker for ``grid``; None = BlockMaskGenerator(grid).

    Returns: (num_images, H*W) bool, True = masked.
    """
    generator = BlockMaskGenerator(grid) if generator is None else generator
    lo, hi = mask_ratio
    n_masked = int(num_images * mask_probability)
    edges = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else []
    masks = [generator(int(generator.num_patches * rng.uniform(a, b)), rng) for a, b in zip(edges, edges[1:])]
    masks += [generator(0, rng) for _ in range(num_images - n_masked)]
    rng.shuffle(masks)
    if not masks:
        return torch.zeros(0, generator.num_patches, dtype=torch.bool)
    return torch.stack(masks).flatten(1)


class MaskingCollate:
    """DataLoader ``collate_fn`` that stacks multi-crop samples and adds iBOT masks for the global crops.

    DINOv2 ``collate_data_and_cast`` (see module docstring), without the dtype cast
    or the index bookkeeping, which the method derives from the masks.

    Args:
        grid: (H, W) patch grid of a global crop.
        mask_probability, mask_ratio: as ``sample_masks``.
        num_global_crops: leading crops of each sample that are masked.
        base: collate function that makes the unmasked Batch (``collate_batch`` for samples that are
            already crops; ``tensor_multicrop.TensorMultiCropCollate`` for uint8 images), or the
            ``device_multicrop.ImageBatch`` whose crops are made after the transfer (``ImageBatchCollate``).

    Returns (when called on a list of B samples that ``base`` turns into V crops each):
        ``Batch(crops, labels, masks)`` (``data/batch.py``): crops a list of V (B, 3, H_v, W_v)
        tensors, labels (B,), masks (num_global_crops * B, H*W) bool with rows in the order
        of ``torch.cat(crops[:num_global_crops])`` (view-major).
    """

    def __init__(self, grid: tuple[int, int], mask_probability: float, mask_ratio: Sequence[float],
                 num_global_crops: int = 2, base: Callable[[list], Batch] = collate_batch):
        lo, hi = mask_ratio
        if not (0 <= lo <= hi <= 1 and 0 <= mask_probability <= 1):
            raise ValueError(f"need 0 <= mask_ratio low <= high <= 1 and mask_probability in [0, 1], "
                             f"got {list(mask_ratio)} and {mask_probability}")
        self.grid = tuple(grid)
        self.mask_probability = mask_probability
        self.mask_ratio = (float(lo), float(hi))
        self.num_global_crops = num_global_crops
        self.generator = BlockMaskGenerator(self.grid)
        self.base = base

    def __call__(self, samples: list[tuple[Any, Any]]) -> Batch:
        batch = self.base(samples)
        # An ImageBatch (data.augment_on=device) has no crops yet: TensorMultiCrop makes 2 global ones later.
        if isinstance(batch, Batch) and len(batch.crops) < self.num_global_crops:
            raise ValueError(f"samples have {len(batch.crops)} crops, "
                             f"fewer than num_global_crops={self.num_global_crops}")
        # A fresh generator seeded from the global state: reproducible under seed_everything
        # and per DataLoader worker, without sharing state across calls.
        rng = random.Random(random.getrandbits(64))
        masks = sample_masks(self.num_global_crops * len(samples), self.grid, self.mask_probability,
                             self.mask_ratio, rng, self.generator)
        return batch._replace(masks=masks)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, mask_probability={self.mask_probability}, "
                f"mask_ratio={self.mask_ratio}, num_global_crops={self.num_global_crops})")
