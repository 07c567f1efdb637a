"""``ssl-bench bench data``: multi-crop training-pipeline throughput, per worker count and per worker.

The loader timed is the one training uses: ``SSLDataModule(cfg).train_dataloader()`` (a
``ResumableLoader`` with DINO's multi-crop transform, and iBOT masks when the caller passes a
``mask_grid``), with ``data.num_workers`` set to each benchmarked count and ``persistent_workers`` /
``pin_memory`` left as the module sets them. No model is built: this measures what the data side can
deliver, to compare with the step rate of ``ssl-bench bench train``. One image is one source image
with its full set of crops. With ``data.augment_on=device`` the loader only gathers uint8 images (or
encoded bytes), labels and a crop seed; the crops (and any decoding) are made on the training device
after the transfer, so these figures time the loader side only and ``bench train`` holds the rest.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Any, Iterator, Optional

import torch

from ssl_bench import config as config_lib
from ssl_bench import repro
from ssl_bench.data.batch import Batch
from ssl_bench.data.module import SSLDataModule
from ssl_bench.data.resumable import ResumableLoader


def bench_data(cfg: config_lib.Config, workers: list[int], batches: int = 20, warmup: int = 5, *,
               mask_grid: Optional[tuple[int, int]] = None,
               local_crops_number: Optional[int] = None) -> dict[str, Any]:
    """Time ``batches`` training batches after ``warmup`` ones, for each worker count in ``workers``.

    Start-up (from asking for the first batch to receiving it: worker processes, their first batch) is
    reported as ``startup_s``; the first batch counts among the warm-up ones. With ``w`` workers up to
    ``2 w`` batches are prefetched during start-up, so a ``warmup`` of at least ``2 w`` keeps ready-made
    batches out of the timed ones. The loader runs on into the next epoch when one ends, as training does.

    Args:
        cfg: the run's config; ``data.num_workers`` is replaced per count, ``trainer.num_threads``
            (if set) is applied to this process as training does.
        workers: worker counts to benchmark, e.g. ``[0, 1, 2]`` (0 = load in this process).
        batches: batches timed per worker count (>= 1).
        warmup: batches taken before timing starts (>= 0).
        mask_grid: (H, W) patch grid for iBOT masks, as ``train.build_datamodule`` passes for masked
            methods; None = no masks.
        local_crops_number: overrides ``data.local_crops_number`` (0 for methods without multi-crop).

    Returns:
        JSON-ready dict: ``rows`` (one per worker count, see :func:`measure_loader`), ``config`` (the
        data settings benchmarked), ``threads``, ``cpu_count``, ``torch`` and ``hardware``.
    """
    _check_arguments(workers, batches, warmup)
    if cfg.data.multicrop == "tensor" and cfg.data.augment_on == "device":
        print("[bench data] data.augment_on=device: timing the loader side only (uint8 images, labels, crop "
              "seed, masks); the crops are made on the training device after the transfer (see bench train)",
              flush=True)
    threads_before = torch.get_num_threads()
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    try:
        rows = []
        for w in workers:
            row = _bench_workers(cfg, w, batches, warmup, mask_grid, local_crops_number)
            print(f"[bench data] workers={w}: {row['images_per_s']:.1f} img/s "
                  f"({row['images_per_s_per_worker']:.1f} per worker), batch {row['batch_s_median']:.3f} s "
                  f"median, start-up {row['startup_s']:.2f} s", flush=True)
            rows.append(row)
        return {"rows": rows, "config": config_summary(cfg, rows[0], mask_grid, local_crops_number),
                "batches": batches, "warmup": warmup, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(), "cpu_affinity": _affinity(), "torch": torch.__version__,
                "hardware": repro.hardware()}
    finally:
        torch.set_num_threads(threads_before)


def _check_arguments(workers: list[int], batches: int, warmup: int) -> None:
    if not workers or any(not isinstance(w, int) or isinstance(w, bool) or w < 0 for w in workers):
        raise ValueError(f"workers must be a non-empty list of worker counts >= 0, got {workers!r}")
    if batches < 1 or warmup < 0:
        raise ValueError(f"need batches >= 1 and warmup >= 0, got batches={batches}, warmup={warmup}")


def _bench_workers(cfg: config_lib.Config, workers: int, batches: int, warmup: int,
                   mask_grid: Optional[tuple[int, int]], local_crops_number: Optional[int]) -> dict[str, Any]:
    """Build the training loader with ``workers`` workers exactly as training does, and measure it."""
    run_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_workers=workers))
    t0 = time.perf_counter()
    module = SSLDataModule(run_cfg, local_crops_number=local_crops_number, mask_grid=mask_grid)
    loader = module.train_dataloader()
    build_s = time.perf_counter() - t0
    row = {"workers": workers, "build_s": build_s, "dataset_size": len(module.train_set),  # type: ignore[arg-type]
           "batches_per_epoch": len(loader), "persistent_workers": loader.persistent_workers,
           "pin_memory": loader.pin_memory}
    row.update(measure_loader(loader, batches, warmup))
    if module.augments_on_device:  # the loader's batches hold no crops: the shapes the device will make
        row.update(planned_shape(module))
    # Per worker: the main process is the one worker when it loads the data itself.
    row["images_per_s_per_worker"] = row["images_per_s"] / max(workers, 1)
    return row


def measure_loader(loader: ResumableLoader, batches: int, warmup: int) -> dict[str, Any]:
    """Time ``batches`` batches of ``loader`` after ``warmup``; figures of the timed ones as a dict.

    Each batch time is the interval between receiving one batch and the next, i.e. what a consumer
    that does no work of its own waits. Images are counted from the label tensors; crops and pixels
    per image from the first batch's crop shapes.
    """
    stream = _endless(loader)
    try:
        started = time.perf_counter()
        first = next(stream)
        last = time.perf_counter()
        startup_s = last - started
        shape = batch_shape(first)
        taken = 1
        if warmup == 0:  # the first batch is then a timed one, start-up included
            intervals, images = [startup_s], _batch_images(first)
        else:
            intervals, images = [], 0
        while len(intervals) < batches:
            batch = next(stream)
            now = time.perf_counter()
            taken += 1
            if taken > warmup:
                intervals.append(now - last)
                images += _batch_images(batch)
            last = now
    finally:
        stream.close()  # ends the DataLoader iteration; persistent workers go with the loader
    total_s = sum(intervals)
    return {"images_per_s": images / total_s, "images_timed": images, "batches_timed": len(intervals),
            "timed_s": total_s, "startup_s": startup_s, "epochs_started": loader.epoch_sampler.epoch + 1,
            "batch_s_median": statistics.median(intervals), "batch_s_p10": quantile(intervals, 0.1),
            "batch_s_p90": quantile(intervals, 0.9), "batch_s_min": min(intervals),
            "batch_s_max": max(intervals), **shape}


def _endless(loader: ResumableLoader) -> Iterator[Any]:
    """Batches of successive epochs, the sampler's epoch advanced as Lightning does between epochs."""
    if len(loader) == 0:
        raise ValueError(f"the training loader has no full batch (dataset of {len(loader.dataset)} "  # type: ignore[arg-type]
                         f"images, batch {loader.batch_size}): lower data.batch_size or raise data.subset")
    while True:
        yield from loader
        loader.epoch_sampler.set_epoch(loader.epoch_sampler.epoch + 1)


