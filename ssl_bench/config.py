"""Typed configs: dataclass defaults, YAML files, ``key=value`` overrides, run ids.

Defaults are the embedded Fashion-MNIST CPU setup; loss and schedule defaults
follow DINO (Caron et al. 2021, facebookresearch/dino ``main_dino.py``).
Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


@dataclass
class AugConfig:
    """DINO multi-crop photometric augmentations (DESIGN.md §5)."""

    flip_p: float = 0.5
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    # Blur probabilities: global view 1, global view 2, local views.
    blur_p: list[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])
    # Blur sigma range at 224 px; scaled by crop_size / 224 so small images keep
    # the same relative blur.
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])
    solarize_p: float = 0.2  # second global view only


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None
    download: bool = False
    subset: Optional[int] = None  # seeded subset of the SSL training set
    batch_size: int = 64  # per device
    num_workers: int = 2
    global_crop_size: int = 28
    global_crop_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crops_number: int = 6
    local_crop_size: int = 12
    local_crop_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    # Evaluation preprocessing: resize shorter side, then centre crop.
    eval_resize: int = 28
    eval_crop_size: int = 28
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class BackboneConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    patch_size: Optional[int] = 4  # ViTs only; None keeps the model's own
    img_size: Optional[int] = 28  # ViTs only: position-embedding grid size
    depth: Optional[int] = 4  # ViTs only; None keeps the model's own
    drop_path_rate: float = 0.1
    cifar_stem: bool = False  # ResNets: 3x3 stride-1 stem, no max-pool (28-32 px)
    layerscale: Optional[float] = None  # ViTs: LayerScale init (DINOv2: 1e-5); None = off
    # ViTs, position embedding at other sizes: timm (antialiased bicubic to the new grid) | dino (official DINO
    # interpolate_pos_encoding: bicubic with scale factor (grid + 0.1) / old grid, no antialias)
    pos_embed_interpolation: str = "timm"
    kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model kwargs


@dataclass
class MethodConfig:
    name: str = "dino"
    out_dim: int = 4096  # K prototypes (paper: 65536)
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    norm_last_layer: bool = True
    freeze_last_layer_epochs: float = 1.0
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # after warmup
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0.0
    # per_step: linear over the warmup's steps | per_epoch: constant within an epoch, official DINO's
    # teacher_temp_schedule[epoch] (warmup_teacher_temp_epochs must then be a whole number)
    teacher_temp_schedule: str = "per_step"
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996  # cosine to momentum_teacher_end
    momentum_teacher_end: float = 1.0
    sinkhorn_iterations: int = 3  # methods using Sinkhorn-Knopp targets (DINOv2: 3)
    koleo_weight: float = 0.1  # dinov2*: KoLeo on L2-normalised student CLS; 0 = off
    ibot_weight: float = 1.0  # ibot/dinov2*: weight of the masked-patch loss
    ibot_separate_head: bool = False  # ibot/dinov2*: own patch head instead of sharing the DINO head
    ibot_out_dim: Optional[int] = None  # prototypes of a separate patch head; None = out_dim
    mask_probability: float = 0.5  # ibot/dinov2*: share of global-view images that get a mask
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])  # of patches, spread over images


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw (DINO ViTs) | sgd (momentum 0.9; DINO ResNet-50)
    epochs: int = 10
    lr: float = 5e-4  # at batch 256; scaled by total batch / 256
    min_lr: float = 1e-6
    warmup_epochs: float = 1.0
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0  # per-parameter gradient norm; 0 disables
    lr_scaling: str = "linear_256"  # linear_256: lr*B/256 (DINO) | sqrt_1024: lr*sqrt(B/1024) (DINOv2)
    layerwise_decay: float = 1.0  # ViTs: block i gets lr * decay^(depth - i); 1 = off (DINOv2: 0.9)
    patch_embed_lr_mult: float = 1.0  # ViTs: extra lr factor on the patch embedding (DINOv2: 0.2)


@dataclass
class EvalConfig:
    knn: bool = True
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])
    knn_temperature: float = 0.07
    knn_report_k: int = 20
    knn_init: bool = True  # also score the randomly initialised backbone
    bank_subset: Optional[int] = None  # seeded subset of the train split as k-NN bank
    test_subset: Optional[int] = None  # seeded subset of the test split
    batch_size: int = 256
    chunk_size: int = 1024  # test features scored at once
    knn_every_n_epochs: int = 0  # online k-NN during training every N epochs; 0 = only at the end
    knn_fp16_bank: bool = False  # keep the k-NN feature bank in float16 (half the memory)
    knn_bank_block: Optional[int] = None  # score the bank in blocks of this many rows; None = whole bank
    cache_features: bool = False  # save the final k-NN features in the run dir (features/) for later evals


# DINOv2's linear-probe learning rates (facebookresearch/dinov2 eval/linear.py), scaled by batch / 256.
DINOV2_LINEAR_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]


@dataclass
class LinearConfig:
    """Linear-probe protocol on frozen features (DINO Sec. 4.1 / App.; DINOv2's grid of heads)."""

    lrs: list[float] = field(default_factory=lambda: list(DINOV2_LINEAR_LRS))  # at batch 256
    n_last_blocks: list[int] = field(default_factory=lambda: [1, 4])  # ViTs: CLS of the last n blocks, concatenated
    avgpool: list[bool] = field(default_factory=lambda: [False, True])  # ViTs: also the mean patch token
    epochs: int = 10
    batch_size: int = 256
    momentum: float = 0.9
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # held-out share of the train split used to choose the head (never the test set)
    augment: bool = True  # RandomResizedCrop + flip through the frozen backbone; false = precomputed features
    train_subset: Optional[int] = None  # seeded subset of the train split (before the held-out split)
    test_subset: Optional[int] = None


@dataclass
class TrainerConfig:
    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    precision: str = "32-true"
    max_steps: int = -1  # -1: run all epochs
    num_threads: Optional[int] = None  # torch intra-op threads; None keeps torch's


@dataclass
class TrainConfig:
    """Collapse diagnostics, what to do about a collapsed run, checkpoints and resuming."""

    diagnostics_every_n_steps: int = 10  # entropy, KL, RankMe, feature std; 0 = off
    stop_on_collapse: bool = False  # end a collapsed run early (recorded in result.json)
    collapse_window: int = 5  # consecutive diagnostics that must agree before a run is called collapsed
    collapse_entropy_low: float = 0.1  # entropy <= this * log K: one prototype dominates
    collapse_entropy_high: float = 0.98  # entropy >= this * log K: uniform targets
    collapse_kl: float = 0.02  # KL(teacher || student) below this many nats
    # checkpoints/last.ckpt every N optimizer steps (mid-epoch) as well as at epoch ends; 0 = epoch ends only
    checkpoint_every_n_steps: int = 50
    resume: bool = True  # continue an unfinished attempt of the same run id from its checkpoint
    # 16-mixed: a step the GradScaler skips (inf/NaN gradients) is counted, not a divergence; this many in a
    # row fail the run as "non-finite gradient norm" (the scale has then dropped by 2^N)
    fp16_max_consecutive_skips: int = 20


@dataclass
class SpeedConfig:
    """Levers that change how fast a step runs, not what it computes (kept out of the run id).

    ``null`` (auto) picks what measured faster (README "Speed"): channels_last for convolutional
    backbones; the small-map convolution gradient on CPU.
    """

    compile: bool = False  # torch.compile of backbones and heads (minutes of compilation first)
    channels_last: Optional[bool] = None  # NHWC memory format for convolutional backbones; null = auto
    small_map_conv: Optional[bool] = None  # CPU: conv weight gradients of tiny maps as one GEMM; null = auto
    fused_optimizer: bool = True  # fused AdamW/SGD kernels instead of one op per parameter tensor
    activation_checkpointing: bool = False  # ViTs: recompute block activations in backward (less memory)


@dataclass
class TrackingConfig:
    wandb: str = "off"  # off | offline | online
    wandb_project: str = "ssl-bench"
    wandb_entity: Optional[str] = None
    log_every_n_steps: int = 10
    runs_root: str = "runs"
    progress_bar: bool = True
    wandb_tags: list[str] = field(default_factory=list)  # "key=value" tags of the grid axes (the launcher fills them)


@dataclass
class Config:
    study: str = "default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    linear: LinearConfig = field(default_factory=LinearConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


WANDB_MODES = ("off", "offline", "online")
LR_SCALING_RULES = ("linear_256", "sqrt_1024")
OPTIMIZERS = ("adamw", "sgd")
TEACHER_TEMP_SCHEDULES = ("per_step", "per_epoch")
POS_EMBED_INTERPOLATIONS = ("timm", "dino")
# Keys added after runs existed: at their default they stay out of the run id, so old run ids still hold.
HASHED_UNLESS_DEFAULT = {"method.teacher_temp_schedule": "per_step", "backbone.pos_embed_interpolation": "timm"}
# Keys that do not change what is computed, so they stay out of the run id.
# Evaluation-only settings (online k-NN cadence, bank precision and blocks, feature cache, the linear
# probe run by ``ssl-bench eval linear``) change no trained weight; each evaluation records them in
# result.json's protocol instead.
# Checkpoint cadence and resuming change no weight either: a resumed run equals an uninterrupted one.
# Speed levers change how fast, not what (tests/test_speed.py checks the weights agree).
UNHASHED_KEYS = ("study", "data.num_workers", "tracking", "speed", "trainer.num_threads",
                 "train.diagnostics_every_n_steps", "train.checkpoint_every_n_steps", "train.resume",
                 "train.fp16_max_consecutive_skips",
                 "eval.knn_every_n_epochs", "eval.knn_fp16_bank", "eval.knn_bank_block", "eval.cache_features",
                 "linear")
BASE_KEY = "base"  # a config file may name another file it extends


def check_keys(tree: dict[str, Any], schema: type = Config, prefix: str = "", source: str = "") -> None:
    """Raise ConfigError for a key that ``schema`` lacks, listing the valid keys."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if key not in fields:
            where = f" in {source}" if source else ""
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(f"{prefix}{n}" for n in fields)
            raise ConfigError(f"unknown config key {path!r}{where}{hint} Valid keys here: {valid}")
        sub = fields[key].type
        sub_cls = _dataclass_of(sub)
        if sub_cls is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r}{_src(source)} must be a mapping of sub-keys")
            check_keys(value, sub_cls, prefix=f"{path}.", source=source)


def _dataclass_of(type_name: Any) -> Optional[type]:
    classes = {c.__name__: c for c in (AugConfig, DataConfig, BackboneConfig, MethodConfig,
                                       OptimConfig, EvalConfig, LinearConfig, TrainerConfig, TrainConfig,
                                       SpeedConfig, TrackingConfig)}
    if isinstance(type_name, str):
        return classes.get(type_name)
    return type_name if dataclasses.is_dataclass(type_name) else None


def _src(source: str) -> str:
    return f" in {source}" if source else ""


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.epochs=2", "data.subset=null"]`` into a nested dict (YAML values)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.epochs=2)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        set_dotted(tree, key.strip(), value)
    return tree


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted == "a.b.c"``."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"key {dotted!r}: {part!r} is a value, not a group of keys")
    node[parts[-1]] = value


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` updated recursively with ``extra`` (neither is modified)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping, with the file named in every error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    return data


def load_config_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file and the ``base:`` chain it extends into one override tree."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {str(path)!r} extends itself through 'base:'")
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    check_keys(data, source=str(path))
    if base is None:
        return data
    return deep_merge(load_config_tree(path.parent / base, _seen + (path,)), data)


def build_config(*trees: dict[str, Any], source: str = "") -> Config:
    """Merge override trees onto the defaults into a typed, validated Config."""
    merged: dict[str, Any] = {}
    for tree in trees:
        check_keys(tree, source=source)
        merged = deep_merge(merged, tree)
    schema = OmegaConf.structured(Config)
    try:
        cfg = OmegaConf.merge(schema, OmegaConf.create(merged))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"config key {key!r}{_src(source)}: {exc.msg if hasattr(exc, 'msg') else exc}") from exc
    assert isinstance(obj, Config)
    check_values(obj)
    return obj


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- config file (with its ``base:`` chain) <- ``key=value`` overrides."""
    trees = [load_config_tree(path)] if path else []
    trees.append(parse_overrides(list(overrides)))
    return build_config(*trees, source=str(path or "overrides"))


def check_values(cfg: Config) -> None:
    """Range checks that need no registry (registries are checked in launch)."""
    if cfg.tracking.wandb not in WANDB_MODES:
        raise ConfigError(f"tracking.wandb={cfg.tracking.wandb!r}; valid: {', '.join(WANDB_MODES)}")
    if cfg.optim.lr_scaling not in LR_SCALING_RULES:
        raise ConfigError(f"optim.lr_scaling={cfg.optim.lr_scaling!r}; valid: {', '.join(LR_SCALING_RULES)}")
    if cfg.optim.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={cfg.optim.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    m = cfg.method
    if m.teacher_temp_schedule not in TEACHER_TEMP_SCHEDULES:
        raise ConfigError(f"method.teacher_temp_schedule={m.teacher_temp_schedule!r}; "
                          f"valid: {', '.join(TEACHER_TEMP_SCHEDULES)}")
    if m.teacher_temp_schedule == "per_epoch" and m.warmup_teacher_temp_epochs != int(m.warmup_teacher_temp_epochs):
        raise ConfigError(f"method.warmup_teacher_temp_epochs={m.warmup_teacher_temp_epochs} must be a whole number "
                          "of epochs with method.teacher_temp_schedule=per_epoch")
    if cfg.train.fp16_max_consecutive_skips < 1:
        raise ConfigError(f"train.fp16_max_consecutive_skips={cfg.train.fp16_max_consecutive_skips}: must be >= 1 "
                          "(the number of fp16 steps skipped in a row that fails a run)")
    if cfg.backbone.pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
        raise ConfigError(f"backbone.pos_embed_interpolation={cfg.backbone.pos_embed_interpolation!r}; "
                          f"valid: {', '.join(POS_EMBED_INTERPOLATIONS)}")
    lo, hi = cfg.method.mask_ratio
    if not 0 <= lo <= hi < 1 or not 0 <= cfg.method.mask_probability <= 1:
        raise ConfigError(f"method.mask_ratio must be [low, high] with 0 <= low <= high < 1 and "
                          f"method.mask_probability in [0, 1], got {[lo, hi]} and {cfg.method.mask_probability}")
    t = cfg.train
    if t.collapse_window < 1 or not 0 <= t.collapse_entropy_low < t.collapse_entropy_high <= 1 or t.collapse_kl < 0:
        raise ConfigError("train.collapse_window must be >= 1, 0 <= train.collapse_entropy_low < "
                          "train.collapse_entropy_high <= 1 and train.collapse_kl >= 0, got "
                          f"{t.collapse_window}, {t.collapse_entropy_low}, {t.collapse_entropy_high}, {t.collapse_kl}")
    positive = {"data.batch_size": cfg.data.batch_size, "optim.epochs": cfg.optim.epochs,
                "method.out_dim": cfg.method.out_dim, "data.global_crop_size": cfg.data.global_crop_size,
                "trainer.devices": cfg.trainer.devices, "trainer.num_nodes": cfg.trainer.num_nodes,
                "method.sinkhorn_iterations": cfg.method.sinkhorn_iterations}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    for key in ("data.subset", "eval.bank_subset", "eval.test_subset"):
        value = get_dotted(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be a positive number of images or null, got {value}")
    for key in ("data.global_crop_scale", "data.local_crop_scale"):
        lo, hi = get_dotted(cfg, key)
        if not 0 < lo <= hi <= 1:
            raise ConfigError(f"{key} must be [low, high] with 0 < low <= high <= 1, got {[lo, hi]}")
    for key in ("linear.train_subset", "linear.test_subset", "eval.knn_bank_block"):
        value = get_dotted(cfg, key)
        if value is not None and value < 1:
            raise ConfigError(f"{key} must be a positive number or null, got {value}")
    lin = cfg.linear
    if not lin.lrs or not lin.n_last_blocks or not lin.avgpool or min(lin.n_last_blocks) < 1:
        raise ConfigError(f"linear.lrs, linear.n_last_blocks (each >= 1) and linear.avgpool must be non-empty "
                          f"lists, got {lin.lrs}, {lin.n_last_blocks}, {lin.avgpool}")
    if not 0 < lin.val_fraction < 1 or lin.epochs < 1 or lin.batch_size < 1:
        raise ConfigError(f"linear.val_fraction must be in (0, 1) and linear.epochs, linear.batch_size >= 1, "
                          f"got {lin.val_fraction}, {lin.epochs}, {lin.batch_size}")
    if cfg.train.checkpoint_every_n_steps < 0:
        raise ConfigError(f"train.checkpoint_every_n_steps must be >= 0 (0 = epoch ends only), "
                          f"got {cfg.train.checkpoint_every_n_steps}")
    if cfg.eval.knn_every_n_epochs < 0:
        raise ConfigError(f"eval.knn_every_n_epochs must be >= 0, got {cfg.eval.knn_every_n_epochs}")
    if cfg.eval.knn_report_k not in cfg.eval.knn_k:
        raise ConfigError(f"eval.knn_report_k={cfg.eval.knn_report_k} must be one of eval.knn_k={cfg.eval.knn_k}")


def get_dotted(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = obj[part] if isinstance(obj, dict) else getattr(obj, part)
    return obj


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict`` output (e.g. a run's config.yaml)."""
    return build_config(tree)


def config_hash(cfg: Config, length: int = 8) -> str:
    """Stable short hash of everything that changes what a run computes."""
    tree = to_dict(cfg)
    for key in UNHASHED_KEYS:
        parts = key.split(".")
        node = tree
        for part in parts[:-1]:
            node = node[part]
        node.pop(parts[-1], None)
    for key, default in HASHED_UNLESS_DEFAULT.items():
        section, name = key.split(".")
        if tree[section].get(name) == default:
            del tree[section][name]
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def run_id(cfg: Config) -> str:
    """``<method>-<hash>``: readable in listings, unique per resolved config."""
    return f"{cfg.method.name}-{config_hash(cfg)}"


# The run directory's layout (DESIGN.md §1), here so that lower modules (backbones' checkpoint
# import) and tracking.py, which writes it, share one definition.
RUN_CONFIG_FILE = "config.yaml"
RUN_CHECKPOINT_DIR = "checkpoints"
RUN_LAST_CHECKPOINT = "last.ckpt"


def run_dir(cfg: Config) -> Path:
    """``<runs_root>/<study>/<run_id>``: where a run's records live."""
    return Path(cfg.tracking.runs_root) / cfg.study / run_id(cfg)
