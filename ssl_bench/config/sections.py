"""The config sections: each field declares its default, its rule (``checked``) and whether it is hashed."""

# Defaults are the embedded Fashion-MNIST CPU setup; loss and schedule defaults follow DINO (Caron et al.
# 2021, facebookresearch/dino ``main_dino.py``). A plain ``name: type = default`` is checked by its type
# alone and hashed; ``checked(default, rule, hashed=...)`` and ``section(cls, hashed=...)`` say more.

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ssl_bench.config.rules import (ACCELERATORS, BOOLEAN, COUNT, CROP_SCALE, LR_SCALING_RULES, NON_NEGATIVE,
                                    OPTIMIZERS, OPTIONAL_COUNT, POS_EMBED_INTERPOLATIONS, POSITIVE, PRECISIONS,
                                    PROBABILITY, STRATEGIES, TEACHER_TEMP_SCHEDULES, UNLESS_DEFAULT, WANDB_MODES, Rule,
                                    checked, each, one_of, optional, pair, section, within)


@dataclass
class AugConfig:
    """DINO multi-crop photometric augmentations (DESIGN.md §5)."""

    flip_p: float = checked(0.5, PROBABILITY)
    # brightness, contrast, saturation, hue (torchvision ColorJitter: hue <= 0.5)
    color_jitter: list[float] = checked([0.4, 0.4, 0.2, 0.1], Rule(
        "4 values [brightness, contrast, saturation, hue], each >= 0, hue <= 0.5",
        lambda v: each(NON_NEGATIVE, 4).test(v) and v[3] <= 0.5))
    color_jitter_p: float = checked(0.8, PROBABILITY)
    grayscale_p: float = checked(0.2, PROBABILITY)
    # Blur probabilities: global view 1, global view 2, local views.
    blur_p: list[float] = checked([1.0, 0.1, 0.5], each(PROBABILITY, 3))
    # Blur sigma range at 224 px; scaled by crop_size / 224 so small images keep
    # the same relative blur.
    blur_sigma: list[float] = checked([0.1, 2.0], Rule("[low, high] with 0 < low <= high",
                                                       lambda v: pair(v, 0) and v[0] > 0))
    solarize_p: float = checked(0.2, PROBABILITY)  # second global view only


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None
    download: bool = False
    subset: Optional[int] = checked(None, OPTIONAL_COUNT)  # seeded subset of the SSL training set
    batch_size: int = checked(64, COUNT)  # per device
    num_workers: int = checked(2, NON_NEGATIVE, hashed=False)  # loader processes: how fast, not what
    global_crop_size: int = checked(28, COUNT)
    global_crop_scale: list[float] = checked([0.4, 1.0], CROP_SCALE)
    local_crops_number: int = checked(6, NON_NEGATIVE)
    local_crop_size: int = checked(12, NON_NEGATIVE)  # >= 1 when local_crops_number > 0 (check_values)
    local_crop_scale: list[float] = checked([0.05, 0.4], CROP_SCALE)
    # Evaluation preprocessing: resize shorter side, then centre crop.
    eval_resize: int = checked(28, COUNT)
    eval_crop_size: int = checked(28, COUNT)
    # Multi-crop pipeline: pil (per image, torchvision on PIL) | tensor (per batch on uint8 tensors in the
    # collate function, data/tensor_multicrop.py; same distributions, other pixels: README)
    multicrop: str = checked("pil", one_of("pil", "tensor"), hashed=UNLESS_DEFAULT)
    # Where multicrop=tensor makes the crops: workers (in the collate function) | device (on the training
    # device after the transfer, data/device_multicrop.py; encoded images decoded there, nvJPEG on CUDA).
    # Unhashed: the crop parameters come from the same per-batch generator on the CPU either way, so the
    # crops agree up to float rounding (bitwise on the CPU)
    augment_on: str = checked("workers", one_of("workers", "device"), hashed=False)
    aug: AugConfig = section(AugConfig)


