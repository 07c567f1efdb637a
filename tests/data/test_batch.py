"""The typed batch survives every road a training batch takes: collate, device transfer, pin_memory, resume."""

import pickle

import pytest
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from ssl_bench.data import Batch, MaskingCollate, SSLDataModule, as_batch, collate_batch


def _samples(n, views=3):
    return [([torch.full((3, 4, 4), float(i + v)) for v in range(views)], i) for i in range(n)]


def test_collate_batch_stacks_views_and_has_no_masks():
    batch = collate_batch(_samples(2))
    assert isinstance(batch, Batch) and batch.masks is None and len(batch.crops) == 3
    assert batch.crops[1].shape == (2, 3, 4, 4) and batch.crops[1][1, 0, 0, 0] == 2.0
    assert batch.labels.tolist() == [0, 1] and batch[0] is batch.crops  # positional reads still work


def test_masking_collate_returns_a_batch_with_masks():
    batch = MaskingCollate((2, 2), 1.0, (0.25, 0.5))(_samples(2))
    assert isinstance(batch, Batch) and batch.masks.shape == (4, 4) and batch.masks.dtype == torch.bool


def test_as_batch_reads_plain_tuples_in_field_order():
    crops, labels, masks = [torch.zeros(1)], torch.zeros(1), torch.ones(1, 2, dtype=torch.bool)
    assert as_batch((crops, labels)) == Batch(crops, labels, None)
    assert as_batch([crops, labels, masks]).masks is masks
    typed = Batch(crops, labels)
    assert as_batch(typed) is typed


def test_device_transfer_and_pickling_keep_the_type():
    batch = collate_batch(_samples(2))
    moved = move_data_to_device(batch, torch.device("cpu"))  # what Lightning's batch transfer calls
    assert isinstance(moved, Batch) and moved.masks is None and torch.equal(moved.crops[0], batch.crops[0])
    clone = pickle.loads(pickle.dumps(batch))  # DataLoader workers send batches pickled
    assert isinstance(clone, Batch) and torch.equal(clone.labels, batch.labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pin_memory needs an accelerator")
def test_pin_memory_keeps_the_type():
    loader = torch.utils.data.DataLoader(_samples(4), batch_size=2, collate_fn=collate_batch, pin_memory=True)
    batch = next(iter(loader))
    assert isinstance(batch, Batch) and batch.masks is None and batch.crops[0].is_pinned()


def test_resumed_loader_continues_with_typed_batches(tiny_cfg):
    for mask_grid in (None, (4, 4)):
        loader = SSLDataModule(tiny_cfg, mask_grid=mask_grid).train_dataloader()
        it = iter(loader)
        next(it)
        state = loader.state_dict()  # one batch handed out, as a checkpoint would store it
        expected = next(it)
        resumed = SSLDataModule(tiny_cfg, mask_grid=mask_grid).train_dataloader()
        resumed.load_state_dict(state)
        batch = next(iter(resumed))
        assert isinstance(batch, Batch) and (batch.masks is None) == (mask_grid is None)
        assert all(torch.equal(a, b) for a, b in zip(batch.crops, expected.crops))
        if mask_grid is not None:
            assert torch.equal(batch.masks, expected.masks)
