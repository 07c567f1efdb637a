"""The reference loops of ``ssl-bench bench compare``: official DINO's training loop, and DINO with lightly.

Neither loop's code is copied here.

* ``official``: facebookresearch/dino's own ``main_dino.train_one_epoch``, imported from a checkout (``--dino-src``
  or ``DINO_SRC``) and called unchanged. The checkout also supplies the models (``vision_transformer``, torchvision's
  ResNets through ``MultiCropWrapper``), ``DINOHead``, ``DINOLoss``, the parameter groups, clipping and schedules.
  What this file adds is what ``train_dino`` would have set up around it: pre-made batches in place of the data
  loader, a single-process gloo group (``DINOLoss.update_center`` all-reduces), and a holder that exposes
  ``.module`` as ``DistributedDataParallel`` does. At world size 1, DDP would only add gradient-bucket copies;
  ssl-bench on one device has no DDP either. On the CPU, three device calls of that code are mapped:
  ``Tensor.cuda`` returns the tensor, ``torch.cuda.synchronize`` does nothing, and
  ``MetricLogger.synchronize_between_processes`` is skipped, because it builds a CUDA tensor.
* ``lightly``: our loop, written from lightly's DINO example, with lightly's ``DINOProjectionHead``, ``DINOLoss``
  and ``update_momentum``. There is one forward per view, as in the example. AdamW and per-parameter clipping are
  added to match the config.

Each loop runs in a fresh interpreter (``python -m ssl_bench.bench.reference_loops JOB``). That interpreter imports
torch and the reference only, and prints its figures as the last line of stdout. A step's time runs from one batch
request to the next, which is the same span as ssl-bench's time between step ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ssl_bench import repro  # stdlib and torch only: the reference process imports nothing else of ours

SYNTHETIC_BATCHES = 4  # distinct pre-made batches, cycled (as ssl_bench.bench.train.SyntheticCrops)
DINO_FILES = ("main_dino.py", "utils.py", "vision_transformer.py")


class TimedBatches:
    """``total`` pre-made ``(crops, labels)`` batches; ``marks`` holds the time of every request and of the end."""

    def __init__(self, batches: list[Any], total: int, profiler: Any = None) -> None:
        self.batches, self.total, self.profiler = batches, total, profiler
        self.marks: list[float] = []
        self.losses: list[float] = []  # filled by the loop that consumes the batches

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Any]:
        for i in range(self.total):
            self.mark()
            yield self.batches[i % len(self.batches)]
        self.mark()

    def mark(self) -> None:
        """A step ended (or the first begins): its time, and the profiler's step."""
        if self.marks and self.profiler is not None:
            self.profiler.step()
        self.marks.append(time.perf_counter())


