"""Run a function on 2+ spawned gloo ranks, before and inside a process group (shared by the ddp tests).

Each rank calls ``compute(rank)`` once without a process group (the negative control: every rank
alone) and once inside a gloo group (file:// rendezvous under ``out_dir``), and ``torch.save``s
``{"local": ..., "distributed": ...}`` to ``rank{r}.pt``. ``compute`` must be a module-level
function so spawn can pickle it.
"""

from __future__ import annotations

import datetime
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

SPAWN_DEADLINE_S = 120.0  # hard cap so that a deadlock fails the test instead of hanging it


def _worker(rank: int, compute: Callable[[int], Any], out_dir: str, world_size: int) -> None:
    torch.set_num_threads(1)
    local = compute(rank)
    torch_dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size,
                                  timeout=datetime.timedelta(seconds=60))
    try:
        distributed = compute(rank)
        torch_dist.barrier()
    finally:
        torch_dist.destroy_process_group()
    torch.save({"local": local, "distributed": distributed}, Path(out_dir) / f"rank{rank}.pt")


def run_ranks(compute: Callable[[int], Any], out_dir: Path, world_size: int = 2) -> list[dict[str, Any]]:
    """Spawn the ranks, re-raise a child's exception here, and return each rank's saved results."""
    context = mp.spawn(_worker, args=(compute, str(out_dir), world_size), nprocs=world_size, join=False)
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    try:
        while not context.join(timeout=1.0):  # raises ProcessRaisedException / ProcessExitedException
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size} gloo ranks did not finish within {SPAWN_DEADLINE_S}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
