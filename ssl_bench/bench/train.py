"""``ssl-bench bench train``: steady-state training-step throughput, step time, peak memory, FLOPs and MFU.

The step timed is the one training runs: the registered method's ``training_step`` inside a Lightning
``Trainer`` (backward, clipping, AdamW, centering, EMA), with the config's ``speed`` options applied
by :func:`ssl_bench.run.speed.apply`. Collapse diagnostics, checkpoints and k-NN are left out: they are
periodic work, not the step. One image is one source image with its full set of crops.

With ``synthetic`` the batches are pre-made crops held in memory, which isolates the model step from
data loading; otherwise the run's own multi-crop pipeline feeds it. The last layer's first-epoch
freeze is turned off (``method.freeze_last_layer_epochs=0``) so every step updates every parameter,
as in the steady state after epoch one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

from ssl_bench import config as config_lib
from ssl_bench import repro
from ssl_bench.run import speed
from ssl_bench.bench.data import quantile
from ssl_bench.data.batch import Batch
from ssl_bench.methods import build_method
from ssl_bench.methods.base import SSLMethod

SYNTHETIC_BATCHES = 4  # distinct pre-made batches, cycled

# Dense peak FLOP/s per device (vendor figures; tensor cores, no sparsity), for MFU.
PEAK_TFLOPS = {  # name fragment -> {dtype: TFLOP/s}
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},  # SXM
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


class SyntheticCrops(Dataset):
    """``length`` batches ``(crops, labels)`` cycled from ``SYNTHETIC_BATCHES`` pre-made ones.

    Crops are standard-normal (B, 3, S, S) tensors, S the global or local crop size, in the order
    the multi-crop pipeline delivers them (2 global views, then the local views).
    """

    def __init__(self, batch_size: int, global_size: int, local_size: int, local_number: int, length: int,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        sizes = [global_size] * 2 + [local_size] * local_number
        self.batches = [Batch([torch.randn(batch_size, 3, s, s, generator=gen) for s in sizes],
                              torch.zeros(batch_size, dtype=torch.long)) for _ in range(SYNTHETIC_BATCHES)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Batch:
        if not 0 <= index < self.length:
            raise IndexError(f"batch {index} of {self.length}")
        return self.batches[index % len(self.batches)]


class StepTimer(Callback):
    """Wall time of every training step (batch start to batch end, device synchronised) and of each
    interval between step ends, which also holds the wait for the next batch."""

    def __init__(self, warmup: int, total: int, report_every_s: float = 10.0, profiler: Any = None) -> None:
        self.warmup, self.total, self.profiler = warmup, total, profiler
        self.step_s: list[float] = []
        self.interval_s: list[float] = []
        self._start = self._last_end = 0.0
        self._report_every_s = report_every_s
        self._last_report = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(pl_module.device)
        if batch_idx == self.warmup and pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        end = time.perf_counter()
        if batch_idx >= self.warmup:
            self.step_s.append(end - self._start)
            self.interval_s.append(end - self._last_end)
        self._last_end = end
        if self.profiler is not None:
            self.profiler.step()
        if end - self._last_report > self._report_every_s or batch_idx + 1 == self.total:
            phase = "warm-up" if batch_idx < self.warmup else "timed"
            print(f"[bench train] step {batch_idx + 1}/{self.total} ({phase}): {end - self._start:.3f} s", flush=True)
            self._last_report = end


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_flops_per_image(cfg: config_lib.Config, local_crops: int) -> int:
    """FLOPs of one image's model work, counted by torch's FlopCounterMode on a copy of the networks
    on the meta device (no memory, no compute): teacher forward on the global views, student forward
    and backward on all views, heads included.

    Optimizer, EMA and loss arithmetic are not model FLOPs (as in MFU definitions) and are left out.
    """
    d = cfg.data
    with torch.device("meta"):
        method = build_method(cfg)
        sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * local_crops
        crops = [torch.empty(d.batch_size, 3, s, s) for s in sizes]
    counter = FlopCounterMode(display=False)
    with counter:
        with torch.no_grad():
            method.teacher(crops[:2])
        method.student(crops).float().logsumexp(dim=-1).sum().backward()
    return int(counter.get_total_flops() // d.batch_size)


def peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """Dense peak FLOP/s of a CUDA device for the run's precision; None on CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    dtype = "bf16" if "bf16" in precision else "fp16" if "16" in precision else (
        "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    for fragment, table in PEAK_TFLOPS.items():
        if fragment in name and dtype in table:
            return table[dtype] * 1e12
    return None