def _batch_images(batch: Batch) -> int:
    """Source images in a training batch: the length of its labels."""
    return int(batch.labels.shape[0])


def batch_shape(batch: Batch) -> dict[str, Any]:
    """Crops, pixels and channel values per source image of a training batch, from its tensors' shapes.

    ``pixels_per_image`` sums H*W over the crops; ``values_per_image`` multiplies in the channels
    (the floats the model reads); ``masked`` says whether the batch carries iBOT masks.
    """
    if not isinstance(batch, Batch):  # an ImageBatch (data.augment_on=device): no crops yet
        return {"masked": batch.masks is not None}
    crops = batch.crops
    pixels = sum(int(c.shape[-2]) * int(c.shape[-1]) for c in crops)
    values = sum(int(c[0].numel()) for c in crops)
    return {"crops_per_image": len(crops), "crop_sizes": [list(c.shape[-2:]) for c in crops],
            "channels": int(crops[0].shape[1]), "pixels_per_image": pixels, "values_per_image": values,
            "masked": batch.masks is not None}


def planned_shape(module: SSLDataModule) -> dict[str, Any]:
    """``batch_shape``'s figures for the crops ``module`` makes after the transfer (data.augment_on=device)."""
    d = module.data_cfg
    sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * d.local_crops_number
    pixels = sum(s * s for s in sizes)
    return {"crops_per_image": len(sizes), "crop_sizes": [[s, s] for s in sizes], "channels": 3,
            "pixels_per_image": pixels, "values_per_image": 3 * pixels,
            "masked": module.mask_grid is not None}


def config_summary(cfg: config_lib.Config, row: dict[str, Any], mask_grid: Optional[tuple[int, int]],
                   local_crops_number: Optional[int]) -> dict[str, Any]:
    """The data settings the figures belong to (the local crop count as actually used)."""
    d = cfg.data
    local = d.local_crops_number if local_crops_number is None else local_crops_number
    return {"dataset": d.name, "subset": d.subset, "dataset_size": row["dataset_size"],
            "batch_size": d.batch_size, "global_crops_number": 2, "global_crop_size": d.global_crop_size,
            "local_crops_number": local, "local_crop_size": d.local_crop_size,
            "mask_grid": list(mask_grid) if mask_grid is not None else None, "seed": cfg.seed,
            "config_num_workers": d.num_workers, "multicrop": d.multicrop,
            "augment_on": d.augment_on if d.multicrop == "tensor" else "workers"}


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated ``q`` quantile (numpy's default) of a non-empty list."""
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _affinity() -> Optional[int]:
    """CPUs this process may run on (fewer than cpu_count under taskset or a cgroup), None if unknown."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return None


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table of the figures, one row per worker count."""
    lines = ["| workers | img/s | img/s per worker | batch s median | p10 | p90 | start-up s "
             "| crops/img | pixels/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['workers']} | {r['images_per_s']:.1f} | {r['images_per_s_per_worker']:.1f} "
                     f"| {r['batch_s_median']:.4f} | {r['batch_s_p10']:.4f} | {r['batch_s_p90']:.4f} "
                     f"| {r['startup_s']:.2f} | {r['crops_per_image']} | {r['pixels_per_image']} |")
    return "\n".join(lines)
