"""data.augment_on=device: the loader hands over uint8 images (or encoded bytes) and a seed; crops follow the transfer.

On the CPU every crop must be bitwise the one data.augment_on=workers makes for the same batch, and a
run must train to the same weights; on CUDA (gpu marker) the JPEGs are decoded by nvJPEG.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_bench import config as config_lib
from ssl_bench.config import DataConfig
from ssl_bench.data import MaskingCollate, SSLDataModule, TensorMultiCropCollate, as_batch, dataset_info
from ssl_bench.data.decode import decode
from ssl_bench.data.device_multicrop import DeviceMultiCrop, ImageBatch, ImageBatchCollate, is_encoded
from ssl_bench.data.resumable import seeded_rngs

CPU = torch.device("cpu")
MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def build(tiny_tree, augment_on: str, **data) -> config_lib.Config:
    return config_lib.build_config(tiny_tree, {"data": {"multicrop": "tensor", "augment_on": augment_on, **data}})


def assert_same_batch(a, b) -> None:
    assert len(a.crops) == len(b.crops)
    assert all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a.crops, b.crops))
    assert torch.equal(a.labels, b.labels)
    assert (a.masks is None and b.masks is None) or torch.equal(a.masks, b.masks)


def pil_images(sizes, seed: int = 0) -> list[Image.Image]:
    """Smooth colour fields plus mild noise, as photographs are (pure noise is JPEG's worst case)."""
    rng = np.random.default_rng(seed)
    out = []
    for h, w in sizes:
        coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float64)
        out.append(Image.fromarray(np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)))
    return out


def encoded(image: Image.Image, fmt: str) -> torch.Tensor:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


# ---- config -----------------------------------------------------------------------------------------


def test_augment_on_is_unhashed_checked_and_needs_the_tensor_multicrop(tiny_tree):
    workers = build(tiny_tree, "workers")
    assert config_lib.build_config(tiny_tree).data.augment_on == "workers"
    assert config_lib.run_id(build(tiny_tree, "device")) == config_lib.run_id(workers)
    with pytest.raises(config_lib.ConfigError, match=r"data\.augment_on='gpu'; valid: workers, device"):
        build(tiny_tree, "gpu")
    with pytest.raises(config_lib.ConfigError,
                       match=r"data\.augment_on=device needs data\.multicrop=tensor \(got data\.multicrop=pil\)"):
        config_lib.build_config(tiny_tree, {"data": {"augment_on": "device"}})


# ---- the same crops as in the workers -----------------------------------------------------------------


@pytest.mark.parametrize("mask_grid", [None, (4, 4)])
def test_device_batches_are_bitwise_the_worker_batches(tiny_tree, mask_grid):
    workers = SSLDataModule(build(tiny_tree, "workers"), mask_grid=mask_grid)
    device = SSLDataModule(build(tiny_tree, "device"), mask_grid=mask_grid)
    assert device.augments_on_device and not workers.augments_on_device
    made = 0
    for expected, raw in zip(workers.train_dataloader(), device.train_dataloader()):
        assert isinstance(raw, ImageBatch) and isinstance(raw.seed, int)
        assert raw.images.dtype == torch.uint8 and raw.images.shape == (8, 3, 32, 32)  # one size: stacked
        assert (raw.masks is None) == (mask_grid is None)
        batch = device.on_device(raw, CPU)
        assert [tuple(c.shape) for c in batch.crops] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2
        assert_same_batch(batch, expected)
        made += 1
    assert made == 4


def test_images_of_many_sizes_stay_a_list_and_give_the_worker_crops():
    cfg = DataConfig(local_crops_number=3)
    samples = [(torch.randint(0, 256, (3, h, w), dtype=torch.uint8), i)
               for i, (h, w) in enumerate([(30, 41), (28, 28), (57, 33), (40, 40)])]
    with seeded_rngs(11):
        expected = MaskingCollate((4, 4), 0.5, (0.1, 0.5), base=TensorMultiCropCollate(cfg, MEAN, STD))(samples)
    with seeded_rngs(11):
        raw = MaskingCollate((4, 4), 0.5, (0.1, 0.5), base=ImageBatchCollate())(samples)
    assert isinstance(raw.images, list) and not is_encoded(raw.images)
    assert_same_batch(DeviceMultiCrop(cfg, MEAN, STD)(raw), expected)


