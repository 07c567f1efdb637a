"""The cached image-folder index (data/folder_index.py): ImageFolder's samples, reused until the tree changes."""

from __future__ import annotations

import gzip
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.transforms.v2 import functional as F

from ssl_bench import config as config_lib
from ssl_bench.cli.grid import train_size
from ssl_bench.config import DataConfig
from ssl_bench.data import build_dataset, dataset_size, decode, folder_index, num_classes  # noqa: F401
from ssl_bench.data.tensor_multicrop import image_to_uint8


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """train/ and val/ with JPEG, PNG and grey PNG images, a nested folder, a non-image and an upper-case extension."""
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(["zebra", "ant", "Bee"]):
            folder = tmp_path / "data" / split / name
            (folder / "nested").mkdir(parents=True)
            pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / "b.jpg", quality=90)
            Image.fromarray(pixels).save(folder / "a.png")
            Image.fromarray(pixels[..., 0]).save(folder / "nested" / "grey.png")
            Image.fromarray(pixels).save(folder / f"UPPER{c}.JPEG")
            (folder / "notes.txt").write_text("not an image")
    settle(tmp_path / "data")
    return tmp_path / "data"


def settle(root):
    """Date every folder a minute back: a tree changed within folder_index.SETTLE_S of the walk is not cached."""
    past = time.time() - 60
    for top, _, _ in os.walk(root):
        os.utime(top, (past, past))


def test_the_index_lists_what_imagefolder_lists(tree):
    cfg = DataConfig(name="imagefolder", root=str(tree))
    ours, theirs = build_dataset(cfg, "train"), ImageFolder(str(tree / "train"))
    assert ours.classes == theirs.classes == ["Bee", "ant", "zebra"]
    assert ours.class_to_idx == theirs.class_to_idx
    assert ours.samples == theirs.samples and ours.targets == theirs.targets and len(ours) == 12
    assert not any(path.endswith(".txt") for path, _ in ours.samples)
    for i in range(len(ours)):
        assert np.array_equal(np.asarray(ours[i][0]), np.asarray(theirs[i][0])) and ours[i][1] == theirs[i][1]
    assert num_classes(cfg) == 3 and dataset_size(cfg, "test") == 12


def test_tensor_mode_decodes_with_torchvision_io(tree):
    cfg = DataConfig(name="imagefolder", root=str(tree), multicrop="tensor")
    tensors, pils = build_dataset(cfg, "train", image_to_uint8), build_dataset(cfg, "train")
    for i in range(len(tensors)):
        image, label = tensors[i]
        pil = F.pil_to_tensor(pils[i][0])
        assert image.dtype == torch.uint8 and image.shape == pil.shape == (3, 30, 40) and label == pils[i][1]
        diff = (image.int() - pil.int()).abs().max().item()
        # PNGs are lossless: equal. JPEGs: both libjpeg-turbo, same decoder settings here: equal too, but
        # builds may differ in IDCT, so allow 2 levels for JPEG.
        assert diff == 0 if tensors.samples[i][0].endswith(".png") else diff <= 2
    encoded = build_dataset(cfg, "train", decode.keep_encoded)[0][0]
    assert encoded.dim() == 1 and torch.equal(decode.decode(encoded), tensors[0][0])


def test_the_cache_is_reused_until_a_folder_changes(tree, monkeypatch, capsys):
    folder = tree / "train"
    first = folder_index.load_index(folder)
    assert "indexed 12 images in 3 classes" in capsys.readouterr().out
    assert folder_index.index_file(folder).is_file()
    walks = []
    real = folder_index.build_index
    monkeypatch.setattr(folder_index, "build_index", lambda f: walks.append(f) or real(f))
    assert folder_index.load_index(folder) == first and walks == []  # reused, no walk
    Image.new("RGB", (8, 8)).save(folder / "ant" / "nested" / "new.png")  # a nested folder's mtime changes
    again = folder_index.load_index(folder)  # changed just now: walked, not cached
    assert len(walks) == 1 and len(again.samples) == 13
    folder_index.load_index(folder)
    assert len(walks) == 2
    settle(folder)
    again = folder_index.load_index(folder)
    assert len(walks) == 3 and folder_index.load_index(folder) == again and len(walks) == 3
    (folder / "Bee" / "b.jpg").unlink()
    assert len(folder_index.load_index(folder).samples) == 12 and len(walks) == 4
    os.rename(folder / "zebra", folder / "yak")
    assert folder_index.load_index(folder).classes == ["Bee", "ant", "yak"] and len(walks) == 5