@dataclass
class BackboneConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    patch_size: Optional[int] = checked(4, OPTIONAL_COUNT)  # ViTs only; None keeps the model's own
    img_size: Optional[int] = checked(28, OPTIONAL_COUNT)  # ViTs only: position-embedding grid size
    depth: Optional[int] = checked(4, OPTIONAL_COUNT)  # ViTs only; None keeps the model's own
    drop_path_rate: float = checked(0.1, within(0, 1, open_high=True))
    cifar_stem: bool = False  # ResNets: 3x3 stride-1 stem, no max-pool (28-32 px)
    # with cifar_stem: the stride of that 3x3 conv (2 halves every feature map: 28 px -> 14 px into layer1)
    stem_stride: int = checked(1, Rule("1 or 2", lambda v: v in (1, 2) and not isinstance(v, bool)), hashed=UNLESS_DEFAULT)
    layerscale: Optional[float] = checked(None, optional(POSITIVE))  # ViTs: LayerScale init (DINOv2: 1e-5); None = off
    # ViTs, position embedding at other sizes: timm (antialiased bicubic to the new grid) | dino (official DINO
    # interpolate_pos_encoding: bicubic with scale factor (grid + 0.1) / old grid, no antialias)
    pos_embed_interpolation: str = checked("timm", one_of(*POS_EMBED_INTERPOLATIONS), hashed=UNLESS_DEFAULT)
    kwargs: dict[str, Any] = checked({})  # more timm.create_model kwargs
    # BatchNorm backbones under DDP: statistics over every rank's batch (DINO's ResNet-50 recipe converts
    # student and teacher); torch's SyncBatchNorm runs on CUDA only
    sync_batchnorm: bool = checked(False, hashed=UNLESS_DEFAULT)


@dataclass
class MethodConfig:
    name: str = "dino"
    out_dim: int = checked(4096, COUNT)  # K prototypes (paper: 65536)
    head_hidden_dim: int = checked(2048, COUNT)
    head_bottleneck_dim: int = checked(256, COUNT)
    head_nlayers: int = checked(3, COUNT)
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = checked(1.0, NON_NEGATIVE)
    student_temp: float = checked(0.1, POSITIVE)
    teacher_temp: float = checked(0.04, POSITIVE)  # after warmup
    warmup_teacher_temp: float = checked(0.04, POSITIVE)
    warmup_teacher_temp_epochs: float = checked(0.0, NON_NEGATIVE)
    # per_step: linear over the warmup's steps | per_epoch: constant within an epoch, official DINO's
    # teacher_temp_schedule[epoch] (warmup_teacher_temp_epochs must then be a whole number)
    teacher_temp_schedule: str = checked("per_step", one_of(*TEACHER_TEMP_SCHEDULES), hashed=UNLESS_DEFAULT)
    center_momentum: float = checked(0.9, PROBABILITY)
    momentum_teacher: float = checked(0.996, PROBABILITY)  # cosine to momentum_teacher_end
    momentum_teacher_end: float = checked(1.0, PROBABILITY)
    sinkhorn_iterations: int = checked(3, COUNT)  # methods using Sinkhorn-Knopp targets (DINOv2: 3)
    koleo_weight: float = checked(0.1, NON_NEGATIVE)  # dinov2*: KoLeo on L2-normalised student CLS; 0 = off
    ibot_weight: float = checked(1.0, NON_NEGATIVE)  # ibot/dinov2*: weight of the masked-patch loss
    ibot_separate_head: bool = False  # ibot/dinov2*: own patch head instead of sharing the DINO head
    ibot_out_dim: Optional[int] = checked(None, OPTIONAL_COUNT)  # prototypes of a separate patch head; None = out_dim
    mask_probability: float = checked(0.5, PROBABILITY)  # ibot/dinov2*: share of global-view images that get a mask
    mask_ratio: list[float] = checked([0.1, 0.5], Rule(  # of patches, spread over images
        "[low, high] with 0 <= low <= high < 1", lambda v: pair(v, 0, 1) and v[1] < 1))


@dataclass
class OptimConfig:
    # adamw (DINO ViTs) | sgd (momentum 0.9; DINO ResNet-50)
    optimizer: str = checked("adamw", one_of(*OPTIMIZERS))
    epochs: int = checked(10, COUNT)
    lr: float = checked(5e-4, POSITIVE)  # at batch 256; scaled by total batch / 256
    min_lr: float = checked(1e-6, NON_NEGATIVE)
    warmup_epochs: float = checked(1.0, NON_NEGATIVE)
    weight_decay: float = checked(0.04, NON_NEGATIVE)
    weight_decay_end: float = checked(0.4, NON_NEGATIVE)
    clip_grad: float = checked(3.0, NON_NEGATIVE)  # per-parameter gradient norm; 0 disables
    # linear_256: lr*B/256 (DINO) | sqrt_1024: lr*sqrt(B/1024) (DINOv2)
    lr_scaling: str = checked("linear_256", one_of(*LR_SCALING_RULES))
    # ViTs: block i gets lr * decay^(depth - i); 1 = off (DINOv2: 0.9)
    layerwise_decay: float = checked(1.0, within(0, 1, open_low=True))
    # ViTs: extra lr factor on the patch embedding (DINOv2: 0.2)
    patch_embed_lr_mult: float = checked(1.0, NON_NEGATIVE)
    # micro-batches of data.batch_size per optimizer step on each device: one optimizer, EMA, schedule and
    # center update per data.batch_size x this x devices x nodes images (the lr scales with that batch)
    accumulate_grad_batches: int = checked(1, COUNT, hashed=UNLESS_DEFAULT)


