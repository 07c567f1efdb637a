"""Rank, world size and collectives that are no-ops in a single process."""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Iterator

import torch
import torch.distributed as torch_dist


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_distributed():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place across ranks (identity in one process) and return it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place across ranks and return it."""
    return all_reduce_sum(tensor).div_(world_size())


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` across ranks, in place, and return it."""
    if is_distributed():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
    return tensor


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous rows ``[start, stop)`` of ``n`` that ``rank`` owns; sizes differ by at most one, may be empty.

    The first ``n % world`` ranks get one extra row (37 rows on 2 ranks: 19 + 18).
    """
    if world < 1 or not 0 <= rank < world or n < 0:
        raise ValueError(f"shard_range needs n >= 0 and 0 <= rank < world, got n={n}, rank={rank}, world={world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _comm_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective on ``tensor`` must run: NCCL only moves CUDA tensors, gloo takes CPU ones."""
    if torch_dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 in rank order; sizes along dim 0 may differ.

    Trailing dimensions and dtype must agree across ranks. Identity in one process. Rows are
    padded to the largest size for the collective (which needs equal shapes) and trimmed after.
    """
    if not is_distributed():
        return tensor
    device = _comm_device(tensor)
    size = torch.tensor([tensor.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    torch_dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]), device=device)
    if padded.numel() == 0:  # nothing anywhere: skip the collective, which rejects empty buffers
        return tensor.new_zeros((sum(counts), *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    torch_dist.all_gather(gathered, padded)
    return torch.cat([g[:c] for g, c in zip(gathered, counts)]).to(tensor.device)


# Where a launcher puts (rank, world size, local rank): srun (submitit's eval jobs) and torchrun (``ssl-bench eval``).
LAUNCHER_ENV = {"slurm": ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
                "torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def launcher_ranks(launcher: str, environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, local rank) that ``launcher`` ("slurm" or "torchrun") set; (0, 1, 0) when unset."""
    environ = os.environ if environ is None else environ
    names = LAUNCHER_ENV[launcher]
    if not all(n in environ for n in names[:2]):
        return 0, 1, 0
    return int(environ[names[0]]), int(environ[names[1]]), int(environ.get(names[2], "0") or 0)


def join_launched_group(launcher: str, device: torch.device, timeout_s: float = 1800.0) -> torch.device:
    """Join the process group of the tasks that ``launcher`` started, if it started more than one.

    The rendezvous is MASTER_ADDR:MASTER_PORT (set by torchrun, or for SLURM jobs by
    ``launch.jobs.distributed_env``); the backend is NCCL on CUDA, else gloo. Returns the device this
    rank uses: ``cuda:<local rank>`` when ``device`` is CUDA, else ``device``.
    """
    rank_, world, local = launcher_ranks(launcher)
    if world <= 1 or is_distributed():
        return device
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"{world} {launcher} tasks but no {' or '.join(missing)} in the environment: "
                           f"cannot form the process group")
    if device.type == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # env:// reads MASTER_ADDR/MASTER_PORT and, under torchrun, joins the store its agent already serves.
    torch_dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                  rank=rank_, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return device


def leave_group(wait: bool = True) -> None:
    """Destroy the process group; with ``wait``, after a barrier, so no rank leaves while another still
    needs it. After an error pass ``wait=False``: the other ranks may be inside another collective."""
    if is_distributed():
        if wait:
            barrier()
        torch_dist.destroy_process_group()


@contextlib.contextmanager
def launched_group(launcher: str, device: torch.device) -> Iterator[torch.device]:
    """``join_launched_group`` for the block (yields this rank's device), then ``leave_group``: after a
    barrier when the block ended normally, at once when it raised."""
    device = join_launched_group(launcher, device)
    try:
        yield device
    except BaseException:
        leave_group(wait=False)
        raise
    leave_group()
