"""``trainer.strategy=fsdp``: student and teacher sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

The sharding units are the transformer blocks (for CNNs, the backbone's top-level children), then the
backbone and the head (see :func:`shard_units`); DINOv2 wraps each block too (``dinov2/fsdp``). The
student keeps its gathered parameters from forward to backward (``reshard_after_forward=False``:
DINOv2's ``ShardingStrategy.SHARD_GRAD_OP``, so parameters are gathered once per step); the teacher
has no backward and frees them after its forward.

Student and teacher are the same modules on the same mesh, so each rank holds the same rows of both
and the EMA update is local to each rank's shard (DTensor ops on shards of one layout). Buffers (the
centers) are not sharded. k-NN and the checks that read whole weights go through :func:`full_state`,
a collective every rank must call.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

FSDP = "fsdp"


def shard_units(net: nn.Module) -> list[nn.Module]:
    """The modules of ``net`` (a ``StudentTeacherNet``) sharded one by one, innermost first.

    Each unit is gathered by its own ``forward``: the transformer blocks (for CNNs the backbone's
    top-level parts), then the backbone and the head, which ``forward_views`` calls directly (the
    net's own ``forward`` is not on the training path, so the root unit holds no parameters).
    """
    model = net.backbone.model
    inner = list(model.blocks) if hasattr(model, "blocks") else [
        child for child in model.children() if any(True for _ in child.parameters())]
    return [*inner, net.backbone, net.head]


def shard_net(net: nn.Module, mesh: Any, reshard_after_forward: bool) -> None:
    """Apply ``fully_shard`` to every unit of ``net`` and then to ``net`` itself (in place)."""
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(net):
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every sharded tensor gathered whole (every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in module.state_dict().items()}


@contextlib.contextmanager
def gradient_sync_paused(net: nn.Module) -> Iterator[None]:
    """FSDP2's ``no_sync``: the backward keeps unsharded gradients and skips the reduce-scatter."""
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def lightning_strategy(cfg: Any) -> Any:
    """The ``L.Trainer(strategy=...)`` of ``cfg.trainer.strategy``: Lightning's choice (DDP for several
    processes) or, for fsdp, ``ModelParallelStrategy`` over all ranks, which calls ``configure_model``
    (where the nets are sharded) and saves sharded (distributed) checkpoints."""
    if cfg.trainer.strategy != FSDP:
        return "auto"
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=cfg.trainer.devices * cfg.trainer.num_nodes,
                                 tensor_parallel_size=1, save_distributed_checkpoint=True)


@torch.no_grad()
def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give each parameter without optimizer state (DINO's frozen last layer, before its first step)
    the state its optimizer would create at its first gradient.

    A sharded checkpoint is loaded into the state of a fresh optimizer, which torch fills for every
    parameter, so every key must be saved. The values equal lazy creation: AdamW's zero moments at step 0
    (the first real step makes it step 1), SGD's zero momentum buffer (momentum * 0 + grad = the
    clone of the first gradient that SGD would take, as ssl-bench's SGD has no dampening).
    """
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for group in optimizer.param_groups:
        for p in group["params"]:
            if optimizer.state.get(p):
                continue
            if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                on_device = group.get("fused") or group.get("capturable")
                state = {"step": torch.zeros((), dtype=torch.float32 if group.get("fused") else scalar,
                                             device=p.device) if on_device else torch.tensor(0.0, dtype=scalar),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            elif isinstance(optimizer, torch.optim.SGD) and group["momentum"] and not group["dampening"]:
                state = {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
            elif isinstance(optimizer, torch.optim.SGD) and not group["momentum"]:
                continue  # plain SGD keeps no state
            else:
                raise NotImplementedError(f"trainer.strategy=fsdp: no lazy state known for {type(optimizer).__name__} "
                                          f"with {dict((k, v) for k, v in group.items() if k != 'params')}")
            optimizer.state[p] = state