def bench_config(cfg: config_lib.Config) -> config_lib.Config:
    """The config as benchmarked: every step updates every parameter (no first-epoch freeze)."""
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, freeze_last_layer_epochs=0.0))


def bench_train(cfg: config_lib.Config, steps: int = 20, warmup: int = 5, synthetic: bool = True,
                profile: bool = False) -> dict[str, Any]:
    """Run ``warmup + steps`` training steps of ``cfg`` and return the figures of the last ``steps``.

    With ``profile`` the timed steps run under torch's profiler and the figures gain ``profile``
    (:func:`ssl_bench.bench.profiling.ops_per_step`); they are then slower than unprofiled ones.
    """
    from ssl_bench.run.train import build_datamodule, pipeline_options

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    cfg = bench_config(cfg)
    baseline_mb = repro.peak_rss_mb()  # the interpreter and its imports, before any model exists
    repro.seed_everything(cfg.seed)
    if cfg.trainer.num_threads:
        torch.set_num_threads(cfg.trainer.num_threads)
    method = build_method(cfg)
    total = warmup + steps
    d = cfg.data
    local_override, _ = pipeline_options(cfg, method)
    local = d.local_crops_number if local_override is None else local_override
    flops = model_flops_per_image(cfg, local)
    if synthetic:
        if method.uses_masks:
            raise ValueError(f"--synthetic feeds crops without iBOT masks; {cfg.method.name!r} needs masks: "
                             "benchmark it on its real data pipeline (drop --synthetic)")
        loader: Any = DataLoader(SyntheticCrops(d.batch_size, d.global_crop_size, d.local_crop_size, local, total,
                                                seed=cfg.seed), batch_size=None, shuffle=False)
    else:
        loader = build_datamodule(cfg, method)
    prof = None
    if profile:
        from ssl_bench.bench.profiling import step_profiler

        prof = step_profiler(warmup, steps)
        prof.start()
    timer = StepTimer(warmup, total, profiler=prof)
    started = time.perf_counter()
    trainer = fit_steps(cfg, method, loader, total, [timer])
    fit_s = time.perf_counter() - started
    figures = summarise(cfg, method, timer, flops, fit_s, synthetic, trainer.world_size)
    if prof is not None:
        from ssl_bench.bench.profiling import ops_per_step

        prof.stop()
        figures["profile"] = ops_per_step(prof, steps)
    return {**figures, "rss_before_model_mb": baseline_mb}


def fit_steps(cfg: config_lib.Config, method: SSLMethod, data: Any, steps: int,
              callbacks: list[Callback]) -> Any:
    """Train ``method`` for ``steps`` steps the way training does (Lightning, the config's ``speed``
    options applied), without records, checkpoints or evaluation. ``data``: a DataLoader or DataModule."""
    import lightning as L

    from ssl_bench.run.train import quiet_lightning, trainer_settings

    quiet_lightning()
    trainer = L.Trainer(**trainer_settings(cfg), max_steps=steps, logger=False, callbacks=callbacks,
                        enable_progress_bar=False, log_every_n_steps=10)
    speed.apply(method, cfg)
    if isinstance(data, DataLoader):
        trainer.fit(method, train_dataloaders=data)
    else:
        trainer.fit(method, datamodule=data)
    return trainer


