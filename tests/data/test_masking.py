"""iBOT block masking (BEiT Alg. 1 / DINOv2 MaskingGenerator, collate_data_and_cast) and its DataModule wiring."""

from __future__ import annotations

import pickle
import random
import statistics

import lightning as L
import pytest
import torch

from ssl_bench.config import build_config
from ssl_bench.data import BlockMaskGenerator, MaskingCollate, SSLDataModule, patch_grid, sample_masks

GRID = (14, 14)  # ViT-S/16 on 224 px
N = GRID[0] * GRID[1]


def bounding_box_filled(mask: torch.Tensor) -> bool:
    """True when the masked patches are exactly one filled rectangle."""
    rows, cols = mask.nonzero(as_tuple=True)
    box = mask[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return bool(box.all()) and int(box.sum()) == int(mask.sum())


# ---- patch_grid ------------------------------------------------------------------------------------


@pytest.mark.parametrize("crop, patch, grid", [(224, 16, (14, 14)), (224, 14, (16, 16)), (16, 4, (4, 4))])
def test_patch_grid(crop, patch, grid):
    assert patch_grid(crop, patch) == grid


def test_patch_grid_rejects_partial_patches():
    with pytest.raises(ValueError, match="not a multiple of the patch size 4"):
        patch_grid(30, 4)


# ---- BlockMaskGenerator ----------------------------------------------------------------------------


def test_generator_defaults():
    gen = BlockMaskGenerator(GRID)
    assert gen.max_num_patches == 98  # half the grid, as DINOv2's train setup
    assert gen(0, random.Random(0)).shape == GRID and not gen(0, random.Random(0)).any()


def test_mask_never_exceeds_target_and_nearly_reaches_it():
    gen = BlockMaskGenerator(GRID)
    fills = []
    for target in range(4, 99):
        for seed in range(5):
            count = int(gen(target, random.Random(seed)).sum())
            assert count <= target, (target, seed)
            fills.append(count / target)
    assert statistics.mean(fills) >= 0.9
    assert min(fills) >= 0.5


def test_target_above_block_limit_needs_several_blocks_and_stops():
    gen = BlockMaskGenerator(GRID)
    # 150 > max_num_patches=98: at least two blocks, still never more than asked.
    counts = [int(gen(150, random.Random(seed)).sum()) for seed in range(10)]
    assert all(98 < c <= 150 for c in counts)


def test_single_block_is_a_rectangle_within_budget():
    gen = BlockMaskGenerator(GRID)
    shapes = set()
    for seed in range(50):
        mask = torch.zeros(GRID, dtype=torch.bool)
        added = gen.place_block(mask, 16, random.Random(seed))
        assert 1 <= added <= 16 and int(mask.sum()) == added
        assert bounding_box_filled(mask)
        rows, cols = mask.nonzero(as_tuple=True)
        # Strict bounds as in DINOv2: no block spans a whole side.
        assert rows.max() - rows.min() + 1 < GRID[0] and cols.max() - cols.min() + 1 < GRID[1]
        shapes.add((int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1))
    # Log-uniform aspect in [0.3, 3.3]: both tall and wide blocks appear.
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)


def test_square_block_of_16_is_4x4():
    gen = BlockMaskGenerator(GRID, min_num_patches=16, max_num_patches=16, min_aspect=1.0)
    mask = gen(16, random.Random(3))
    assert int(mask.sum()) == 16 and bounding_box_filled(mask)
    rows, cols = mask.nonzero(as_tuple=True)
    assert (int(rows.max() - rows.min()), int(cols.max() - cols.min())) == (3, 3)


def test_block_over_masked_patches_adds_only_new_ones():
    gen = BlockMaskGenerator(GRID)
    mask = torch.zeros(GRID, dtype=torch.bool)
    mask[3:10, 3:10] = True  # 49 already masked
    before = mask.clone()
    added = gen.place_block(mask, 5, random.Random(1))
    assert 1 <= added <= 5
    assert int(mask.sum()) == 49 + added and bool(mask[before].all())


def test_generator_is_deterministic_given_rng():
    gen = BlockMaskGenerator(GRID)
    assert torch.equal(gen(60, random.Random(7)), gen(60, random.Random(7)))
    assert not torch.equal(gen(60, random.Random(7)), gen(60, random.Random(8)))


# ---- sample_masks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_sample_masks_counts_follow_sub_intervals(seed):
    masks = sample_masks(10, GRID, 0.5, (0.1, 0.5), random.Random(seed))
    assert masks.shape == (10, N) and masks.dtype == torch.bool
    counts = masks.sum(1)
    assert int((counts > 0).sum()) == 5  # int(10 * 0.5) images masked, the rest all False
    # Image k targets a ratio in [0.1 + 0.08k, 0.1 + 0.08(k+1)]; shuffling keeps the sorted order.
    got = sorted(int(c) for c in counts if c > 0)
    highs = [int(N * (0.1 + 0.08 * (k + 1))) for k in range(5)]  # 35, 50, 66, 82, 98
    lows = [N * (0.1 + 0.08 * k) for k in range(5)]
    assert all(c <= hi for c, hi in zip(got, highs)), (got, highs)
    assert all(c >= 0.8 * lo for c, lo in zip(got, lows)), (got, lows)


