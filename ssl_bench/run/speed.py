"""Speed levers of the training step (config section ``speed``): compile, channels_last, checkpointing.

Each lever changes how fast a step runs, never what it computes: ``tests/test_speed.py`` trains a
few steps with every lever on and with a plain, loop-per-parameter step written independently, and
compares losses and weights. The measured effect of each lever is in the README ("Speed").
"""

from __future__ import annotations

import torch
from torch import nn

from ssl_bench.backbones import small_map_conv
from ssl_bench.config import Config


def wants(switch: bool | None, auto: bool) -> bool:
    """The switch's value, or when it is None the automatic choice for this device and backbone."""
    return auto if switch is None else switch


def apply(method: nn.Module, cfg: Config) -> None:
    """Apply the ``speed`` options to a method's student and teacher networks, in place.

    Call after the method is built and before training starts (weights may be loaded in between:
    in-place ``nn.Module.compile`` keeps parameter names, so checkpoints are unchanged).
    """
    s = cfg.speed
    cuda = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto"
                                                          and torch.cuda.is_available())
    nets = [method.student, method.teacher]
    is_vit = method.student.backbone.is_vit
    if s.activation_checkpointing:
        if not is_vit:
            raise ValueError("speed.activation_checkpointing applies to ViT backbones only; "
                             f"{cfg.backbone.name!r} has no transformer blocks")
        method.student.backbone.model.set_grad_checkpointing(True)
    if wants(s.small_map_conv, auto=not cuda):  # the student only: the teacher computes no gradient
        small_map_conv.enable(method.student.backbone)
    if wants(s.channels_last, auto=not is_vit):
        for net in nets:
            net.backbone.to(memory_format=torch.channels_last)
            net.backbone.channels_last = True
    if s.compile:
        for net in nets:
            net.backbone.compile()
            net.head.compile()


def is_compiled(method: nn.Module) -> bool:
    return getattr(method.student.backbone, "_compiled_call_impl", None) is not None