def test_a_corrupt_cache_is_rebuilt_and_an_unwritable_one_only_warns(tree, tmp_path, monkeypatch, capsys):
    folder = tree / "val"
    folder_index.load_index(folder)
    path = folder_index.index_file(folder)
    path.write_bytes(b"{not gzip")
    assert len(folder_index.load_index(folder).samples) == 12
    assert "unreadable folder index" in capsys.readouterr().err
    record = json.loads(gzip.decompress(path.read_bytes()))
    path.write_bytes(gzip.compress(json.dumps({**record, "samples": 5}).encode()))
    assert len(folder_index.load_index(folder).samples) == 12
    assert "malformed folder index" in capsys.readouterr().err
    blocker = tmp_path / "file-not-folder"
    blocker.write_text("")
    monkeypatch.setenv("SSL_BENCH_CACHE", str(blocker))  # mkdir under a file fails
    assert len(folder_index.load_index(folder).samples) == 12
    captured = capsys.readouterr()
    assert "could not cache the folder index" in captured.err and "SSL_BENCH_CACHE" in captured.err


def test_plan_time_size_reads_the_index_without_walking_again(tree, monkeypatch):
    cfg = config_lib.build_config({"data": {"name": "imagefolder", "root": str(tree), "subset": 5, "batch_size": 4}})
    assert train_size(cfg) == 5
    monkeypatch.setattr(folder_index, "build_index", lambda f: pytest.fail("walked the folder again"))
    cfg = config_lib.build_config({"data": {"name": "imagefolder", "root": str(tree)}})
    assert train_size(cfg) == 12


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SSL_BENCH_CACHE", str(tmp_path / "x"))
    assert folder_index.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("SSL_BENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert folder_index.cache_dir() == tmp_path / "xdg" / "ssl-bench"


def test_image_folder_batches_on_the_device_path_are_the_worker_batches(tree):
    # augment_on=device: the loader hands over the files' encoded bytes, decoded after the transfer.
    from ssl_bench.data import SSLDataModule
    from ssl_bench.data.device_multicrop import ImageBatch

    def module(augment_on):
        return SSLDataModule(config_lib.build_config({"data": {
            "name": "imagefolder", "root": str(tree), "multicrop": "tensor", "augment_on": augment_on,
            "batch_size": 4, "global_crop_size": 16, "local_crop_size": 8, "local_crops_number": 2}}))

    workers, device = module("workers"), module("device")
    pairs = list(zip(workers.train_dataloader(), device.train_dataloader()))
    assert len(pairs) == 3
    for expected, raw in pairs:
        assert isinstance(raw, ImageBatch) and all(image.dim() == 1 for image in raw.images)  # encoded bytes
        batch = device.on_device(raw, torch.device("cpu"))
        assert torch.equal(batch.labels, expected.labels)
        assert all(torch.equal(a, b) for a, b in zip(batch.crops, expected.crops))


def test_a_class_without_images_is_named(tree):
    from ssl_bench.data.fashion_mnist import DataNotFoundError

    (tree / "train" / "yak").mkdir()
    (tree / "train" / "yak" / "readme.txt").write_text("")
    with pytest.raises(FileNotFoundError, match="yak"):
        ImageFolder(str(tree / "train"))  # torchvision refuses it too
    with pytest.raises(DataNotFoundError, match=r"data.root=.*no valid file for the classes yak"):
        dataset_size(DataConfig(name="imagefolder", root=str(tree)), "train")
