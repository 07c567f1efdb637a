"""Speed levers of the training step (config section ``speed``): compile, channels_last, checkpointing, ...

Each lever changes how fast a step runs, never what it computes: ``tests/test_speed.py`` trains a
few steps with every lever on and with a plain, loop-per-parameter step written independently, and
compares losses and weights. ``autocast_convs=false`` is the one lever that moves rounding: under autocast it
keeps convolutions in fp32, closer to the fp32 step; ``tests/test_bf16_cpu.py`` checks it against fp32. The
measured effect of each lever is in the README ("Speed").

A lever left ``null`` is chosen by ``speed.auto``: ``rules`` (fixed: channels_last for convolutional
backbones, small_map_conv on the CPU, timm's SDPA attention, convolutions under autocast) or ``measure``
(timed on this machine and cached, ``run/lever_tuning.py``). :func:`apply` returns every choice with its source and reason; training
writes them to env.json (``speed_levers``) and ``bench train`` to its record.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ssl_bench.backbones import small_map_conv
from ssl_bench.config import Config

LEVERS = ("small_map_conv", "channels_last", "fused_attention", "autocast_convs", "physical_cores")


def runs_on_cuda(cfg: Config) -> bool:
    """Whether ``trainer.accelerator`` puts the run on a CUDA GPU (``auto``: when torch sees one)."""
    a = cfg.trainer.accelerator
    return a in ("gpu", "cuda") or (a == "auto" and torch.cuda.is_available())


def rules(is_vit: bool, cuda: bool) -> dict[str, bool]:
    """The fixed choices for levers left null under ``speed.auto=rules``."""
    from timm.layers import use_fused_attn  # timm's own default (TIMM_FUSED_ATTN in the environment)

    return {"small_map_conv": not cuda, "channels_last": not is_vit, "fused_attention": bool(use_fused_attn()),
            "autocast_convs": True, "physical_cores": False}


def is_mixed(cfg: Config) -> bool:
    """Whether the run computes under autocast (``bf16-mixed`` or ``16-mixed``)."""
    return cfg.trainer.precision.endswith("-mixed")


def measurable(is_vit: bool, cuda: bool, mixed: bool = False, smt: bool = False) -> tuple[str, ...]:
    """The levers whose payoff ``speed.auto=measure`` times on this backbone, device, precision and CPU.

    ``smt``: the CPU runs more than one thread per core and ``trainer.num_threads`` is left null.
    """
    if cuda:
        return ("fused_attention",) if is_vit else ("channels_last",)
    threads = ("physical_cores",) if smt else ()
    if is_vit:
        return ("fused_attention",) + threads
    return ("small_map_conv", "channels_last") + (("autocast_convs",) if mixed else ()) + threads


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
    if values.get("autocast_convs") is False:
        for module in backbone.modules():
            if isinstance(module, nn.Conv2d):
                _fp32_conv(module)
    if values.get("compile"):
        backbone.compile()  # in place: parameter names, so checkpoints, are unchanged
        net.head.compile()


def _fp32_conv(conv: nn.Conv2d) -> None:
    """Run ``conv`` in fp32 inside autocast (its output stays fp32; the BatchNorm after it takes it as is).

    Set on the instance, so the state dict and the class (SmallMapConv2d included) are unchanged. On some CPUs
    oneDNN's bf16 convolutions at tiny maps are slower than its fp32 ones while the head's bf16 GEMMs are
    faster: README "Speed".
    """
    inner = conv._conv_forward

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return inner(x.float(), weight, bias)

    conv._conv_forward = forward  # type: ignore[method-assign]


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
    no_smt = _why_no_thread_choice(cfg, cuda)
    smt = no_smt is None
    choices: dict[str, dict[str, Any]] = {}
    for name in LEVERS:
        value = getattr(s, name)
        if value is not None:
            choices[name] = {"value": value, "source": "config", "reason": f"speed.{name}={str(value).lower()}"}
        elif name == "fused_attention" and not is_vit:
            choices[name] = {"value": None, "source": "not applicable", "reason": "no attention in a CNN"}
        elif name == "autocast_convs" and (is_vit or not is_mixed(cfg)):
            choices[name] = {"value": None, "source": "not applicable",
                             "reason": "ViTs have no convolutions after the patch embedding" if is_vit
                             else f"trainer.precision={cfg.trainer.precision} runs no autocast"}
        elif name == "physical_cores" and not smt:
            choices[name] = {"value": None, "source": "not applicable", "reason": no_smt}
        else:
            choices[name] = {"value": fixed[name], "source": "rules", "reason": f"speed.auto=rules ({_why(name)})"}
    to_measure = [n for n in measurable(is_vit, cuda, is_mixed(cfg), smt) if getattr(s, n) is None]
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    distributed = dist.is_distributed() or cfg.trainer.devices * cfg.trainer.num_nodes > 1
    if s.auto == "measure" and to_measure:
        from ssl_bench.run import lever_tuning

        choices.update(lever_tuning.choose(method, cfg, to_measure, fixed, device, distributed))
    choices["compile"] = _compile_choice(method, cfg, {n: c["value"] for n, c in choices.items()}, device,
                                         distributed)
    values = {name: c["value"] for name, c in choices.items()}
    if values.get("physical_cores"):
        from ssl_bench.run import lever_tuning

        torch.set_num_threads(lever_tuning.cpu_topology()[1])
    set_levers(method.student, values, student=True)
    set_levers(method.teacher, values, student=False)
    method.speed_levers = choices
    return choices


def _compile_choice(method: nn.Module, cfg: Config, values: dict[str, Any], device: torch.device,
                    distributed: bool) -> dict[str, Any]:
    """``speed.compile``: as set, or, when null, off under ``rules`` and timed against eager under ``measure``.

    Measured after the other levers and on top of their values, because every compiled candidate costs
    minutes of compilation.
    """
    value = cfg.speed.compile
    if value is not None:
        return {"value": value, "source": "config", "reason": f"speed.compile={str(value).lower()}"}
    if cfg.speed.auto != "measure":
        return {"value": False, "source": "rules", "reason": "speed.auto=rules (eager; compilation takes minutes)"}
    from ssl_bench.run import lever_tuning

    return lever_tuning.choose(method, cfg, ["compile"], {"compile": False}, device, distributed,
                               fixed=values)["compile"]


def _why_no_thread_choice(cfg: Config, cuda: bool) -> str | None:
    """None when ``physical_cores`` has a choice to make (a CPU run, threads left null, more threads than
    cores); otherwise why not."""
    if cuda:
        return "a CUDA run: threads feed the GPU"
    if cfg.trainer.num_threads is not None:
        return f"trainer.num_threads={cfg.trainer.num_threads}"
    from ssl_bench.run import lever_tuning

    logical, physical = lever_tuning.cpu_topology()
    return None if physical < logical else f"one thread per core ({physical} cores, {logical} CPUs): torch uses them all"


def _why(name: str) -> str:
    return {"small_map_conv": "on for the CPU, off for CUDA; convolutional backbones only",
            "channels_last": "on for convolutional backbones",
            "fused_attention": "timm's default, SDPA unless TIMM_FUSED_ATTN=0; ViTs only",
            "autocast_convs": "convolutions in the autocast dtype, as autocast does",
            "physical_cores": "torch's default: one thread per logical CPU"}[name]


def is_compiled(method: nn.Module) -> bool:
    return getattr(method.student.backbone, "_compiled_call_impl", None) is not None
