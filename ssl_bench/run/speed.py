"""Speed levers of the training step (config section ``speed``): compile, channels_last, checkpointing.

Each lever changes how fast a step runs, never what it computes: ``tests/test_speed.py`` trains a
few steps with every lever on and with a plain, loop-per-parameter step written independently, and
compares losses and weights. The measured effect of each lever is in the README ("Speed").

A lever left ``null`` is chosen by ``speed.auto``: ``rules`` (fixed: channels_last for convolutional
backbones, small_map_conv on the CPU, timm's SDPA attention) or ``measure`` (timed on this machine and
cached, ``run/lever_tuning.py``). :func:`apply` returns every choice with its source and reason; training
writes them to env.json (``speed_levers``) and ``bench train`` to its record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_bench.backbones import small_map_conv
from ssl_bench.config import Config

LEVERS = ("small_map_conv", "channels_last", "fused_attention")


def runs_on_cuda(cfg: Config) -> bool:
    """Whether ``trainer.accelerator`` puts the run on a CUDA GPU (``auto``: when torch sees one)."""
    a = cfg.trainer.accelerator
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def rules(is_vit: bool, cuda: bool) -> dict[str, bool]:
    """The fixed choices for levers left null under ``speed.auto=rules``."""
    from timm.layers import use_fused_attn  # timm's own default (TIMM_FUSED_ATTN in the environment)

    return {"small_map_conv": not cuda, "channels_last": not is_vit, "fused_attention": bool(use_fused_attn())}


def measurable(is_vit: bool, cuda: bool) -> tuple[str, ...]:
    """The levers whose payoff ``speed.auto=measure`` times on this backbone and device."""
    if is_vit:
        return ("fused_attention",)
    return ("channels_last",) if cuda else ("small_map_conv", "channels_last")


def set_levers(net: nn.Module, values: dict[str, bool], student: bool) -> None:
    """Apply lever values to one network (a student or teacher with ``.backbone``), in place."""
    backbone = net.backbone
    if values.get("small_map_conv") and student:  # the teacher computes no gradient
        small_map_conv.enable(backbone)  # a ViT's patch embedding takes it only for maps of <= 4 pixels
    if values.get("channels_last"):
        backbone.to(memory_format=torch.channels_last)
        backbone.channels_last = True
    if values.get("fused_attention") is not None:
        for module in backbone.modules():
            if hasattr(module, "fused_attn"):  # timm's Attention: SDPA when True, softmax(q k^T) v when False
                module.fused_attn = bool(values["fused_attention"])


def apply(method: nn.Module, cfg: Config) -> dict[str, dict[str, Any]]:
    """Apply the ``speed`` options to a method's student and teacher networks, in place.

    Call after the method is built and before training starts (weights may be loaded in between:
    in-place ``nn.Module.compile`` keeps parameter names, so checkpoints are unchanged). Returns, per
    lever, ``{"value", "source": config | rules | measured | cache, "reason"}``; also kept as
    ``method.speed_levers``.
    """
    from ssl_bench import dist

    s = cfg.speed
    cuda = runs_on_cuda(cfg)
    is_vit = method.student.backbone.is_vit
    if s.activation_checkpointing:
        if not is_vit:
            raise ValueError("speed.activation_checkpointing applies to ViT backbones only; "
                             f"{cfg.backbone.name!r} has no transformer blocks")
        method.student.backbone.model.set_grad_checkpointing(True)
    fixed = rules(is_vit, cuda)
    choices: dict[str, dict[str, Any]] = {}
    for name in LEVERS:
        value = getattr(s, name)
        if value is not None:
            choices[name] = {"value": value, "source": "config", "reason": f"speed.{name}={str(value).lower()}"}
        elif name == "fused_attention" and not is_vit:
            choices[name] = {"value": None, "source": "not applicable", "reason": "no attention in a CNN"}
        else:
            choices[name] = {"value": fixed[name], "source": "rules", "reason": f"speed.auto=rules ({_why(name)})"}
    to_measure = [n for n in measurable(is_vit, cuda) if getattr(s, n) is None]
    if s.auto == "measure" and to_measure:
        from ssl_bench.run import lever_tuning

        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        distributed = dist.is_distributed() or cfg.trainer.devices * cfg.trainer.num_nodes > 1
        choices.update(lever_tuning.choose(method, cfg, to_measure, fixed, device, distributed))
    values = {name: c["value"] for name, c in choices.items()}
    set_levers(method.student, values, student=True)
    set_levers(method.teacher, values, student=False)
    if s.compile:
        for net in (method.student, method.teacher):
            net.backbone.compile()
            net.head.compile()
    method.speed_levers = choices
    return choices


def _why(name: str) -> str:
    return {"small_map_conv": "on for the CPU, off for CUDA; convolutional backbones only",
            "channels_last": "on for convolutional backbones",
            "fused_attention": "timm's default, SDPA unless TIMM_FUSED_ATTN=0; ViTs only"}[name]


def is_compiled(method: nn.Module) -> bool:
    return getattr(method.student.backbone, "_compiled_call_impl", None) is not None
