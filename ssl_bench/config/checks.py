"""Value checks: every field's rule and the cross-field checks, all problems in one ConfigError."""

from __future__ import annotations

from typing import Any, Optional

from ssl_bench.config.rules import ConfigError
from ssl_bench.config.schema import get_dotted, walk
from ssl_bench.config.sections import Config


def check_values(cfg: Config) -> None:
    """Every field's rule (see ``checked``) and the cross-field checks; one ConfigError, one line per problem.

    Registries, model builds and the data are checked in ``run.train.validate_config``.
    """
    problems = field_problems(cfg) + cross_field_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


def field_problems(section: Any, prefix: str = "") -> list[str]:
    """One line per value of ``section`` (a config dataclass, walked recursively) that breaks its field's rule."""
    problems = (item.metadata["check"].problem(f"{prefix}{key}", get_dotted(section, key))
                for key, item in walk(type(section)) if "check" in item.metadata)
    return [problem for problem in problems if problem]


def is_vit_name(name: str) -> bool:
    """Whether a timm model name is a ViT (patch size, grid and depth apply; backbones/ builds it so)."""
    return any(tag in name for tag in ("vit", "deit", "eva"))


def cross_field_problems(cfg: Config) -> list[str]:
    """Checks that involve more than one key (each key on its own already passed or failed its rule)."""
    problems = []
    m, d, t = cfg.method, cfg.data, cfg.train
    if m.teacher_temp_schedule == "per_epoch" and m.warmup_teacher_temp_epochs != int(m.warmup_teacher_temp_epochs):
        problems.append(f"method.warmup_teacher_temp_epochs={m.warmup_teacher_temp_epochs} must be a whole number "
                        "of epochs with method.teacher_temp_schedule=per_epoch")
    if t.collapse_entropy_low >= t.collapse_entropy_high:
        problems.append(f"train.collapse_entropy_low={t.collapse_entropy_low} must be below "
                        f"train.collapse_entropy_high={t.collapse_entropy_high}")
    world = cfg.trainer.devices * cfg.trainer.num_nodes
    if cfg.backbone.sync_batchnorm and cfg.trainer.accelerator == "cpu" and world > 1:
        problems.append(f"backbone.sync_batchnorm=true with trainer.accelerator=cpu and {world} processes: torch's "
                        "SyncBatchNorm runs on CUDA GPUs only; use trainer.accelerator=gpu, or "
                        "backbone.sync_batchnorm=false (statistics per process)")
    if cfg.trainer.strategy == "fsdp":  # the sharded nets (methods/sharding.py) and what they do not support
        if cfg.backbone.sync_batchnorm:
            problems.append("backbone.sync_batchnorm=true with trainer.strategy=fsdp: Lightning converts BatchNorm "
                            "under DDP only; use trainer.strategy=ddp, or backbone.sync_batchnorm=false")
        if cfg.trainer.precision in ("16-mixed", "16", "16-true"):
            problems.append(f"trainer.precision={cfg.trainer.precision} with trainer.strategy=fsdp: fp16 loss "
                            "scaling of sharded gradients is not supported; use bf16-mixed or 32-true, or "
                            "trainer.strategy=ddp")
    if cfg.eval.knn_report_k not in cfg.eval.knn_k:
        problems.append(f"eval.knn_report_k={cfg.eval.knn_report_k} must be one of eval.knn_k={cfg.eval.knn_k}")
    if d.augment_on == "device" and d.multicrop != "tensor":
        problems.append(f"data.augment_on=device needs data.multicrop=tensor (got data.multicrop={d.multicrop}): "
                        "only the tensor multi-crop runs on the training device")
    if d.local_crops_number > 0:
        vit = is_vit_name(cfg.backbone.name)
        patch = cfg.backbone.patch_size if vit else None
        if d.local_crop_size < max(1, patch or 1):
            problems.append(f"data.local_crop_size={d.local_crop_size}: must be >= {max(1, patch or 1)} with "
                            f"data.local_crops_number={d.local_crops_number}"
                            + (f" (a ViT with backbone.patch_size={patch})" if patch else "")
                            + "; data.local_crops_number=0 trains without local crops")
    if cfg.speed.physical_cores and cfg.trainer.num_threads is not None:
        problems.append(f"speed.physical_cores=true sets one thread per core, but trainer.num_threads="
                        f"{cfg.trainer.num_threads} sets the count: set one of them")
    if cfg.backbone.stem_stride != 1 and not cfg.backbone.cifar_stem:
        problems.append(f"backbone.stem_stride={cfg.backbone.stem_stride} applies to the small-image stem only: "
                        "set backbone.cifar_stem=true with it, or leave backbone.stem_stride at 1")
    if d.subset is not None:
        problems += filter(None, [one_step_problem(cfg, d.subset, f"data.subset={d.subset}")])
    return problems


def rank_batch_size(cfg: Config) -> int:
    """Training images one optimizer step consumes on each process: data.batch_size x optim.accumulate_grad_batches."""
    return cfg.data.batch_size * cfg.optim.accumulate_grad_batches


def rank_batch_terms(cfg: Config) -> str:
    """The keys that make :func:`rank_batch_size`, for messages: ``data.batch_size=8 x optim.accumulate_grad_batches=2``."""
    accumulate = cfg.optim.accumulate_grad_batches
    return f"data.batch_size={cfg.data.batch_size}" + (f" x optim.accumulate_grad_batches={accumulate}"
                                                       if accumulate > 1 else "")


def images_per_step(cfg: Config) -> int:
    """Training images one optimizer step consumes across all processes (the effective batch)."""
    return rank_batch_size(cfg) * cfg.trainer.devices * cfg.trainer.num_nodes


def one_step_problem(cfg: Config, images: int, what: str) -> Optional[str]:
    """A message when ``images`` give no full step per epoch (the training loader drops a partial last batch)."""
    need = images_per_step(cfg)
    if need < 1 or images // need >= 1:
        return None
    t = cfg.trainer
    return (f"{what} gives no training step per epoch: a step needs {need} images ({rank_batch_terms(cfg)} "
            f"x trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes})")