class DDPHolder(nn.Module):
    """What ``DistributedDataParallel`` exposes at world size 1 (``.module``, forward), without the all-reduce."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def synthetic_batches(job: dict[str, Any], device: torch.device) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
    """Standard-normal crops, 2 global then the local views, as ``bench train --synthetic`` makes them."""
    gen = torch.Generator().manual_seed(job["seed"])
    sizes = [job["global_size"]] * 2 + [job["local_size"]] * job["local_number"]
    b = job["batch_size"]
    return [([torch.randn(b, 3, s, s, generator=gen).to(device) for s in sizes], torch.zeros(b, dtype=torch.long))
            for _ in range(SYNTHETIC_BATCHES)]


def dino_commit(dino_src: str) -> dict[str, Any]:
    """The checkout's git commit and whether it has local changes (None where it is not a git work tree)."""
    def git(*cmd: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", dino_src, *cmd], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha.strip() if sha else None, "dirty": bool(status.strip()) if status is not None else None}


def check_dino_src(dino_src: str) -> None:
    """A DINO checkout has main_dino.py, utils.py and vision_transformer.py at its top (ConfigError otherwise)."""
    from ssl_bench.config import ConfigError

    missing = [f for f in DINO_FILES if not (Path(dino_src) / f).is_file()]
    if missing:
        raise ConfigError(f"--dino-src / DINO_SRC {dino_src!r} is not a facebookresearch/dino checkout: "
                                f"{', '.join(missing)} missing (git clone https://github.com/facebookresearch/dino)")


def official_loop(job: dict[str, Any], device: torch.device) -> TimedBatches:
    """Build the official student, teacher, loss and optimizer, and run ``train_one_epoch`` over the batches."""
    sys.path.insert(0, job["dino_src"])
    import main_dino  # noqa: E402 (from the checkout)
    import utils as dino_utils  # noqa: E402
    import vision_transformer as vits  # noqa: E402
    from torchvision import models as torchvision_models

    if device.type == "cpu":
        torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
        torch.cuda.synchronize = lambda *args, **kwargs: None  # type: ignore[assignment]
        dino_utils.MetricLogger.synchronize_between_processes = lambda self: None
    arch = job["arch"]
    if arch.startswith("vit"):  # the arguments of the checkout's vit_tiny/vit_small/vit_base, any depth
        shape = dict(patch_size=job["patch_size"], embed_dim=job["embed_dim"], depth=job["depth"],
                     num_heads=job["num_heads"], mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
        student = vits.VisionTransformer(drop_path_rate=job["drop_path_rate"], **shape)
        teacher = vits.VisionTransformer(**shape)
        embed_dim = student.embed_dim
    else:
        student, teacher = torchvision_models.__dict__[arch](), torchvision_models.__dict__[arch]()
        embed_dim = student.fc.weight.shape[1]
    head = dict(nlayers=job["head_nlayers"], hidden_dim=job["hidden_dim"], bottleneck_dim=job["bottleneck_dim"])
    student = dino_utils.MultiCropWrapper(student, vits.DINOHead(embed_dim, job["out_dim"], use_bn=False,
                                                                 norm_last_layer=job["norm_last_layer"], **head))
    teacher = dino_utils.MultiCropWrapper(teacher, vits.DINOHead(embed_dim, job["out_dim"], False, **head))
    student, teacher = DDPHolder(student.to(device)), teacher.to(device)
    teacher.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    loss = main_dino.DINOLoss(job["out_dim"], job["local_number"] + 2, job["warmup_teacher_temp"],
                              job["teacher_temp"], 0, 1, job["student_temp"], job["center_momentum"]).to(device)
    groups = dino_utils.get_params_groups(student)
    optimizer = (torch.optim.AdamW(groups) if job["optimizer"] == "adamw"
                 else torch.optim.SGD(groups, lr=0, momentum=0.9))
    total = job["warmup"] + job["steps"]
    lr = dino_utils.cosine_scheduler(job["lr"] * job["batch_size"] / 256.0, job["min_lr"], 1, total)
    wd = dino_utils.cosine_scheduler(job["weight_decay"], job["weight_decay_end"], 1, total)
    momentum = dino_utils.cosine_scheduler(job["momentum_teacher"], 1, 1, total)
    args = argparse.Namespace(epochs=1, clip_grad=job["clip_grad"], freeze_last_layer=0)
    batches = TimedBatches(synthetic_batches(job, device), total, job.get("profiler"))
    stats = main_dino.train_one_epoch(student, teacher, teacher, loss, batches, optimizer, lr, wd, momentum, 0,
                                      None, args)
    batches.losses = [stats["loss"]]  # the loop's own average over the epoch
    return batches


def lightly_loop(job: dict[str, Any], device: torch.device) -> TimedBatches:
    """DINO from lightly's modules, one forward per view; AdamW and per-parameter clipping as the config has."""
    import copy

    from lightly.loss import DINOLoss
    from lightly.models.modules import DINOProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum

    if job["arch"].startswith("vit"):
        import timm

        backbone = timm.create_model(job["timm_name"], patch_size=job["patch_size"], img_size=job["global_size"],
                                     depth=job["depth"], num_classes=0, dynamic_img_size=True,
                                     drop_path_rate=job["drop_path_rate"])
        teacher_backbone = timm.create_model(job["timm_name"], patch_size=job["patch_size"],
                                             img_size=job["global_size"], depth=job["depth"], num_classes=0,
                                             dynamic_img_size=True)
        teacher_backbone.load_state_dict(backbone.state_dict())
        dim = backbone.num_features
    else:
        from torchvision import models as torchvision_models

        backbone = torchvision_models.__dict__[job["arch"]]()
        dim = backbone.fc.in_features
        backbone.fc = nn.Identity()
        teacher_backbone = copy.deepcopy(backbone)
    head = DINOProjectionHead(dim, job["hidden_dim"], job["bottleneck_dim"], job["out_dim"],
                              norm_last_layer=job["norm_last_layer"])
    teacher_head = DINOProjectionHead(dim, job["hidden_dim"], job["bottleneck_dim"], job["out_dim"])
    teacher_head.load_state_dict(head.state_dict())
    student = nn.ModuleList([backbone, head]).to(device)
    teacher = nn.ModuleList([teacher_backbone, teacher_head]).to(device)
    deactivate_requires_grad(teacher)
    criterion = DINOLoss(output_dim=job["out_dim"], warmup_teacher_temp=job["warmup_teacher_temp"],
                         teacher_temp=job["teacher_temp"], warmup_teacher_temp_epochs=0,
                         student_temp=job["student_temp"], center_momentum=job["center_momentum"]).to(device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=job["lr"] * job["batch_size"] / 256.0,
                                  weight_decay=job["weight_decay"])
    total = job["warmup"] + job["steps"]
    batches = TimedBatches(synthetic_batches(job, device), total, job.get("profiler"))
    for views, _ in batches:
        update_momentum(student, teacher, m=job["momentum_teacher"])
        teacher_out = [teacher[1](teacher[0](v)) for v in views[:2]]
        student_out = [head(backbone(v)) for v in views]
        loss = criterion(teacher_out, student_out, epoch=0)
        batches.losses.append(loss.item())
        loss.backward()
        clip_per_parameter(student, job["clip_grad"])
        head.cancel_last_layer_gradients(current_epoch=0)
        optimizer.step()
        optimizer.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return batches


def clip_per_parameter(model: nn.Module, clip: float) -> None:
    """DINO's rule: each parameter's gradient scaled to norm ``clip`` where it is larger (0 = off)."""
    if not clip:
        return
    for p in model.parameters():
        if p.grad is not None:
            scale = clip / (p.grad.norm(2) + 1e-6)
            if scale < 1:
                p.grad.mul_(scale)


def run_loop(job: dict[str, Any]) -> dict[str, Any]:
    """Run one reference loop in this process and return its figures (the timed steps after the warm-up)."""
    rss_before = repro.peak_rss_mb()
    torch.manual_seed(job["seed"])
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    loop = {"official": official_loop, "lightly": lightly_loop}[job["loop"]]
    with contextlib.ExitStack() as stack:
        if job["loop"] == "official":
            import torch.distributed as dist

            store = stack.enter_context(tempfile.TemporaryDirectory())
            dist.init_process_group("gloo", init_method=f"file://{store}/pg", rank=0, world_size=1)
            stack.callback(dist.destroy_process_group)
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # the loop's own log lines
        prof = None
        if job.get("profile"):
            from ssl_bench.bench.profiling import step_profiler

            prof = stack.enter_context(step_profiler(job["warmup"], job["steps"]))
        started = time.perf_counter()
        batches = loop({**job, "profiler": prof}, device)
        loop_s = time.perf_counter() - started
    steps = [b - a for a, b in zip(batches.marks, batches.marks[1:])][job["warmup"]:]
    peak = (torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda"
            else repro.peak_rss_mb())
    figures = {"loop": job["loop"], "images_per_s": job["batch_size"] * len(steps) / sum(steps),
               "step_s_median": statistics.median(steps), "step_s_min": min(steps), "step_s_max": max(steps),
               "steps_timed": len(steps), "warmup_steps": job["warmup"], "peak_memory_mb": peak,
               "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
               "rss_before_model_mb": rss_before, "loop_s": loop_s, "threads": torch.get_num_threads(),
               "device": str(device), "precision": "32-true", "torch": torch.__version__,
               "loss_mean": statistics.fmean(batches.losses)}
    if prof is not None:
        from ssl_bench.bench.profiling import ops_per_step

        figures["profile"] = ops_per_step(prof, job["steps"])
    if job["loop"] == "official":
        figures["dino_src"] = {"path": job["dino_src"], **dino_commit(job["dino_src"])}
    else:
        import lightly

        figures["lightly"] = lightly.__version__
    return figures


def run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """:func:`run_loop` in a fresh interpreter; its log lines pass through on stderr."""
    proc = subprocess.run([sys.executable, "-m", "ssl_bench.bench.reference_loops", json.dumps(job)],
                          stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {job['loop']} reference loop failed with exit code {proc.returncode} "
                           "(its output is above)")
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(run_loop(json.loads(sys.argv[1]))), flush=True)