def summarise(cfg: config_lib.Config, method: SSLMethod, timer: StepTimer, flops_per_image: int, fit_s: float,
              synthetic: bool, world_size: int) -> dict[str, Any]:
    """The figures of the timed steps as one JSON-ready dict."""
    images = cfg.data.batch_size * world_size
    intervals, step_s = timer.interval_s, timer.step_s
    if not step_s:
        raise RuntimeError(f"no timed step: training stopped after {len(step_s)} steps (warm-up {timer.warmup})")
    images_per_s = images * len(intervals) / sum(intervals)
    device = method.device
    peak = peak_flops(device, cfg.trainer.precision)
    achieved = flops_per_image * images_per_s
    memory_mb = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
                 else repro.peak_rss_mb())
    return {
        "images_per_s": images_per_s,
        "step_s_median": statistics.median(step_s),
        "step_s_p10": quantile(step_s, 0.1), "step_s_p90": quantile(step_s, 0.9),
        "step_s_min": min(step_s), "step_s_max": max(step_s),
        "interval_s_median": statistics.median(intervals),
        "steps_timed": len(timer.step_s), "warmup_steps": timer.warmup,
        "peak_memory_mb": memory_mb, "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "memory_per_image_mb": memory_mb / cfg.data.batch_size if device.type == "cuda" else None,
        "flops_per_image": flops_per_image, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / peak if peak else None, "peak_tflops": peak / 1e12 if peak else None,
        "fit_s": fit_s, "synthetic": synthetic, "world_size": world_size,
        "batch_size": cfg.data.batch_size, "threads": torch.get_num_threads(), "device": str(device),
        "speed": dataclasses.asdict(cfg.speed), "compiled": speed.is_compiled(method),
        "speed_levers": getattr(method, "speed_levers", None),
    }


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Across repeated runs: the median of throughput and step time, the largest peak memory."""
    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"runs": len(runs), "images_per_s": med("images_per_s"),
            "images_per_s_min": min(r["images_per_s"] for r in runs),
            "images_per_s_max": max(r["images_per_s"] for r in runs),
            "step_s_median": med("step_s_median"), "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
            "flops_per_image": runs[0]["flops_per_image"], "achieved_tflops": med("achieved_tflops"),
            "mfu": med("mfu")}


def format_runs(runs: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    """A Markdown table: one row per run, then the median over runs."""
    lines = ["| run | img/s | step s median | p10 | p90 | peak memory MiB | GFLOP/img | TFLOP/s | MFU |",
             "|---|---|---|---|---|---|---|---|---|"]

    def row(label: str, r: dict[str, Any], p10: Any, p90: Any) -> str:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        return (f"| {label} | {r['images_per_s']:.2f} | {r['step_s_median']:.3f} | {p10} | {p90} "
                f"| {r['peak_memory_mb']:.0f} | {r['flops_per_image'] / 1e9:.2f} | {r['achieved_tflops']:.3f} | {mfu} |")

    for i, r in enumerate(runs, 1):
        lines.append(row(str(i), r, f"{r['step_s_p10']:.3f}", f"{r['step_s_p90']:.3f}"))
    if len(runs) > 1:
        lines.append(row(f"median of {len(runs)}", summary, "", ""))
    return "\n".join(lines)


def bench_train_isolated(cfg: config_lib.Config, steps: int, warmup: int, synthetic: bool,
                         profile: bool = False) -> dict[str, Any]:
    """:func:`bench_train` in a fresh interpreter, so its peak RSS and caches are its own."""
    job = {"config": config_lib.to_dict(cfg), "steps": steps, "warmup": warmup, "synthetic": synthetic,
           "profile": profile}
    # stdout: progress lines, passed on as they come, then the figures as one JSON line; stderr passes through.
    proc = subprocess.Popen([sys.executable, "-m", "ssl_bench.bench.train", json.dumps(job)],
                            stdout=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # type: ignore[union-attr]
        if lines:
            print(lines[-1], end="", flush=True)
        lines.append(line)
    if proc.wait() != 0 or not lines:
        raise RuntimeError(f"benchmark subprocess failed with exit code {proc.returncode}")
    return json.loads(lines[-1])


if __name__ == "__main__":
    _job = json.loads(sys.argv[1])
    _figures = bench_train(config_lib.from_dict(_job["config"]), _job["steps"], _job["warmup"], _job["synthetic"],
                           _job.get("profile", False))
    if int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0:
        print(json.dumps(_figures), flush=True)  # under DDP every rank runs this file; rank 0 reports
