"""``ssl-bench bench compare``: ssl-bench's training step beside the reference loops, interleaved in one pass.

Per repeat and config, every loop runs once, in a fresh process and in a fixed order: ssl-bench in each
precision asked for, then the official DINO loop, then lightly (``ssl_bench/bench/reference_loops.py``). A slow
spell of a shared machine then falls on every loop alike. All of them train on pre-made synthetic crops of the
config's shapes (``bench train --synthetic``), so the model step is what is timed. Ratios are taken to the official
loop's fp32 median, and per repeat to the official run of that repeat. Everything is checked before the first run:
the configs, the DINO checkout, that lightly imports; a loop that cannot run is skipped with a message, never
silently.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import statistics
from typing import Any, Callable, Optional

from ssl_bench import config as config_lib
from ssl_bench.bench.train import bench_config

REFERENCE_LOOPS = ("official", "lightly")
LOOPS = ("ssl-bench", *REFERENCE_LOOPS)
REAL_DATA = "ssl-bench (real data)"  # the label of ssl-bench's runs on its own data pipeline (--real-data)
VIT_SHAPES = {"vit_tiny": (192, 3), "vit_small": (384, 6), "vit_base": (768, 12)}  # embed dim, heads
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VIT_KWARGS = ("embed_dim", "num_heads")  # the backbone.kwargs the reference ViTs take
RESNET_KWARGS = ("zero_init_last",)  # an initialisation choice only: torchvision's own init in the references


@dataclasses.dataclass
class Entry:
    """One config in the pass: its name (file stem), its resolved config per precision, the reference loops' job."""

    name: str
    cfgs: dict[str, config_lib.Config]
    job: Optional[dict[str, Any]]


def reference_job(cfg: config_lib.Config, steps: int, warmup: int) -> dict[str, Any]:
    """The reference loops' description of ``cfg``: the same shapes, head, loss, optimizer and threads.

    Raises ConfigError naming the key when the config has no counterpart in the reference loops.
    """
    cfg = bench_config(cfg)  # as ``bench train`` runs it: no last-layer freeze
    b, m, o, d = cfg.backbone, cfg.method, cfg.optim, cfg.data
    if m.name != "dino":
        raise config_lib.ConfigError(f"method.name={m.name!r}: the reference loops are DINO's; compare 'dino' "
                                     "configs, or pass --loops ssl-bench")
    job: dict[str, Any] = {"batch_size": d.batch_size, "global_size": d.global_crop_size,
                           "local_size": d.local_crop_size, "local_number": d.local_crops_number,
                           "drop_path_rate": b.drop_path_rate, "out_dim": m.out_dim, "hidden_dim": m.head_hidden_dim,
                           "bottleneck_dim": m.head_bottleneck_dim, "head_nlayers": m.head_nlayers,
                           "norm_last_layer": m.norm_last_layer, "teacher_temp": m.teacher_temp,
                           "warmup_teacher_temp": m.warmup_teacher_temp, "student_temp": m.student_temp,
                           "center_momentum": m.center_momentum, "momentum_teacher": m.momentum_teacher,
                           "optimizer": o.optimizer, "lr": o.lr, "min_lr": o.min_lr, "weight_decay": o.weight_decay,
                           "weight_decay_end": o.weight_decay_end, "clip_grad": o.clip_grad,
                           "threads": cfg.trainer.num_threads or _default_threads(), "seed": cfg.seed,
                           "steps": steps, "warmup": warmup, "device": _device(cfg)}
    vit = re.match(r"(vit_tiny|vit_small|vit_base)_patch(\d+)", b.name)
    if vit:
        embed_dim, heads = VIT_SHAPES[vit.group(1)]
        _check_kwargs(b.kwargs, VIT_KWARGS)
        if b.layerscale is not None:
            raise config_lib.ConfigError(f"backbone.layerscale={b.layerscale}: the official DINO ViT has no "
                                         "LayerScale; set backbone.layerscale=null to compare")
        job.update(arch=vit.group(1), timm_name=b.name, patch_size=b.patch_size or int(vit.group(2)),
                   depth=b.depth or 12, embed_dim=b.kwargs.get("embed_dim", embed_dim),
                   num_heads=b.kwargs.get("num_heads", heads))
    elif b.name in RESNETS:
        _check_kwargs(b.kwargs, RESNET_KWARGS)
        if b.cifar_stem:
            raise config_lib.ConfigError("backbone.cifar_stem=true: torchvision's ResNet in the reference loops "
                                         "has the ImageNet stem; set backbone.cifar_stem=false to compare")
        job.update(arch=b.name)
    else:
        raise config_lib.ConfigError(f"backbone.name={b.name!r} has no counterpart in the reference loops; they "
                                     f"build vit_tiny/vit_small/vit_base_patchN_* or {', '.join(RESNETS)}")
    return job