def test_sample_masks_shuffles_which_images_are_masked():
    rows = {tuple(sample_masks(8, GRID, 0.5, (0.1, 0.5), random.Random(s)).any(1).tolist()) for s in range(20)}
    assert len(rows) > 5


@pytest.mark.parametrize("n, p, masked", [(7, 0.5, 3), (4, 1.0, 4), (5, 0.0, 0), (1, 0.5, 0)])
def test_sample_masks_masks_int_n_times_p_images(n, p, masked):
    masks = sample_masks(n, GRID, p, (0.1, 0.5), random.Random(0))
    assert masks.shape == (n, N) and int(masks.any(1).sum()) == masked


def test_sample_masks_is_deterministic_given_rng():
    a = sample_masks(16, GRID, 0.5, (0.1, 0.5), random.Random(11))
    assert torch.equal(a, sample_masks(16, GRID, 0.5, (0.1, 0.5), random.Random(11)))
    assert not torch.equal(a, sample_masks(16, GRID, 0.5, (0.1, 0.5), random.Random(12)))


# ---- MaskingCollate --------------------------------------------------------------------------------


def fake_samples(batch: int, locals_: int = 3) -> list:
    """(crops, label) samples: 2 global (3, 16, 16), ``locals_`` (3, 8, 8) crops; pixel = 10 * image + view."""
    samples = []
    for i in range(batch):
        crops = [torch.full((3, 16, 16), 10.0 * i + v) for v in range(2)]
        crops += [torch.full((3, 8, 8), 10.0 * i + 2 + v) for v in range(locals_)]
        samples.append((crops, i % 3))
    return samples


def test_masking_collate_shapes_and_order():
    random.seed(0)  # on a 4x4 grid a 1-patch target can fail; fix the draw
    crops, labels, masks = MaskingCollate((4, 4), 0.5, (0.1, 0.5))(fake_samples(3))
    assert [tuple(c.shape) for c in crops] == [(3, 3, 16, 16)] * 2 + [(3, 3, 8, 8)] * 3
    assert labels.tolist() == [0, 1, 2] and labels.dtype == torch.int64
    assert masks.shape == (6, 16) and masks.dtype == torch.bool
    assert int(masks.any(1).sum()) == 3  # int(2 * 3 * 0.5) global crops masked
    # Mask rows follow torch.cat(crops[:2]): view-major, image index fastest.
    flat = torch.cat(crops[:2])[:, 0, 0, 0]
    assert flat.tolist() == [0.0, 10.0, 20.0, 1.0, 11.0, 21.0]


def test_masking_collate_reproducible_from_global_random_and_picklable():
    collate = MaskingCollate((14, 14), 0.5, (0.1, 0.5))
    clone = pickle.loads(pickle.dumps(collate))
    random.seed(5)
    first = collate(fake_samples(8, locals_=0))[2]
    random.seed(5)
    again = clone(fake_samples(8, locals_=0))[2]
    assert torch.equal(first, again)
    assert not torch.equal(first, collate(fake_samples(8, locals_=0))[2])  # the global state moved on


def test_masking_collate_rejects_bad_settings():
    with pytest.raises(ValueError, match="mask_ratio"):
        MaskingCollate((4, 4), 0.5, (0.6, 0.2))
    with pytest.raises(ValueError, match="fewer than num_global_crops"):
        MaskingCollate((4, 4), 0.5, (0.1, 0.5), num_global_crops=3)([([torch.zeros(3, 4, 4)] * 2, 0)])


# ---- DataModule ------------------------------------------------------------------------------------


def first_batch(dm: SSLDataModule):
    dm.prepare_data()
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.parametrize("workers", [0, 1])
def test_datamodule_with_masks(tiny_tree, workers):
    cfg = build_config(tiny_tree, {"data": {"num_workers": workers}})
    grid = patch_grid(cfg.data.global_crop_size, cfg.backbone.patch_size)
    batch = first_batch(SSLDataModule(cfg, mask_grid=grid))
    assert len(batch) == 3
    crops, labels, masks = batch
    b = cfg.data.batch_size
    assert len(crops) == 2 + cfg.data.local_crops_number and labels.shape == (b,)
    assert masks.shape == (2 * b, 16) and masks.dtype == torch.bool
    assert int(masks.any(1).sum()) <= int(2 * b * cfg.method.mask_probability)
    assert int(masks.sum(1).max()) <= int(16 * cfg.method.mask_ratio[1])


@pytest.mark.parametrize("workers", [0, 1])
def test_datamodule_masks_reproducible_under_seed_everything(tiny_tree, workers):
    cfg = build_config(tiny_tree, {"data": {"num_workers": workers}})
    dm = SSLDataModule(cfg, mask_grid=(4, 4))
    L.seed_everything(0)
    first = first_batch(dm)[2]
    L.seed_everything(0)
    assert torch.equal(first, first_batch(dm)[2])


def test_datamodule_without_multicrop_or_masks(tiny_cfg):
    crops, labels, masks = first_batch(SSLDataModule(tiny_cfg, local_crops_number=0))
    assert [tuple(c.shape) for c in crops] == [(8, 3, 16, 16)] * 2 and labels.shape == (8,) and masks is None
    assert tiny_cfg.data.local_crops_number == 2  # the override leaves the config alone
