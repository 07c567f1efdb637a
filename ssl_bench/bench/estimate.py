"""``ssl-bench grid plan --estimate``: the bill of a study before it is submitted.

Runs that cost the same per step (same backbone, crops, batch, head, method, precision, device and
speed options; the lr, temperatures, seeds and so on do not matter) share one short throughput probe
(:func:`ssl_bench.bench.train.bench_train` on synthetic crops, in a fresh process). Each run's
training time is its number of steps times the probed step time; device-hours multiply by the run's
devices. The figures are for the hardware the probe ran on (run the plan on a node of the target
partition for cluster hours) and cover training only, not k-NN or linear evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ssl_bench import config as config_lib

# Config keys that change the cost of one training step.
COST_KEYS = ("backbone", "data.batch_size", "data.global_crop_size", "data.local_crop_size",
             "data.local_crops_number", "method.name", "method.out_dim", "method.head_hidden_dim",
             "method.head_bottleneck_dim", "method.head_nlayers", "method.ibot_separate_head", "method.ibot_out_dim",
             "trainer.accelerator", "trainer.precision", "trainer.num_threads", "speed")


def cost_key(cfg: config_lib.Config) -> str:
    """A string equal for two configs exactly when their steps cost the same."""
    import json

    return json.dumps({k: _plain(config_lib.get_dotted(cfg, k)) for k in COST_KEYS}, sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    import dataclasses

    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def train_images(cfg: config_lib.Config, dataset_size: int) -> tuple[int, int]:
    """(optimizer steps, images) of a run: epochs x full batches per epoch, or trainer.max_steps if smaller."""
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    per_rank = math.ceil(min(dataset_size, cfg.data.subset or dataset_size) / world)
    steps = cfg.optim.epochs * (per_rank // config_lib.rank_batch_size(cfg))
    if cfg.trainer.max_steps >= 0:
        steps = min(steps, cfg.trainer.max_steps)
    return steps, steps * config_lib.images_per_step(cfg)


def dataset_size(cfg: config_lib.Config) -> int:
    from ssl_bench.data.datasets import dataset_size as split_size

    return split_size(cfg.data, "train")


def estimate(runs: list[Any], probe_steps: int = 5, probe_warmup: int = 2,
             probe: Callable[..., dict[str, Any]] | None = None,
             sizes: Callable[[config_lib.Config], int] = dataset_size) -> dict[str, Any]:
    """Probe each distinct cost setting once and price every run.

    Args: runs: the study's RunSpecs; probe: ``bench_train``-like callable (default: the isolated
    one), given (cfg, steps, warmup, synthetic); sizes: train-set size of a config.
    Returns {"settings": [...probe figures...], "runs": [...per run...], "total_device_hours": h}.
    """
    from ssl_bench.bench.train import bench_train_isolated
    from ssl_bench.methods import METHODS

    probe = probe or bench_train_isolated
    settings: dict[str, dict[str, Any]] = {}
    size_cache: dict[str, int] = {}
    rows = []
    for spec in runs:
        cfg = spec.config
        key = cost_key(cfg)
        if key not in settings:
            synthetic = not METHODS.get(cfg.method.name).uses_masks  # masked methods need their real batches
            print(f"[ssl-bench] estimate: probing setting {len(settings) + 1} ({cfg.backbone.name}, batch "
                  f"{cfg.data.batch_size}, {cfg.method.name}, {cfg.trainer.accelerator}) for {probe_steps} steps",
                  flush=True)
            figures = probe(cfg, probe_steps, probe_warmup, synthetic)
            settings[key] = {"setting": len(settings) + 1, "backbone": cfg.backbone.name, "method": cfg.method.name,
                             "batch_size": cfg.data.batch_size, "accelerator": cfg.trainer.accelerator,
                             "images_per_s": figures["images_per_s"], "step_s": figures["step_s_median"],
                             "peak_memory_mb": figures["peak_memory_mb"], "synthetic": synthetic}
        data_key = f"{cfg.data.name}:{cfg.data.root}"
        if data_key not in size_cache:
            size_cache[data_key] = sizes(cfg)
        steps, images = train_images(cfg, size_cache[data_key])
        setting = settings[key]
        hours = steps * setting["step_s"] / 3600
        devices = cfg.trainer.devices * cfg.trainer.num_nodes
        rows.append({"run_id": spec.run_id, "setting": setting["setting"], "steps": steps, "images": images,
                     "train_hours": hours, "devices": devices, "device_hours": hours * devices})
    return {"settings": list(settings.values()), "runs": rows,
            "total_device_hours": sum(r["device_hours"] for r in rows),
            "total_train_hours": sum(r["train_hours"] for r in rows)}


def format_estimate(result: dict[str, Any], device: str) -> str:
    """Markdown: the probed settings, the runs with their hours, and the grid total."""
    import pandas as pd

    settings = pd.DataFrame(result["settings"]).round({"images_per_s": 2, "step_s": 3, "peak_memory_mb": 0})
    runs = pd.DataFrame(result["runs"])
    runs["train_time"] = runs.pop("train_hours").map(duration)
    runs["device_hours"] = runs["device_hours"].map(lambda h: f"{h:.4g}")
    return (f"Throughput probes (synthetic crops unless the method needs masks):\n\n{settings.to_markdown(index=False)}"
            f"\n\nEstimated training time per run (steps x probed step time; evaluation not included):\n\n"
            f"{runs.to_markdown(index=False)}\n\nWhole grid: {result['total_device_hours']:.4g} {device}-hours "
            f"({duration(result['total_train_hours'])} if the runs went one after another)\n")


def duration(hours: float) -> str:
    """``2 h 05 min``, ``12 min 30 s`` or ``4.2 s``."""
    seconds = hours * 3600
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
