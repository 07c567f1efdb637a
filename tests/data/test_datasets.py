"""Datasets: IDX parsing, Fashion-MNIST lookup and errors, subsets, synthetic data, DataModule."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_bench.config import Config, DataConfig, EvalConfig
from ssl_bench.data import (
    DATASETS,
    DataNotFoundError,
    SSLDataModule,
    build_dataset,
    check_dataset,
    dataset_info,
    eval_loaders,
    num_classes,
    read_idx,
    seeded_subset,
)
from ssl_bench.data import fashion_mnist, synthetic
from ssl_bench.registry import RegistryError

DEBIAN_DIR = fashion_mnist.DEFAULT_FASHION_DIR
HAVE_DEBIAN = all((DEBIAN_DIR / f"{stem}.gz").is_file()
                  for pair in fashion_mnist.SPLIT_FILES.values() for stem in pair)


def write_idx(path: Path, array: np.ndarray, type_byte: int = 0x08) -> None:
    """Write ``array`` as an IDX file (gzipped when the name ends in .gz)."""
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    if path.suffix == ".gz":
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def tiny_fashion(folder: Path, gz: bool, n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Write all four Fashion-MNIST files with n images of 28x28 into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)
    labels = np.array([3, 1, 4, 1, 5][:n], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    for img_stem, lbl_stem in fashion_mnist.SPLIT_FILES.values():
        write_idx(folder / (img_stem + suffix), images)
        write_idx(folder / (lbl_stem + suffix), labels)
    return images, labels


# ---- IDX parser ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx_images(tmp_path, name):
    array = np.array([[[0, 255, 7], [128, 1, 2]], [[9, 8, 7], [6, 5, 4]]], dtype=np.uint8)
    write_idx(tmp_path / name, array)
    out = read_idx(tmp_path / name)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 0, 1] == 255 and out[0, 1, 0] == 128 and out[1, 1, 2] == 4
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_read_idx_labels(tmp_path, name):
    write_idx(tmp_path / name, np.array([9, 0, 3, 3], dtype=np.uint8))
    out = read_idx(tmp_path / name)
    assert out.shape == (4,) and out.tolist() == [9, 0, 3, 3]


def test_read_idx_big_endian_int32(tmp_path):
    write_idx(tmp_path / "x-ubyte", np.array([1, 256, 70000], dtype=np.int32), type_byte=0x0C)
    assert read_idx(tmp_path / "x-ubyte").tolist() == [1, 256, 70000]


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    write_idx(tmp_path / "a-ubyte", np.zeros((3, 4, 4), dtype=np.uint8))
    (tmp_path / "a-ubyte").write_bytes((tmp_path / "a-ubyte").read_bytes()[:-1])
    with pytest.raises(ValueError, match="bytes follow"):
        read_idx(tmp_path / "a-ubyte")
    (tmp_path / "b-ubyte").write_bytes(b"\x1f\x8b\x08\x00junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "b-ubyte")


# ---- Fashion-MNIST lookup ---------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_root(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FASHION_DIR", tmp_path / "absent")
    folder = tmp_path if layout == "flat" else tmp_path / "FashionMNIST" / "raw"
    images, labels = tiny_fashion(folder, gz=layout == "flat")
    ds = build_dataset(DataConfig(root=str(tmp_path)), "test")
    assert len(ds) == 5
    image, label = ds[2]
    assert isinstance(label, int) and label == 4
    assert image.mode == "RGB" and image.size == (28, 28)
    rgb = np.asarray(image)
    assert (rgb[..., 0] == images[2]).all() and (rgb[..., 2] == images[2]).all()


def test_fashion_mnist_missing_names_all_three_fixes(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FASHION_DIR", tmp_path / "hidden")
    cfg = DataConfig(root=str(tmp_path), download=False)
    with pytest.raises(DataNotFoundError) as info:
        build_dataset(cfg, "train")
    msg = str(info.value)
    assert "data.root=" in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "data.download=true" in msg and "data.download is false" in msg
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DataNotFoundError, match="apt-get install"):
        check_dataset(cfg)


def test_fashion_mnist_failed_download_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FASHION_DIR", tmp_path / "hidden")

    def offline(cfg, split):
        raise OSError("no route to host")

    monkeypatch.setattr(fashion_mnist, "_download", offline)
    with pytest.raises(DataNotFoundError, match="no route to host"):
        build_dataset(DataConfig(root=str(tmp_path), download=True), "train")


@pytest.mark.skipif(not HAVE_DEBIAN, reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_debian_files():
    cfg = DataConfig(name="fashion_mnist")
    check_dataset(cfg)
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(set(test.labels.tolist())) == list(range(10))
    assert np.bincount(test.labels).tolist() == [1000] * 10
    image, label = train[0]
    assert image.mode == "RGB" and image.size == (28, 28) and label == 9  # first train item: ankle boot
    # Loaded once per process: a second build shares the arrays.
    assert build_dataset(cfg, "train").images is train.images
    info = dataset_info("fashion_mnist")
    pixels = train.images / 255.0
    assert abs(pixels.mean() - info.mean[0]) < 1e-3 and abs(pixels.std() - info.std[0]) < 1e-3


# ---- registry, info, errors -----------------------------------------------------------------


def test_registry_lists_datasets_with_descriptions():
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion_mnist", "imagefolder", "stl10", "synthetic"]
    assert all(entry.description for entry in DATASETS)


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(RegistryError, match="did you mean 'cifar10'.*synthetic"):
        build_dataset(DataConfig(name="cifar"), "train")


def test_unknown_split():
    with pytest.raises(ValueError, match="valid splits: train, test"):
        build_dataset(DataConfig(name="synthetic"), "val")


def test_dataset_info_values():
    assert dataset_info("cifar100").num_classes == 100
    assert dataset_info("imagefolder").mean == (0.485, 0.456, 0.406)
    assert dataset_info("stl10").image_size == 96
    with pytest.raises(AttributeError):
        dataset_info("cifar10").num_classes = 3  # frozen


def test_cifar_missing_files(tmp_path):
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False)
    for call in (lambda: check_dataset(cfg), lambda: build_dataset(cfg, "test")):
        with pytest.raises(DataNotFoundError, match="cifar10.*data.download=true") as info:
            call()
        assert str(tmp_path) in str(info.value)


def test_imagefolder(tmp_path):
    for split, classes in (("train", ["cat", "dog", "eel"]), ("val", ["cat", "dog", "eel"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (40, 30), (10, 20, 30)).save(tmp_path / split / c / "a.jpg")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path))
    check_dataset(cfg)
    assert num_classes(cfg) == 3
    test = build_dataset(cfg, "test")
    assert len(test) == 3 and test[2][1] == 2 and test[0][0].size == (40, 30)
    with pytest.raises(DataNotFoundError, match="data.root=.*nowhere' does not exist"):
        check_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="empty/train"):
        check_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))


# ---- subsets and synthetic ----------------------------------------------------------------------


def test_seeded_subset_is_deterministic_and_seed_dependent():
    data = list(range(1000))
    a, b = seeded_subset(data, 50, seed=1), seeded_subset(data, 50, seed=1)
    c = seeded_subset(data, 50, seed=2)
    assert len(a) == 50 and a.indices == b.indices and a.indices != c.indices
    assert len(set(a.indices)) == 50 and a.indices == sorted(a.indices)
    assert [a[i] for i in range(3)] == a.indices[:3]
    assert seeded_subset(data, None, 0) is data and seeded_subset(data, 1000, 0) is data


def test_synthetic_is_deterministic_and_balanced():
    cfg = DataConfig(name="synthetic")
    a, b = build_dataset(cfg, "train"), build_dataset(cfg, "train")
    test = build_dataset(cfg, "test")
    assert (len(a), len(test)) == (512, 128)
    np.testing.assert_array_equal(np.asarray(a[7][0]), np.asarray(b[7][0]))
    assert a[7][0].mode == "RGB" and a[7][0].size == (32, 32)
    assert np.bincount(a.labels).min() >= 51 and np.bincount(test.labels).tolist().count(0) == 0
    assert num_classes(cfg) == 10
    assert not np.array_equal(a.images[:128], test.images)
    pixels = a.images / 255.0
    np.testing.assert_allclose(pixels.mean(axis=(0, 1, 2)), synthetic.MEAN, atol=2e-3)
    np.testing.assert_allclose(pixels.std(axis=(0, 1, 2)), synthetic.STD, atol=2e-3)


def test_synthetic_pixels_are_separable_but_not_trivially():
    train, test = synthetic.generate("train"), synthetic.generate("test")

    def feats(x):
        return torch.nn.functional.normalize(torch.tensor(x.reshape(len(x), -1), dtype=torch.float32) - 127.5)

    top = (feats(test[0]) @ feats(train[0]).T).topk(20).indices
    votes = torch.nn.functional.one_hot(torch.as_tensor(train[1])[top], 10).sum(1)
    accuracy = (votes.argmax(1).numpy() == test[1]).mean()
    assert 0.5 < accuracy < 0.95


# ---- DataModule ------------------------------------------------------------------------------------


def synthetic_config(**overrides) -> Config:
    """Small multi-crop setup on the synthetic set: 100-image subset, 2 x 32 px + 2 x 16 px crops."""
    settings = {"batch_size": 16, "num_workers": 0, **overrides}
    data = DataConfig(name="synthetic", subset=100, global_crop_size=32, local_crop_size=16,
                      local_crops_number=2, eval_resize=32, eval_crop_size=32, **settings)
    return Config(seed=3, data=data, eval=EvalConfig(batch_size=50, bank_subset=120, test_subset=None))


@pytest.mark.parametrize("workers", [0, 1])
def test_datamodule_batches_and_steps(workers):
    dm = SSLDataModule(synthetic_config(num_workers=workers))
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert dm.steps_per_epoch == len(loader) == 100 // 16 == 6
    crops, labels, masks = next(iter(loader))
    assert masks is None
    assert len(crops) == 4 and labels.shape == (16,) and labels.dtype == torch.int64
    assert [tuple(c.shape) for c in crops] == [(16, 3, 32, 32)] * 2 + [(16, 3, 16, 16)] * 2


def test_steps_per_epoch_accounts_for_world_size():
    class FakeTrainer:
        world_size = 3

    dm = SSLDataModule(synthetic_config(batch_size=17))
    dm.trainer = FakeTrainer()
    # DistributedSampler pads 100 to 102 -> 34 per rank -> 2 full batches of 17
    # (100 // (17 * 3) would say 1).
    assert dm.steps_per_epoch == 2


def test_eval_loaders():
    bank, test = eval_loaders(synthetic_config())
    assert len(bank.dataset) == 120 and len(test.dataset) == 128
    images, labels = next(iter(test))
    assert images.shape == (50, 3, 32, 32)
    assert labels.tolist() == synthetic.generate("test")[1][:50].tolist()  # unshuffled, full test split


# ---- a data.root that is set must exist (issue 16) ----------------------------------------------


@pytest.mark.parametrize("name", ["fashion_mnist", "cifar10", "imagefolder"])
def test_missing_data_root_is_refused_not_a_fallback(tmp_path, monkeypatch, name):
    """A misspelt data.root never falls through to Debian's copy or the download cache."""
    monkeypatch.setattr(fashion_mnist, "DEFAULT_FASHION_DIR", tmp_path / "debian")
    tiny_fashion(tmp_path / "debian", gz=False, n=3)  # a copy the fallback would find
    missing = tmp_path / "tpyo"
    with pytest.raises(DataNotFoundError) as info:
        check_dataset(DataConfig(name=name, root=str(missing)))
    msg = str(info.value)
    assert f"data.root={str(missing)!r} does not exist ({name})" in msg and "data.root=null" in msg
    assert not missing.exists()
    if name == "fashion_mnist":
        with pytest.raises(DataNotFoundError, match="does not exist"):
            build_dataset(DataConfig(root=str(missing)), "test")
        assert len(build_dataset(DataConfig(root=None), "test")) == 3  # null keeps the Debian fallback


def test_data_root_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataNotFoundError, match="is a file, not a folder"):
        check_dataset(DataConfig(root=str(tmp_path / "file")))


def test_missing_root_ignored_by_synthetic(tmp_path):
    check_dataset(DataConfig(name="synthetic", root=str(tmp_path / "nowhere")))
