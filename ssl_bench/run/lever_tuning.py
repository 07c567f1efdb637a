"""``speed.auto=measure``: the speed levers left ``null`` are chosen by timing them on this machine, once.

The levers measured are the ones whose payoff depends on the hardware: for convolutional backbones
``channels_last`` and, on the CPU, ``small_map_conv`` and (under autocast) ``autocast_convs``; for ViTs
``fused_attention`` (timm's SDPA kernel or explicit softmax attention); on CPUs with more threads than cores,
``physical_cores``. ``compile``, when left null, is timed last, on top of the others' values. Every
combination of them is timed on a copy of the student: forward and backward on synthetic crops of the
config's shapes, in the run's precision, on the run's device, interleaved over ``ROUNDS`` rounds. The fastest combination wins only if it beats the fixed rules' combination by more than
``MARGIN``; otherwise the rules stand, so noise does not flip a lever.

The result is cached per CPU model and flags (or GPU name), torch version, threads, precision and the config's
shape (backbone, batch, crops), in ``<cache>/speed-levers/`` (``$SSL_BENCH_CACHE``, else ``~/.cache/ssl-bench``).
Under DDP nothing is measured, because the ranks would time each other. A cached choice is used if there is one;
otherwise the rules apply, and the reason says so. The levers never change what is computed:
``tests/test_speed.py`` compares every lever against a plain step.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ssl_bench.config import Config

ROUNDS = 2  # interleaved rounds over the combinations
STEPS = 2  # timed forward+backward passes per combination and round, after one untimed
MARGIN = 0.03  # a measured combination replaces the rules' only when this much faster
CACHE_VERSION = 1

Timer = Callable[[nn.Module, dict[str, bool], Config, torch.device], float]


def cache_key(cfg: Config, device: torch.device, levers: list[str]) -> dict[str, Any]:
    """What a measured choice depends on."""
    from ssl_bench import repro

    b, d = cfg.backbone, cfg.data
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else repro.cpu_info()
    return {"version": CACHE_VERSION, "levers": sorted(levers), "hardware": hardware, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "precision": cfg.trainer.precision,
            "backbone": {"name": b.name, "patch_size": b.patch_size, "img_size": b.img_size, "depth": b.depth,
                         "cifar_stem": b.cifar_stem, "kwargs": b.kwargs},
            "crops": {"batch_size": d.batch_size, "global": d.global_crop_size, "local": d.local_crop_size,
                      "local_number": d.local_crops_number}}


def cache_file(key: dict[str, Any]) -> Path:
    from ssl_bench.data.folder_index import cache_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / "speed-levers" / f"{digest}.json"


def read_cache(key: dict[str, Any]) -> Optional[dict[str, Any]]:
    """The cached measurement for ``key``, or None (absent, unreadable or for another key: measured again)."""
    path = cache_file(key)
    try:
        entry = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"[ssl-bench] speed.auto=measure: ignoring unreadable cache {path} ({exc}); measuring again",
              flush=True)
        return None
    return entry if isinstance(entry, dict) and entry.get("key") == json.loads(json.dumps(key, default=str)) else None


def write_cache(key: dict[str, Any], entry: dict[str, Any]) -> None:
    from ssl_bench.tracking.records import atomic_write_text

    path = cache_file(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"key": key, **entry}, indent=2, default=str) + "\n")


def choose(method: nn.Module, cfg: Config, levers: list[str], rules: dict[str, bool], device: torch.device,
           distributed: bool, fixed: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """The value of each lever in ``levers`` (those left null), with its source and reason.

    ``fixed``: the values of the other levers, applied to every timed copy (``compile`` is timed on top of them).
    """
    fixed = {k: v for k, v in (fixed or {}).items() if v is not None and k not in levers}
    key = {**cache_key(cfg, device, levers), **({"fixed": fixed} if fixed else {})}
    cached = read_cache(key)
    if cached is not None:
        return {name: {"value": cached["values"][name], "source": "cache",
                       "reason": f"{cached['reason']} (cached {cache_file(key)})"} for name in levers}
    if distributed:
        reason = ("rules: not measured under DDP (the ranks would time each other); run one process with "
                  "speed.auto=measure, e.g. ssl-bench bench train CONFIG speed.auto=measure, to fill the cache")
        return {name: {"value": rules[name], "source": "rules", "reason": reason} for name in levers}
    combos = [dict(zip(levers, values)) for values in itertools.product([False, True], repeat=len(levers))]
    print(f"[ssl-bench] speed.auto=measure: timing {len(combos)} combinations of {', '.join(levers)} "
          f"on {device} (once per machine and config shape)", flush=True)
    started = time.perf_counter()
    times = measure(method, cfg, [{**fixed, **c} for c in combos], device, time_student)
    took = time.perf_counter() - started
    label = {i: ", ".join(f"{k}={'on' if v else 'off'}" for k, v in c.items()) for i, c in enumerate(combos)}
    base = next(i for i, c in enumerate(combos) if c == {k: rules[k] for k in levers})
    best = min(range(len(combos)), key=lambda i: times[i])
    figures = "; ".join(f"{label[i]} {times[i]:.3f} s" for i in range(len(combos)))
    if best != base and times[best] < (1 - MARGIN) * times[base]:
        chosen = best
        reason = (f"measured: {label[best]} is {100 * (1 - times[best] / times[base]):.0f}% faster than the "
                  f"rules' {label[base]} (student step, median of {ROUNDS} rounds: {figures})")
    else:
        chosen = base
        reason = (f"measured: nothing beats the rules' {label[base]} by more than {MARGIN:.0%} "
                  f"(student step, median of {ROUNDS} rounds: {figures})")
    if "compile" in levers:
        reason += f"; measuring took {took:.0f} s with the compilation, which each run pays again"
    values = combos[chosen]
    write_cache(key, {"values": values, "reason": reason, "times_s": [times[i] for i in range(len(combos))],
                      "combinations": combos})
    return {name: {"value": values[name], "source": "measured", "reason": reason} for name in levers}


def measure(method: nn.Module, cfg: Config, combos: list[dict[str, bool]], device: torch.device,
            timer: Timer) -> list[float]:
    """Median seconds per student step of each combination, over ``ROUNDS`` interleaved rounds."""
    from ssl_bench.run.speed import set_levers

    nets = []
    for combo in combos:
        net = copy.deepcopy(method.student).to(device)
        set_levers(net, combo, student=True)
        nets.append(net)
    rounds: list[list[float]] = [[] for _ in combos]
    for _ in range(ROUNDS):
        for i, combo in enumerate(combos):
            rounds[i].append(timer(nets[i], combo, cfg, device))
    del nets
    return [statistics.median(r) for r in rounds]


def cpu_topology() -> tuple[int, int]:
    """(logical CPUs this process may use, distinct physical cores among them), from Linux's sysfs."""
    import os

    allowed = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in allowed:
        base = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((base.joinpath("physical_package_id").read_text().strip(),
                       base.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(allowed), len(allowed)  # no topology: count every CPU as a core
    return len(allowed), len(cores)


def time_student(net: nn.Module, combo: dict[str, bool], cfg: Config, device: torch.device) -> float:
    """Seconds per forward+backward of the student on synthetic crops (mean of ``STEPS`` after one untimed)."""
    threads = torch.get_num_threads()
    if combo.get("physical_cores"):
        torch.set_num_threads(cpu_topology()[1])
    try:
        return _time_steps(net, cfg, device)
    finally:
        torch.set_num_threads(threads)


def _time_steps(net: nn.Module, cfg: Config, device: torch.device) -> float:
    d = cfg.data
    gen = torch.Generator().manual_seed(0)
    sizes = [d.global_crop_size] * 2 + [d.local_crop_size] * d.local_crops_number
    crops = [torch.randn(d.batch_size, 3, s, s, generator=gen).to(device) for s in sizes]
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}
    precision = cfg.trainer.precision
    autocast_dtype = dtype["bf16"] if "bf16" in precision else dtype["16"] if "16" in precision else None

    def step() -> None:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = net(crops)
        out.float().logsumexp(dim=-1).mean().backward()
        net.zero_grad(set_to_none=True)

    step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(STEPS):
        step()
    _sync(device)
    return (time.perf_counter() - started) / STEPS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
