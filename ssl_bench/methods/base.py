"""Shared machinery of self-distillation methods: EMA teacher, param groups, schedules.

Follows DINO (Caron et al. 2021), facebookresearch/dino ``main_dino.py``
(``get_params_groups``, ``clip_gradients``, ``cancel_gradients_last_layer``,
the EMA update and the schedules of ``train_dino``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from typing import Any, NamedTuple, Optional

import lightning as L
import torch
from torch import nn

from ssl_bench import schedules
from ssl_bench.backbones import Backbone, Features, build_backbone
from ssl_bench.config import Config, rank_batch_size, run_id
from ssl_bench.heads import DINOHead
from ssl_bench.methods import sharding
from ssl_bench.methods.finite import FiniteWatch
from ssl_bench.methods.parts import NUM_GLOBAL_CROPS
from ssl_bench.registry import Registry

METHODS: Registry[type["SSLMethod"]] = Registry("method")


class DiagnosticInputs(NamedTuple):
    """Detached tensors of one step for the collapse diagnostics (see ``eval/collapse.py``)."""

    targets: list[torch.Tensor]  # teacher probabilities per global view, (B, K) each
    student_logits: list[torch.Tensor]  # student outputs per view, (B, K) each
    teacher_cls: torch.Tensor  # (2B, D) teacher backbone CLS features of the global views


class MicroStep(NamedTuple):
    """What one micro-batch of a step leaves for the step's end (``DINO.end_step``)."""

    losses: dict[str, torch.Tensor]  # scalar losses by name, "dino" first
    teacher_logits: torch.Tensor  # (2b, K) detached teacher outputs of the global views, for the targets' update
    diagnostics: Optional[DiagnosticInputs]  # None unless the diagnostics callback sampled this step
    loss: Optional[torch.Tensor] = None  # detached weighted loss / number of micro-batches


def merge_diagnostics(parts: list[DiagnosticInputs]) -> DiagnosticInputs:
    """The diagnostics inputs of a whole step from those of its micro-batches (rows concatenated per view)."""
    if len(parts) == 1:
        return parts[0]
    def per_view(views: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.cat(rows) for rows in zip(*views)]

    return DiagnosticInputs(per_view([p.targets for p in parts]), per_view([p.student_logits for p in parts]),
                            torch.cat([p.teacher_cls for p in parts]))


