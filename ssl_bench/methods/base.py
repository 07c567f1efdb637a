"""Shared machinery of self-distillation methods: EMA teacher, param groups, schedules.

Follows DINO (Caron et al. 2021), facebookresearch/dino ``main_dino.py``
(``get_params_groups``, ``clip_gradients``, ``cancel_gradients_last_layer``,
the EMA update and the schedules of ``train_dino``).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import lightning as L
import torch
from torch import nn

from ssl_bench import schedules
from ssl_bench.backbones import Backbone, build_backbone
from ssl_bench.config import Config
from ssl_bench.heads import DINOHead
from ssl_bench.registry import Registry

METHODS: Registry[type["SSLMethod"]] = Registry("method")


class StudentTeacherNet(nn.Module):
    """Backbone + DINO head; crops of one resolution share one backbone call."""

    def __init__(self, backbone: Backbone, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Args: crops: V tensors (B, 3, H_v, W_v). Returns (V*B, K) logits in view order."""
        features = []
        start = 0
        while start < len(crops):  # group consecutive crops of the same size, as multi-crop orders them
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])).cls)
            start = end
        return self.head(torch.cat(features))


def build_net(cfg: Config, drop_path_rate: float) -> StudentTeacherNet:
    backbone = build_backbone(dataclasses.replace(cfg.backbone, drop_path_rate=drop_path_rate))
    m = cfg.method
    head = DINOHead(backbone.embed_dim, m.out_dim, m.head_hidden_dim, m.head_bottleneck_dim,
                    m.head_nlayers, m.norm_last_layer)
    return StudentTeacherNet(backbone, head)


def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """Weight decay on weights only; none on biases and norm parameters (ndim == 1)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> None:
    """Scale each parameter's gradient to norm <= max_norm, independently (DINO's clip_gradients)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or max_norm <= 0:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scales.unbind()))


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over matching parameters."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class SSLMethod(L.LightningModule):
    """Base for student/teacher methods; subclasses write ``training_step`` like the paper."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False  # the step below is DINO's algorithm box
        self.student = build_net(cfg, cfg.backbone.drop_path_rate)
        self.teacher = build_net(cfg, 0.0)  # the official teacher has no stochastic depth
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.steps_per_epoch = 1
        self.total_steps = 1

    # ----- schedules: functions of the global step -------------------------------
    def on_train_start(self) -> None:
        self.steps_per_epoch = max(int(self.trainer.num_training_batches), 1)
        self.total_steps = self.cfg.optim.epochs * self.steps_per_epoch

    def epochs_to_steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def total_batch_size(self) -> int:
        return self.cfg.data.batch_size * self.trainer.world_size

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        base = schedules.scaled_lr(o.lr, self.total_batch_size())
        return schedules.cosine(step, self.total_steps, base, o.min_lr, self.epochs_to_steps(o.warmup_epochs))

    def weight_decay_at(self, step: int) -> float:
        o = self.cfg.optim
        return schedules.cosine(step, self.total_steps, o.weight_decay, o.weight_decay_end)

    def momentum_at(self, step: int) -> float:
        m = self.cfg.method
        return schedules.cosine(step, self.total_steps, m.momentum_teacher, m.momentum_teacher_end)

    def teacher_temp_at(self, step: int) -> float:
        m = self.cfg.method
        return schedules.linspace_at(step, self.epochs_to_steps(m.warmup_teacher_temp_epochs),
                                     m.warmup_teacher_temp, m.teacher_temp)

    # ----- optimisation helpers ---------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups(self.student), lr=0.0)

    def set_optimizer_schedule(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        lr, wd = self.lr_at(step), self.weight_decay_at(step)
        for i, group in enumerate(optimizer.param_groups):
            group["lr"] = lr
            if i == 0:  # only the regularised group decays
                group["weight_decay"] = wd
        return {"lr": lr, "wd": wd}

    def optimize(self, loss: torch.Tensor, step: int) -> dict[str, float]:
        """Backward, per-parameter clipping, last-layer freeze, AdamW step with scheduled lr/wd."""
        opt = self.optimizers()
        values = self.set_optimizer_schedule(opt.optimizer, step)
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        clip_per_parameter(list(self.student.parameters()), self.cfg.optim.clip_grad)
        if step < self.epochs_to_steps(self.cfg.method.freeze_last_layer_epochs):
            for p in self.student.head.last_layer.parameters():
                p.grad = None  # prototypes stay fixed in the first epoch(s)
        opt.step()
        return values

    def eval_backbone(self) -> Backbone:
        """The network evaluated by k-NN: the teacher backbone, as in DINO."""
        return self.teacher.backbone


def build_method(cfg: Config) -> SSLMethod:
    return METHODS.get(cfg.method.name)(cfg)