def check_synthetic(cfg: config_lib.Config, path: str) -> None:
    """The pass feeds synthetic crops; a method that needs iBOT masks cannot take them."""
    import torch

    from ssl_bench.methods import build_method

    with torch.device("meta"):
        if build_method(cfg).uses_masks:
            raise config_lib.ConfigError(f"{path}: method.name={cfg.method.name!r} needs iBOT masks, which the "
                                         "synthetic crops of bench compare lack; time it with bench train")


def _check_kwargs(kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    extra = sorted(set(kwargs) - set(allowed))
    if extra:
        raise config_lib.ConfigError(f"backbone.kwargs.{extra[0]}: the reference loops cannot build it; they take "
                                     f"{', '.join(allowed)} only")


def _default_threads() -> int:
    import torch

    return torch.get_num_threads()


def _device(cfg: config_lib.Config) -> str:
    from ssl_bench.run.speed import runs_on_cuda

    return "cuda" if runs_on_cuda(cfg) else "cpu"


def available_loops(loops: list[str], dino_src: Optional[str]) -> tuple[list[str], dict[str, str]]:
    """The loops that can run here, and for each one skipped the reason (printed and recorded)."""
    from ssl_bench.bench.reference_loops import check_dino_src

    unknown = [name for name in loops if name not in LOOPS]
    if unknown:
        raise config_lib.ConfigError(f"--loops: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(LOOPS)}")
    skipped: dict[str, str] = {}
    if "official" in loops:
        if not dino_src:
            skipped["official"] = ("no DINO checkout: pass --dino-src or set DINO_SRC to a clone of "
                                   "https://github.com/facebookresearch/dino")
        else:
            check_dino_src(dino_src)  # a path given but wrong is an error, not a skip
    if "lightly" in loops and importlib.util.find_spec("lightly") is None:
        skipped["lightly"] = "lightly is not installed (pip install lightly)"
    return [name for name in loops if name not in skipped], skipped


SslRunner = Callable[..., dict[str, Any]]  # (cfg, steps, warmup, synthetic[, profile]) -> figures
RefRunner = Callable[[dict[str, Any]], dict[str, Any]]


def compare_loops(entries: list[Entry], loops: list[str], precisions: list[str], steps: int, warmup: int,
                  repeats: int, run_ssl: SslRunner, run_reference: RefRunner,
                  dino_src: Optional[str] = None, profile: bool = False, real_data: bool = False) -> dict[str, Any]:
    """Run every (config, loop, precision) once per repeat, interleaved; return the runs and their summary.

    With ``real_data``, ssl-bench also runs on the config's own data pipeline in each precision, as the loop
    ``ssl-bench (real data)``: the end-to-end figure beside the references' synthetic-crop step.

    With ``profile``, one more round runs every loop under torch's profiler; its per-op figures go to
    ``profiles[config][label]`` (label ``ssl-bench 32-true``, ``official``...) and stay out of the medians.
    """
    if repeats < 1:
        raise ValueError(f"need repeats >= 1, got {repeats}")
    variants = [("ssl-bench", p) for p in precisions if "ssl-bench" in loops]
    variants += [(REAL_DATA, p) for p in precisions if real_data and "ssl-bench" in loops]
    variants += [(name, "32-true") for name in REFERENCE_LOOPS if name in loops]
    runs = []
    for repeat in range(repeats):
        for entry in entries:
            for loop, precision in variants:
                print(f"[bench compare] repeat {repeat + 1}/{repeats}, {entry.name}: {loop} {precision} "
                      f"({warmup} warm-up + {steps} timed steps)", flush=True)
                if loop in ("ssl-bench", REAL_DATA):
                    figures = run_ssl(entry.cfgs[precision], steps, warmup, loop == "ssl-bench")
                else:
                    figures = run_reference({**entry.job, "loop": loop, "dino_src": dino_src})
                runs.append({"repeat": repeat, "config": entry.name, "loop": loop, "precision": precision, **figures})
                print(f"[bench compare]   {figures['images_per_s']:.2f} img/s, "
                      f"peak {figures['peak_memory_mb']:.0f} MiB", flush=True)
    result: dict[str, Any] = {"runs": runs, "summary": summarise(runs, [e.name for e in entries], variants)}
    if profile:
        result["profiles"] = {}
        for entry in entries:
            for loop, precision in variants:
                if loop == REAL_DATA:  # the profile is of the step; the synthetic run has it
                    continue
                label = f"{loop} {precision}" if loop == "ssl-bench" else loop
                print(f"[bench compare] profile, {entry.name}: {label}", flush=True)
                figures = (run_ssl(entry.cfgs[precision], steps, warmup, True, True) if loop == "ssl-bench"
                           else run_reference({**entry.job, "loop": loop, "dino_src": dino_src, "profile": True}))
                result["profiles"].setdefault(entry.name, {})[label] = {
                    "images_per_s_profiled": figures["images_per_s"], **figures["profile"]}
    return result


def summarise(runs: list[dict[str, Any]], configs: list[str], variants: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per (config, loop, precision): img/s of each repeat, the median, the largest peak memory, and the ratio
    to the official loop (of the medians, and of the runs paired by repeat), None without an official run."""
    out = []
    for name in configs:
        def of(loop: str, precision: str) -> list[dict[str, Any]]:
            return sorted((r for r in runs if r["config"] == name and r["loop"] == loop
                           and r["precision"] == precision), key=lambda r: r["repeat"])

        official = of("official", "32-true")
        for loop, precision in variants:
            mine = of(loop, precision)
            rates = [r["images_per_s"] for r in mine]
            row: dict[str, Any] = {
                "config": name, "loop": loop, "precision": precision, "images_per_s_runs": rates,
                "images_per_s": statistics.median(rates), "images_per_s_min": min(rates),
                "images_per_s_max": max(rates), "step_s_median": statistics.median(r["step_s_median"] for r in mine),
                "peak_memory_mb": max(r["peak_memory_mb"] for r in mine),
                "ratio_to_official": None, "ratio_to_official_runs": None}
            if official:
                paired = [a["images_per_s"] / b["images_per_s"] for a, b in zip(mine, official)]
                row.update(ratio_to_official=row["images_per_s"] / statistics.median(r["images_per_s"] for r in official),
                           ratio_to_official_runs=paired,
                           peak_memory_to_official=row["peak_memory_mb"] / max(r["peak_memory_mb"] for r in official))
            out.append(row)
    return out


def format_table(result: dict[str, Any]) -> str:
    """A Markdown table, one row per (config, loop, precision), with the ratio to the official loop."""
    lines = ["| config | loop | precision | img/s median | runs | x official fp32 | x per repeat (min-max) "
             "| step s median | peak memory MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for s in result["summary"]:
        ratio = "-" if s["ratio_to_official"] is None else f"{s['ratio_to_official']:.2f}"
        paired = s["ratio_to_official_runs"]
        spread = "-" if not paired else f"{min(paired):.2f}-{max(paired):.2f}"
        lines.append(f"| {s['config']} | {s['loop']} | {s['precision']} | {s['images_per_s']:.2f} "
                     f"| {', '.join(f'{r:.2f}' for r in s['images_per_s_runs'])} | {ratio} | {spread} "
                     f"| {s['step_s_median']:.3f} | {s['peak_memory_mb']:.0f} |")
    for loop, reason in result.get("skipped", {}).items():
        lines.append(f"\nskipped {loop}: {reason}")
    for name, profiles in result.get("profiles", {}).items():
        from ssl_bench.bench.profiling import compare_ops

        base = "official" if "official" in profiles else next(iter(profiles))
        lines.append(f"\nprofile of {name}, self CPU ms per step, largest differences from {base} first "
                     f"(profiled runs are slower):\n" + compare_ops(profiles, base))
    return "\n".join(lines)