class StudentTeacherNet(nn.Module):
    """Backbone + DINO head; crops of one resolution share one backbone call."""

    def __init__(self, backbone: Backbone, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def backbone_cls(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Args: crops: V tensors (B, 3, H_v, W_v). Returns (V*B, D) CLS features in view order."""
        features = []
        start = 0
        while start < len(crops):  # group consecutive crops of the same size, as multi-crop orders them
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])).cls)
            start = end
        return torch.cat(features)

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Args: crops: V tensors (B, 3, H_v, W_v). Returns (V*B, K) logits in view order."""
        return self.head(self.backbone_cls(crops))

    def forward_views(self, crops: list[torch.Tensor], masks: Optional[torch.Tensor] = None,
                      ) -> tuple[Features, torch.Tensor]:
        """The global views' backbone features (what the optional terms read) and the head logits of all views.

        Args: crops: V tensors (B, 3, H_v, W_v), the 2 global views first; masks: (2B, N) bool, the
        global patches the mask token replaces (iBOT), or None.
        Returns: Features of the global views (cls (2B, D), patches (2B, N, D)) and (V*B, K) logits.
        """
        global_views = self.backbone(torch.cat(crops[:NUM_GLOBAL_CROPS]), masks=masks)
        local_cls = [self.backbone_cls(crops[NUM_GLOBAL_CROPS:])] if len(crops) > NUM_GLOBAL_CROPS else []
        return global_views, self.head(torch.cat([global_views.cls, *local_cls]))


def build_net(cfg: Config, drop_path_rate: float, mask_token: bool = False) -> StudentTeacherNet:
    backbone = build_backbone(dataclasses.replace(cfg.backbone, drop_path_rate=drop_path_rate), mask_token)
    m = cfg.method
    head = DINOHead(backbone.embed_dim, m.out_dim, m.head_hidden_dim, m.head_bottleneck_dim,
                    m.head_nlayers, m.norm_last_layer)
    return StudentTeacherNet(backbone, head)


# Backbone parameters that sit before block 0 (DINOv2 ``get_vit_lr_decay_rate`` gives them layer 0).
EMBEDDING_PARAMS = (".pos_embed", ".patch_embed", ".mask_token", ".cls_token", ".reg_token")


def vit_layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for block i, num_layers + 1 for the final norm and the heads."""
    if name.startswith("backbone."):
        if any(tag in name for tag in EMBEDDING_PARAMS):
            return 0
        if ".blocks." in name:
            return int(name.split(".blocks.")[1].split(".")[0]) + 1
    return num_layers + 1


def param_groups(model: nn.Module, layerwise_decay: float = 1.0, patch_embed_lr_mult: float = 1.0,
                 num_layers: int = 0) -> list[dict[str, Any]]:
    """Parameter groups carrying ``lr_scale`` and ``apply_wd``.

    No weight decay on biases and norm/LayerScale parameters (ndim == 1), as DINO's
    ``get_params_groups``; layer-wise lr decay ``decay^(num_layers + 1 - layer_id)`` and the
    patch-embedding multiplier as DINOv2 (facebookresearch/dinov2 ``utils/param_groups.py``).
    """
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        apply_wd = not (name.endswith(".bias") or p.ndim == 1)
        scale = layerwise_decay ** (num_layers + 1 - vit_layer_id(name, num_layers)) if num_layers else 1.0
        if ".patch_embed" in name:
            scale *= patch_embed_lr_mult
        groups.setdefault((apply_wd, scale), []).append(p)
    return [{"params": params, "apply_wd": wd, "lr_scale": scale, "weight_decay": 0.0}
            for (wd, scale), params in sorted(groups.items(), key=lambda kv: (not kv[0][0], -kv[0][1]))]


@torch.no_grad()
def clip_per_parameter(params: list[nn.Parameter], max_norm: float) -> Optional[torch.Tensor]:
    """Scale each parameter's gradient to norm <= max_norm, independently (DINO's clip_gradients).

    Returns the total gradient norm before clipping (a device tensor, no host sync), or None
    without gradients; ``max_norm <= 0`` measures without clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    norms = torch.stack(torch._foreach_norm(grads))
    if max_norm > 0:
        scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, list(scales.unbind()))
    total = norms.norm()
    return total.to_local() if hasattr(total, "to_local") else total  # FSDP: a replicated DTensor


def unscale_gradients(trainer: "L.Trainer", optimizer: torch.optim.Optimizer) -> bool:
    """Divide the gradients by the fp16 loss scale now, as official DINO's ``fp16_scaler.unscale_``
    before ``clip_gradients``; True when a GradScaler is active.

    Lightning's ``MixedPrecision.optimizer_step`` unscales right before ``on_before_optimizer_step``,
    except for optimizers that unscale inside their own step (fused AdamW/SGD: ``_step_supports_amp_scaling``,
    the attribute Lightning itself reads), whose gradients would reach the clip still scaled by 65536 and
    more. Those are unscaled here; ``GradScaler.step`` then sees them as unscaled and only skips on inf.
    """
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None:
        return False
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
    return True


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- m * teacher + (1 - m) * student, over matching parameters."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