@dataclass
class EvalConfig:
    knn: bool = True
    knn_k: list[int] = checked([10, 20, 100, 200], each(COUNT))
    knn_temperature: float = checked(0.07, POSITIVE)
    knn_report_k: int = checked(20, COUNT)  # one of knn_k (check_values)
    knn_init: bool = True  # also score the randomly initialised backbone
    bank_subset: Optional[int] = checked(None, OPTIONAL_COUNT)  # seeded subset of the train split as k-NN bank
    test_subset: Optional[int] = checked(None, OPTIONAL_COUNT)  # seeded subset of the test split
    batch_size: int = checked(256, COUNT)
    chunk_size: int = checked(1024, COUNT)  # test features scored at once
    # Unhashed (hashed=False) below: evaluation-only settings change no trained weight; each evaluation
    # records them in result.json's protocol instead.
    # online k-NN during training every N epochs; 0 = only at the end
    knn_every_n_epochs: int = checked(0, NON_NEGATIVE, hashed=False)
    knn_fp16_bank: bool = checked(False, hashed=False)  # keep the k-NN feature bank in float16 (half the memory)
    # score the bank in blocks of this many rows; None = whole bank
    knn_bank_block: Optional[int] = checked(None, OPTIONAL_COUNT, hashed=False)
    # save the final k-NN features in the run dir (features/) for later evals
    cache_features: bool = checked(False, hashed=False)


# DINOv2's linear-probe learning rates (facebookresearch/dinov2 eval/linear.py), scaled by batch / 256.
DINOV2_LINEAR_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]


@dataclass
class LinearConfig:
    """Linear-probe protocol on frozen features (DINO Sec. 4.1 / App.; DINOv2's grid of heads)."""

    lrs: list[float] = checked(DINOV2_LINEAR_LRS, each(POSITIVE))  # at batch 256
    # ViTs: CLS of the last n blocks, concatenated
    n_last_blocks: list[int] = checked([1, 4], each(COUNT))
    # ViTs: also the mean patch token
    avgpool: list[bool] = checked([False, True], each(BOOLEAN))
    epochs: int = checked(10, COUNT)
    batch_size: int = checked(256, COUNT)
    momentum: float = checked(0.9, PROBABILITY)
    weight_decay: float = checked(0.0, NON_NEGATIVE)
    # held-out share of the train split used to choose the head (never the test set)
    val_fraction: float = checked(0.1, within(0, 1, open_low=True, open_high=True))
    augment: bool = True  # RandomResizedCrop + flip through the frozen backbone; false = precomputed features
    # seeded subset of the train split (before the held-out split)
    train_subset: Optional[int] = checked(None, OPTIONAL_COUNT)
    test_subset: Optional[int] = checked(None, OPTIONAL_COUNT)


@dataclass
class TrainerConfig:
    accelerator: str = checked("cpu", one_of(*ACCELERATORS))
    devices: int = checked(1, COUNT)
    num_nodes: int = checked(1, COUNT)
    precision: str = checked("32-true", one_of(*PRECISIONS))
    # ddp: every rank holds the whole model; fsdp: parameters, gradients and optimizer state sharded over the ranks
    strategy: str = checked("ddp", one_of(*STRATEGIES), hashed=UNLESS_DEFAULT)
    max_steps: int = checked(-1, Rule("-1 (all epochs) or >= 1", lambda v: v == -1 or COUNT.test(v)))
    # torch intra-op threads; None keeps torch's
    num_threads: Optional[int] = checked(None, OPTIONAL_COUNT, hashed=False)