def test_hook_decodes_encoded_jpeg_and_png_bytes_as_the_workers_would(tiny_tree):
    module = SSLDataModule(build(tiny_tree, "device"), mask_grid=(4, 4))
    images = pil_images([(30, 41), (28, 28), (57, 33), (40, 40)])
    files = [encoded(image, fmt) for image, fmt in zip(images, ["JPEG", "PNG", "JPEG", "PNG"])]
    assert torch.equal(decode(files[1]), torch.from_numpy(np.array(images[1])).permute(2, 0, 1))  # lossless
    with seeded_rngs(5):
        raw = module.collate_fn([(data, label) for label, data in enumerate(files)])
    assert isinstance(raw, ImageBatch) and is_encoded(raw.images) and raw.masks.shape == (8, 16)
    moved = module.transfer_batch_to_device(raw, CPU, 0)
    # One storage for the batch's bytes (shared once through the worker queue); it stays on the host.
    assert len({image.untyped_storage().data_ptr() for image in raw.images}) == 1
    assert isinstance(moved, ImageBatch) and all(a is b for a, b in zip(moved.images, raw.images))  # bytes stay put
    assert all(torch.equal(a, b) for a, b in zip(moved.images, files))
    batch = module.on_after_batch_transfer(moved, 0)
    decoded = [(decode(data), label) for label, data in enumerate(files)]  # what a worker-side decode yields
    info = dataset_info(module.data_cfg.name)
    with seeded_rngs(5):
        expected = MaskingCollate((4, 4), 0.5, (0.1, 0.5),
                                  base=TensorMultiCropCollate(module.data_cfg, info.mean, info.std))(decoded)
    assert_same_batch(batch, expected)


def test_a_batch_mixing_encoded_and_decoded_images_is_refused():
    with pytest.raises(ValueError, match="mixes encoded images"):
        is_encoded([torch.zeros(10, dtype=torch.uint8), torch.zeros(3, 4, 4, dtype=torch.uint8)])


def test_an_image_batch_that_skipped_the_hook_is_named():
    raw = ImageBatch(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="ImageBatch.*on_after_batch_transfer"):
        as_batch(raw)


# ---- whole runs and the data benchmark ------------------------------------------------------------------


def test_a_device_run_trains_to_the_weights_of_a_workers_run(tiny_tree, tmp_path):
    """ibot: masks from the collate, crops from the hook Lightning calls; the same 2 steps bitwise, and the
    post-hoc collapse evaluation (which reads the training loader itself) measures the same numbers."""
    from ssl_bench.run import evaluate, train

    states, collapse = {}, {}
    for mode in ("workers", "device"):
        cfg = config_lib.build_config(tiny_tree, {
            "data": {"multicrop": "tensor", "augment_on": mode}, "method": {"name": "ibot"},
            "eval": {"knn": False}, "tracking": {"runs_root": str(tmp_path / mode)}})
        result = train.run(cfg)
        assert result.status == "completed"
        states[mode] = torch.load(result.run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        collapse[mode] = evaluate.evaluate(evaluate.open_target(str(result.run_dir)), "collapse", CPU,
                                           batches=1).metrics
    different = [k for k in states["workers"] if not torch.equal(states["workers"][k], states["device"][k])]
    assert states["workers"].keys() == states["device"].keys() and not different, different[:5]
    assert collapse["device"] == collapse["workers"] and collapse["device"]["rankme"] >= 1


def test_bench_data_times_the_loader_side_and_says_so(tiny_tree, capsys):
    from ssl_bench.bench.data import bench_data

    result = bench_data(build(tiny_tree, "device"), [0], batches=2, warmup=1, mask_grid=(4, 4))
    assert "timing the loader side only" in capsys.readouterr().out
    row = result["rows"][0]
    assert row["crops_per_image"] == 4 and row["crop_sizes"] == [[16, 16]] * 2 + [[8, 8]] * 2
    assert row["pixels_per_image"] == 2 * 256 + 2 * 64 and row["masked"] is True
    assert result["config"]["augment_on"] == "device"


# ---- CUDA: pinned memory, transfer, nvJPEG ------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_path_on_cuda_decodes_with_nvjpeg_and_matches_the_cpu_crops(tiny_tree):
    from torch.utils.data._utils.pin_memory import pin_memory

    module = SSLDataModule(build(tiny_tree, "device", global_crop_size=64, local_crop_size=32), mask_grid=(4, 4))
    images = pil_images([(120, 160), (96, 96), (150, 100), (128, 128)], seed=1)
    files = [encoded(image, "JPEG") for image in images]
    with seeded_rngs(2):
        raw = pin_memory(module.collate_fn([(data, label) for label, data in enumerate(files)]))
    assert isinstance(raw, ImageBatch) and raw.labels.is_pinned() and all(f.is_pinned() for f in raw.images)
    cuda = torch.device("cuda", torch.cuda.current_device())
    moved = module.transfer_batch_to_device(raw, cuda, 0)
    assert moved.labels.is_cuda and moved.masks.is_cuda and not moved.images[0].is_cuda  # bytes stay on the host
    batch = module.on_after_batch_transfer(moved, 0)
    reference = module.on_device(raw, CPU)  # libjpeg-turbo and the CPU kernels
    assert torch.equal(batch.masks.cpu(), reference.masks) and torch.equal(batch.labels.cpu(), reference.labels)
    std = torch.tensor(dataset_info(module.data_cfg.name).std).view(1, 3, 1, 1)
    for a, b in zip(reference.crops, batch.crops):
        assert b.is_cuda and b.shape == a.shape
        # nvJPEG's IDCT and chroma upsampling differ from libjpeg-turbo's by a few grey levels, and CUDA resizes
        # uint8 through the float bicubic kernel (tensor_multicrop's CUDA test): close, not bitwise.
        levels = (a - b.cpu()).abs() * std * 255
        assert levels.mean() <= 3.0, levels.mean()