class SSLMethod(L.LightningModule):
    """Base for student/teacher methods: the nets, schedules, optimisation and checkpoint state.

    ``methods/dino.py`` composes the training step from parts on top of it.
    """

    # What the data pipeline must deliver to this method (run/train.py reads these).
    uses_local_crops = True  # False: 2 global views only, data.local_crops_number is ignored
    uses_masks = False  # True: batches carry iBOT block masks for the global views
    # DINO's collapse ablations of the schedules (Fig. 7, Table 7); each a registered name, not a config value.
    sharpening = True  # False: the teacher temperature is the student's
    teacher_momentum = True  # False: momentum 0, the teacher copies the student after every step

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False  # the step below is DINO's algorithm box
        self.student = build_net(cfg, cfg.backbone.drop_path_rate, mask_token=self.uses_masks)
        self.teacher = build_net(cfg, 0.0, mask_token=self.uses_masks)  # the official teacher has no drop path
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        o = cfg.optim
        if (o.layerwise_decay != 1.0 or o.patch_embed_lr_mult != 1.0) and not self.student.backbone.is_vit:
            raise ValueError("optim.layerwise_decay and optim.patch_embed_lr_mult apply to ViT backbones only; "
                             f"{cfg.backbone.name!r} has no transformer blocks")
        self.steps_per_epoch = 1
        self.total_steps = 1
        self.diagnostics_wanted = False  # set by the diagnostics callback on the steps it samples
        self.diagnostic_inputs: DiagnosticInputs | None = None
        self._rng_to_restore: dict[str, Any] | None = None
        self.finite = FiniteWatch(cfg.train.fp16_max_consecutive_skips)  # read by callbacks.NonFiniteGuard

    # ----- schedules: functions of the global step -------------------------------
    def on_train_start(self) -> None:
        self.steps_per_epoch = max(int(self.trainer.num_training_batches), 1)
        self.total_steps = self.cfg.optim.epochs * self.steps_per_epoch
        if self._rng_to_restore is not None:  # after Lightning's restore and setup, just before the first batch
            set_rng_states(self._rng_to_restore)
            self._rng_to_restore = None

    def configure_model(self) -> None:
        """trainer.strategy=fsdp: shard student and teacher over the data-parallel mesh (methods/sharding.py)."""
        if self.cfg.trainer.strategy == sharding.FSDP and not sharding.is_sharded(self.student):
            mesh = self.device_mesh["data_parallel"]
            sharding.shard_net(self.student, mesh, reshard_after_forward=False)  # SHARD_GRAD_OP
            sharding.shard_net(self.teacher, mesh, reshard_after_forward=True)  # no backward to keep them for

    # ----- checkpoints: what Lightning's own state lacks for an exact resume -------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the run id and every rank's RNG states (drop path draws from torch's global generator)."""
        checkpoint["ssl_bench"] = {"run_id": run_id(self.cfg), "global_step": self.global_step,
                                   "fp16_skips": self.finite.state_dict()}
        checkpoint["rng_states"] = gather_rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.finite.load_state_dict(checkpoint.get("ssl_bench", {}).get("fp16_skips", {}), self.device)
        states = checkpoint.get("rng_states")
        if states:  # this rank's states when the world size is the same, else rank 0's
            self._rng_to_restore = states[self.global_rank] if len(states) == self.trainer.world_size else states[0]

    def epochs_to_steps(self, epochs: float) -> int:
        return int(round(epochs * self.steps_per_epoch))

    def total_batch_size(self) -> int:
        """Images per optimizer step over all ranks (the lr scales with it): micro-batches included."""
        return rank_batch_size(self.cfg) * self.trainer.world_size

    def lr_at(self, step: int) -> float:
        o = self.cfg.optim
        base = schedules.scaled_lr(o.lr, self.total_batch_size(), o.lr_scaling)
        return schedules.cosine(step, self.total_steps, base, o.min_lr, self.epochs_to_steps(o.warmup_epochs))

    def weight_decay_at(self, step: int) -> float:
        o = self.cfg.optim
        return schedules.cosine(step, self.total_steps, o.weight_decay, o.weight_decay_end)

    def momentum_at(self, step: int) -> float:
        m = self.cfg.method
        if not self.teacher_momentum:
            return 0.0
        return schedules.cosine(step, self.total_steps, m.momentum_teacher, m.momentum_teacher_end)

    def teacher_temp_at(self, step: int) -> float:
        m = self.cfg.method
        if not self.sharpening:
            return m.student_temp
        if m.teacher_temp_schedule == "per_epoch":  # official DINO: teacher_temp_schedule[epoch]
            return schedules.teacher_temp_per_epoch(step, self.steps_per_epoch, int(m.warmup_teacher_temp_epochs),
                                                    m.warmup_teacher_temp, m.teacher_temp)
        return schedules.linspace_at(step, self.epochs_to_steps(m.warmup_teacher_temp_epochs),
                                     m.warmup_teacher_temp, m.teacher_temp)

    # ----- optimisation helpers ---------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        backbone = self.student.backbone.model
        depth = len(backbone.blocks) if hasattr(backbone, "blocks") else 0
        groups = param_groups(self.student, o.layerwise_decay, o.patch_embed_lr_mult, depth)
        # speed.fused_optimizer: one fused kernel over all tensors (CPU and CUDA) instead of one op each
        fused = {"fused": True} if self.cfg.speed.fused_optimizer and not (  # DTensor has no fused SGD kernel
            o.optimizer == "sgd" and sharding.is_sharded(self.student)) else {}
        if o.optimizer == "sgd":  # DINO's ResNet-50 recipe: SGD with momentum 0.9
            return torch.optim.SGD(groups, lr=0.0, momentum=0.9, **fused)
        return torch.optim.AdamW(groups, lr=0.0, **fused)

    def set_optimizer_schedule(self, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
        lr, wd = self.lr_at(step), self.weight_decay_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
            group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
        return {"lr": lr, "wd": wd}

    def optimize(self, loss: torch.Tensor, step: int) -> dict[str, float]:
        """Backward, then (in :meth:`on_before_optimizer_step`) unscale, clip and freeze, then the AdamW step.

        Under fp16 the GradScaler skips the update when a gradient is inf/NaN; the EMA teacher and
        the center are still updated after such a step, as official DINO does (its ``DINOLoss``
        updates the center inside the forward, and ``train_one_epoch`` runs the EMA after
        ``fp16_scaler.step`` whether or not it stepped): the teacher moves toward an unchanged student.
        """
        opt = self.optimizers()
        values = self.set_optimizer_schedule(opt.optimizer, step)
        self.finite.observe(step, "loss", loss)  # read back by callbacks.NonFiniteGuard, no sync here
        self.manual_backward(loss)  # scaled by the GradScaler under fp16; the gradients were None before
        opt.step()  # Lightning: unscale (non-fused) -> on_before_optimizer_step -> (scaler.)step -> update
        # Free the gradients now rather than at the next step: they would otherwise sit through the next
        # forward passes, raising peak memory by one copy of the student (same update either way).
        opt.zero_grad(set_to_none=True)
        return values

    def gradient_sync_paused(self) -> contextlib.AbstractContextManager:
        """Under DDP, ``no_sync``: a backward of a micro-batch that is not a step's last keeps its gradients
        local (the last one's all-reduce averages their sum); elsewhere nothing."""
        model = self._trainer.strategy.model if self._trainer is not None else None
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return sharding.gradient_sync_paused(self.student) if sharding.is_sharded(self.student) else \
            contextlib.nullcontext()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Unscaled gradients first, then DINO's per-parameter clip and the last-layer freeze (habit 12)."""
        step = self.global_step
        scaler_active = unscale_gradients(self.trainer, optimizer)
        grad_norm = clip_per_parameter(list(self.student.parameters()), self.cfg.optim.clip_grad)
        if grad_norm is not None:
            self.finite.observe_gradients(step, grad_norm, scaler_active)
        if step < self.epochs_to_steps(self.cfg.method.freeze_last_layer_epochs):
            for name, p in self.student.named_parameters():
                if ".last_layer." in name:  # every head's prototypes stay fixed in the first epoch(s)
                    p.grad = None

    # ----- collapse diagnostics (DINO Fig. 7) ------------------------------------------
    def offer_diagnostics(self, targets: list[torch.Tensor], student_logits: list[torch.Tensor],
                          teacher_cls: torch.Tensor) -> None:
        """Hand this step's tensors to the diagnostics callback when it asked for them.

        Args: targets: teacher probabilities per global view, (B, K) each; student_logits:
        per view, (B, K) each; teacher_cls: (2B, D) teacher backbone CLS of the global views.
        """
        if self.diagnostics_wanted:
            self.diagnostic_inputs = DiagnosticInputs([t.detach() for t in targets],
                                                      [s.detach() for s in student_logits], teacher_cls.detach())

    def eval_backbone(self) -> Backbone:
        """The network evaluated by k-NN: the teacher backbone, as in DINO; under FSDP a whole copy of it
        on every rank (gathered: every rank must call this), since ranks forward different numbers of batches."""
        if not sharding.is_sharded(self.teacher):
            return self.teacher.backbone
        whole = build_backbone(dataclasses.replace(self.cfg.backbone, drop_path_rate=0.0), self.uses_masks)
        whole.load_state_dict(sharding.full_state(self.teacher.backbone))
        return whole.to(self.device)


def rng_states() -> dict[str, Any]:
    """Torch CPU (and CUDA) generator, Python ``random`` and NumPy global states, as tensors and
    plain values, so ``torch.load(weights_only=True)`` reads them back."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                              "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                                        "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of :func:`rng_states`."""
    import numpy as np

    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every rank's :func:`rng_states`, in rank order (one entry in a single process).

    Called from ``on_save_checkpoint``, which Lightning runs on every rank of a save.
    """
    import torch.distributed as torch_dist

    states = rng_states()
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [states]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, states)
    return gathered


def build_method(cfg: Config) -> SSLMethod:
    return METHODS.get(cfg.method.name)(cfg)