@dataclass
class TrainConfig:
    """Collapse diagnostics, what to do about a collapsed run, checkpoints and resuming."""

    # entropy, KL, RankMe, feature std; 0 = off
    diagnostics_every_n_steps: int = checked(10, NON_NEGATIVE, hashed=False)
    stop_on_collapse: bool = False  # end a collapsed run early (recorded in result.json)
    # consecutive diagnostics that must agree before a run is called collapsed
    collapse_window: int = checked(5, COUNT)
    # entropy <= this * log K: one prototype dominates
    collapse_entropy_low: float = checked(0.1, PROBABILITY)
    # entropy >= this * log K: uniform targets (above collapse_entropy_low: check_values)
    collapse_entropy_high: float = checked(0.98, PROBABILITY)
    collapse_kl: float = checked(0.02, NON_NEGATIVE)  # KL(teacher || student) below this many nats
    # Checkpoint cadence and resuming change no weight (a resumed run equals an uninterrupted one): unhashed.
    # checkpoints/last.ckpt every N optimizer steps (mid-epoch) as well as at epoch ends; 0 = epoch ends only
    checkpoint_every_n_steps: int = checked(50, NON_NEGATIVE, hashed=False)
    resume: bool = checked(True, hashed=False)  # continue an unfinished attempt of the same run id from its checkpoint
    # 16-mixed: a step the GradScaler skips (inf/NaN gradients) is counted, not a divergence; this many in a
    # row fail the run as "non-finite gradient norm" (the scale has then dropped by 2^N)
    fp16_max_consecutive_skips: int = checked(20, COUNT, hashed=False)


@dataclass
class SpeedConfig:
    """Levers that change how fast a step runs, not what it computes (kept out of the run id).

    ``null`` (auto) leaves the choice to ``auto``: ``rules`` gives channels_last for convolutional backbones,
    the small-map convolution gradient on CPU and timm's SDPA attention; ``measure`` times them on this
    machine once and caches the winner (README "Speed").
    """

    # torch.compile of backbones and heads (minutes of compilation first); null = auto (measure: timed, once)
    compile: Optional[bool] = False
    channels_last: Optional[bool] = None  # NHWC memory format for convolutional backbones; null = auto
    small_map_conv: Optional[bool] = None  # CPU: conv weight gradients of tiny maps as one GEMM; null = auto
    fused_optimizer: bool = True  # fused AdamW/SGD kernels instead of one op per parameter tensor
    activation_checkpointing: bool = False  # ViTs: recompute block activations in backward (less memory)
    fused_attention: Optional[bool] = None  # ViTs: timm's SDPA kernel (true) or explicit softmax attention; null = auto
    # CNNs under bf16-mixed/16-mixed: convolutions in the autocast dtype (true) or in fp32 (false); null = auto
    autocast_convs: Optional[bool] = None
    # CPUs with more threads than cores, trainer.num_threads null: one thread per physical core; null = auto
    physical_cores: Optional[bool] = None
    # how levers left null are chosen: rules (fixed, above) | measure (timed once on this machine and config
    # shape, cached per CPU/GPU and torch version: run/lever_tuning.py)
    auto: str = checked("rules", one_of("rules", "measure"))


@dataclass
class TrackingConfig:
    wandb: str = checked("off", one_of(*WANDB_MODES))
    wandb_project: str = "ssl-bench"
    wandb_entity: Optional[str] = None
    log_every_n_steps: int = checked(10, COUNT)
    runs_root: str = checked("runs", Rule("a non-empty path", lambda v: isinstance(v, str) and v.strip() != ""))
    progress_bar: bool = True
    wandb_tags: list[str] = checked([])  # "key=value" tags of the grid axes (the launcher fills them)


@dataclass
class Config:
    study: str = checked("default", hashed=False)  # a folder under tracking.runs_root
    seed: int = checked(0, within(0, 2**32 - 1))  # numpy's seed range
    data: DataConfig = section(DataConfig)
    backbone: BackboneConfig = section(BackboneConfig)
    method: MethodConfig = section(MethodConfig)
    optim: OptimConfig = section(OptimConfig)
    eval: EvalConfig = section(EvalConfig)
    linear: LinearConfig = section(LinearConfig, hashed=False)  # `ssl-bench eval linear`: changes no weight
    trainer: TrainerConfig = section(TrainerConfig)
    train: TrainConfig = section(TrainConfig)
    speed: SpeedConfig = section(SpeedConfig, hashed=False)  # tests/test_speed.py: the weights agree
    tracking: TrackingConfig = section(TrackingConfig, hashed=False)
