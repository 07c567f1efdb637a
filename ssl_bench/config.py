"""Typed configs: dataclass defaults, YAML files, ``key=value`` overrides, run ids.

Defaults are the embedded Fashion-MNIST CPU setup; loss and schedule defaults
follow DINO (Caron et al. 2021, facebookresearch/dino ``main_dino.py``).
Unknown keys are errors that list the valid ones.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key or file."""


# ---- value rules: each field's valid range lives next to the field (check_values walks them) ----


@dataclass(frozen=True)
class Rule:
    """A check on one config value with the text a message shows: ``must be <text>`` (or ``valid: <choices>``)."""

    text: str
    test: Callable[[Any], bool]
    choices: tuple[str, ...] = ()

    def problem(self, key: str, value: Any) -> Optional[str]:
        """None if ``value`` passes, else one line naming the key, the value and the valid range/choices."""
        try:
            ok = bool(self.test(value))
        except TypeError:  # e.g. a list where a number belongs
            ok = False
        if ok:
            return None
        if self.choices:
            close = difflib.get_close_matches(str(value), self.choices, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            return f"{key}={value!r}; valid: {', '.join(self.choices)}{hint}"
        return f"{key}={value!r}: must be {self.text}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def above(low: float) -> Rule:
    return Rule(f"> {low}", lambda v: _number(v) and v > low)


def at_least(low: float) -> Rule:
    return Rule(f">= {low}", lambda v: _number(v) and v >= low)


def within(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Rule:
    text = f"in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    return Rule(text, lambda v: _number(v) and (low < v if open_low else low <= v)
                and (v < high if open_high else v <= high))


def one_of(*choices: str) -> Rule:
    return Rule(f"one of {', '.join(choices)}", lambda v: v in choices, choices)


def optional(rule: Rule) -> Rule:
    return Rule(f"null or {rule.text}", lambda v: v is None or rule.test(v))


def each(rule: Rule, length: Optional[int] = None) -> Rule:
    """A non-empty list (of ``length`` items when given), every item passing ``rule``."""
    size = f"{length} values" if length else "a non-empty list"
    return Rule(f"{size}, each {rule.text}", lambda v: isinstance(v, list) and len(v) == (length or len(v)) > 0
                and all(rule.test(x) for x in v))


def _pair(value: Any, low: float, high: float = float("inf")) -> bool:
    """``value`` is ``[a, b]`` with low <= a <= b <= high (rules narrow the ends further)."""
    return (isinstance(value, list) and len(value) == 2 and all(map(_number, value))
            and low <= value[0] <= value[1] <= high)


def checked(default: Any, rule: Rule) -> Any:
    """A dataclass field whose values ``check_values`` tests with ``rule`` (lists get a default_factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"check": rule})
    return field(default=default, metadata={"check": rule})


PROBABILITY = within(0, 1)
POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
COUNT = at_least(1)  # a size or count of at least one
OPTIONAL_COUNT = optional(COUNT)
CROP_SCALE = Rule("[low, high] with 0 < low <= high <= 1", lambda v: _pair(v, 0, 1) and v[0] > 0)
# Lightning precision strings this harness runs (train.precision_settings); short aliases included.
PRECISIONS = ("32-true", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "32", "64", "16", "bf16")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
WANDB_MODES = ("off", "offline", "online")
LR_SCALING_RULES = ("linear_256", "sqrt_1024")
OPTIMIZERS = ("adamw", "sgd")
TEACHER_TEMP_SCHEDULES = ("per_step", "per_epoch")
POS_EMBED_INTERPOLATIONS = ("timm", "dino")


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
                                                       lambda v: _pair(v, 0) and v[0] > 0))
    solarize_p: float = checked(0.2, PROBABILITY)  # second global view only


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    root: Optional[str] = None
    download: bool = False
    subset: Optional[int] = checked(None, OPTIONAL_COUNT)  # seeded subset of the SSL training set
    batch_size: int = checked(64, COUNT)  # per device
    num_workers: int = checked(2, NON_NEGATIVE)
    global_crop_size: int = checked(28, COUNT)
    global_crop_scale: list[float] = checked([0.4, 1.0], CROP_SCALE)
    local_crops_number: int = checked(6, NON_NEGATIVE)
    local_crop_size: int = checked(12, NON_NEGATIVE)  # >= 1 when local_crops_number > 0 (check_values)
    local_crop_scale: list[float] = checked([0.05, 0.4], CROP_SCALE)
    # Evaluation preprocessing: resize shorter side, then centre crop.
    eval_resize: int = checked(28, COUNT)
    eval_crop_size: int = checked(28, COUNT)
    aug: AugConfig = field(default_factory=AugConfig)


@dataclass
class BackboneConfig:
    name: str = "vit_tiny_patch16_224"  # any timm model name
    patch_size: Optional[int] = checked(4, OPTIONAL_COUNT)  # ViTs only; None keeps the model's own
    img_size: Optional[int] = checked(28, OPTIONAL_COUNT)  # ViTs only: position-embedding grid size
    depth: Optional[int] = checked(4, OPTIONAL_COUNT)  # ViTs only; None keeps the model's own
    drop_path_rate: float = checked(0.1, within(0, 1, open_high=True))
    cifar_stem: bool = False  # ResNets: 3x3 stride-1 stem, no max-pool (28-32 px)
    layerscale: Optional[float] = checked(None, optional(POSITIVE))  # ViTs: LayerScale init (DINOv2: 1e-5); None = off
    # ViTs, position embedding at other sizes: timm (antialiased bicubic to the new grid) | dino (official DINO
    # interpolate_pos_encoding: bicubic with scale factor (grid + 0.1) / old grid, no antialias)
    pos_embed_interpolation: str = checked("timm", one_of(*POS_EMBED_INTERPOLATIONS))
    kwargs: dict[str, Any] = field(default_factory=dict)  # more timm.create_model kwargs


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
    teacher_temp_schedule: str = checked("per_step", one_of(*TEACHER_TEMP_SCHEDULES))
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
        "[low, high] with 0 <= low <= high < 1", lambda v: _pair(v, 0, 1) and v[1] < 1))


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
    # online k-NN during training every N epochs; 0 = only at the end
    knn_every_n_epochs: int = checked(0, NON_NEGATIVE)
    knn_fp16_bank: bool = False  # keep the k-NN feature bank in float16 (half the memory)
    # score the bank in blocks of this many rows; None = whole bank
    knn_bank_block: Optional[int] = checked(None, OPTIONAL_COUNT)
    cache_features: bool = False  # save the final k-NN features in the run dir (features/) for later evals


# DINOv2's linear-probe learning rates (facebookresearch/dinov2 eval/linear.py), scaled by batch / 256.
DINOV2_LINEAR_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1]


@dataclass
class LinearConfig:
    """Linear-probe protocol on frozen features (DINO Sec. 4.1 / App.; DINOv2's grid of heads)."""

    lrs: list[float] = checked(DINOV2_LINEAR_LRS, each(POSITIVE))  # at batch 256
    # ViTs: CLS of the last n blocks, concatenated
    n_last_blocks: list[int] = checked([1, 4], each(COUNT))
    # ViTs: also the mean patch token
    avgpool: list[bool] = checked([False, True], each(Rule("true or false", lambda v: isinstance(v, bool))))
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
    max_steps: int = checked(-1, Rule("-1 (all epochs) or >= 1", lambda v: v == -1 or COUNT.test(v)))
    num_threads: Optional[int] = checked(None, OPTIONAL_COUNT)  # torch intra-op threads; None keeps torch's


@dataclass
class TrainConfig:
    """Collapse diagnostics, what to do about a collapsed run, checkpoints and resuming."""

    diagnostics_every_n_steps: int = checked(10, NON_NEGATIVE)  # entropy, KL, RankMe, feature std; 0 = off
    stop_on_collapse: bool = False  # end a collapsed run early (recorded in result.json)
    # consecutive diagnostics that must agree before a run is called collapsed
    collapse_window: int = checked(5, COUNT)
    # entropy <= this * log K: one prototype dominates
    collapse_entropy_low: float = checked(0.1, PROBABILITY)
    # entropy >= this * log K: uniform targets (above collapse_entropy_low: check_values)
    collapse_entropy_high: float = checked(0.98, PROBABILITY)
    collapse_kl: float = checked(0.02, NON_NEGATIVE)  # KL(teacher || student) below this many nats
    # checkpoints/last.ckpt every N optimizer steps (mid-epoch) as well as at epoch ends; 0 = epoch ends only
    checkpoint_every_n_steps: int = checked(50, NON_NEGATIVE)
    resume: bool = True  # continue an unfinished attempt of the same run id from its checkpoint
    # 16-mixed: a step the GradScaler skips (inf/NaN gradients) is counted, not a divergence; this many in a
    # row fail the run as "non-finite gradient norm" (the scale has then dropped by 2^N)
    fp16_max_consecutive_skips: int = checked(20, COUNT)


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
    wandb: str = checked("off", one_of(*WANDB_MODES))
    wandb_project: str = "ssl-bench"
    wandb_entity: Optional[str] = None
    log_every_n_steps: int = checked(10, COUNT)
    runs_root: str = checked("runs", Rule("a non-empty path", lambda v: isinstance(v, str) and v.strip() != ""))
    progress_bar: bool = True
    wandb_tags: list[str] = field(default_factory=list)  # "key=value" tags of the grid axes (the launcher fills them)


@dataclass
class Config:
    study: str = "default"
    seed: int = checked(0, within(0, 2**32 - 1))  # numpy's seed range
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


def _field_type(dotted: str) -> str:
    """The annotated type of a dotted config key, e.g. 'list[int]' for eval.knn_k ('' if unknown)."""
    schema: Any = Config
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
        if part not in fields:
            return ""
        schema = _dataclass_of(fields[part].type) or fields[part].type
    return schema if isinstance(schema, str) else getattr(schema, "__name__", str(schema))


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


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping repeats a key; carries the key and both 1-based lines."""

    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(problem=f"duplicate key {key!r}")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping naming the same key twice (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # '<<: *anchor' merges are allowed to be overridden
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if first is not None:
                raise _DuplicateKeyError(key, key_node.start_mark.line + 1, first)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _type_name(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line: where (1-based) and what, instead of PyYAML's multi-line excerpt."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def read_yaml(path: str | Path, kind: str = "config file") -> dict[str, Any]:
    """Load a YAML mapping, with the file named in every error (``kind`` says what the file is)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{kind} {str(path)!r} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except _DuplicateKeyError as exc:
        raise ConfigError(f"{kind} {str(path)!r} line {exc.line}: duplicate key {exc.key!r} "
                          f"(first given on line {exc.first_line}); each key may appear once per mapping") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{kind} {str(path)!r} is not valid YAML: {_yaml_problem(exc)}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{kind} {str(path)!r} is not a text (UTF-8) file: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{kind} {str(path)!r} must hold a mapping of keys at the top level, "
                          f"got {_type_name(data)}")
    return data


def load_config_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a config file and the ``base:`` chain it extends into one override tree."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"config file {str(path)!r} extends itself through 'base:'")
    data = read_yaml(path)
    base = data.pop(BASE_KEY, None)
    check_keys(data, source=str(path))
    if "study" in data:
        check_study_name(data["study"], f"key 'study' in {str(path)!r}")
    if base is None:
        return data
    base_path = check_base(base, path)
    return deep_merge(load_config_tree(base_path, _seen + (path,)), data)


def check_base(base: Any, source: Path | str, kind: str = "config file") -> Path:
    """The file a ``base:`` key names, relative to ``source``'s folder; ConfigError unless it is one file."""
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{kind} {str(source)!r}: 'base' must be the path of one config file "
                          f"(relative to this file), got {_type_name(base)} {base!r}")
    base_path = Path(source).parent / base
    if not base_path.is_file():
        raise ConfigError(f"{kind} {str(source)!r}: 'base' names {base!r}, but {str(base_path)!r} does not exist")
    return base_path


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
        text = str(exc.msg if getattr(exc, "msg", None) else exc).splitlines()[0]  # not OmegaConf's key dump
        expected = _field_type(key)
        raise ConfigError(f"config key {key!r}{_src(source)}: {text}"
                          + (f" (expected {expected})" if expected else "")) from exc
    assert isinstance(obj, Config)
    check_values(obj)
    return obj


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults <- config file (with its ``base:`` chain) <- ``key=value`` overrides."""
    trees = [load_config_tree(path)] if path else []
    trees.append(parse_overrides(list(overrides)))
    return build_config(*trees, source=str(path or "overrides"))


def check_values(cfg: Config) -> None:
    """Every field's rule (see ``checked``) and the cross-field checks; one ConfigError, one line per problem.

    Registries, model builds and the data are checked in ``train.validate_config``.
    """
    problems = field_problems(cfg) + cross_field_problems(cfg)
    if problems:
        raise ConfigError("\n".join(problems))


def field_problems(section: Any, prefix: str = "") -> list[str]:
    """One line per value of ``section`` (a config dataclass, walked recursively) that breaks its field's rule."""
    problems = []
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            problems += field_problems(value, f"{prefix}{item.name}.")
        elif "check" in item.metadata:
            problem = item.metadata["check"].problem(f"{prefix}{item.name}", value)
            problems += [problem] if problem else []
    return problems


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
    if cfg.eval.knn_report_k not in cfg.eval.knn_k:
        problems.append(f"eval.knn_report_k={cfg.eval.knn_report_k} must be one of eval.knn_k={cfg.eval.knn_k}")
    if d.local_crops_number > 0:
        vit = is_vit_name(cfg.backbone.name)
        patch = cfg.backbone.patch_size if vit else None
        if d.local_crop_size < max(1, patch or 1):
            problems.append(f"data.local_crop_size={d.local_crop_size}: must be >= {max(1, patch or 1)} with "
                            f"data.local_crops_number={d.local_crops_number}"
                            + (f" (a ViT with backbone.patch_size={patch})" if patch else "")
                            + "; data.local_crops_number=0 trains without local crops")
    if d.subset is not None:
        problems += filter(None, [one_step_problem(cfg, d.subset, f"data.subset={d.subset}")])
    return problems


def images_per_step(cfg: Config) -> int:
    """Training images one optimizer step consumes across all processes."""
    return cfg.data.batch_size * cfg.trainer.devices * cfg.trainer.num_nodes


def one_step_problem(cfg: Config, images: int, what: str) -> Optional[str]:
    """A message when ``images`` give no full step per epoch (the training loader drops a partial last batch)."""
    need = images_per_step(cfg)
    if need < 1 or images // need >= 1:
        return None
    t = cfg.trainer
    return (f"{what} gives no training step per epoch: a step needs {need} images (data.batch_size="
            f"{cfg.data.batch_size} x trainer.devices={t.devices} x trainer.num_nodes={t.num_nodes})")


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
RUN_PREVIOUS_CHECKPOINT = "previous.ckpt"  # the last.ckpt before the latest save: the fallback


class CorruptRecordError(ValueError):
    """A run record (result.json, env.json...) exists but cannot be read: corrupt, never "missing" (habit 13)."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"{self.path} is corrupt ({reason}); nothing was changed: repair or move it away")


def read_json_record(path: Path) -> dict[str, Any] | None:
    """A JSON record: None when the file is absent; CorruptRecordError when it exists but cannot be read.

    Torch-free, so ``report/`` reads records with the same rule as ``tracking``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise CorruptRecordError(path, f"{type(exc).__name__}: {exc}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CorruptRecordError(path, f"not JSON: {exc}" if text.strip() else "empty file") from exc
    if not isinstance(data, dict):
        raise CorruptRecordError(path, f"a JSON {type(data).__name__}, not an object")
    return data


def torn_lines_text(lines: int, runs: Optional[int] = None) -> str:
    """``metrics.jsonl: 2 torn line(s) skipped`` (``in 1 run`` when ``runs`` is given)."""
    where = "" if runs is None else f" in {runs} run{'s' if runs != 1 else ''}"
    return f"metrics.jsonl: {lines} torn line(s) skipped{where}"


def read_jsonl_counted(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the JSON-object lines of a JSONL file, how many lines were skipped because they do not parse);
    an absent file has neither. A torn line is left by a crash mid-write or is being written."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            torn += 1
    return records, torn


# Study names become a folder under tracking.runs_root: a letter or digit, then letters, digits, '.', '_', '-'.
STUDY_NAME_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
STUDY_NAME_TEXT = ("1-100 characters: a letter or digit, then letters, digits, '.', '_' or '-' "
                   "(no '/', no '..', no spaces)")


def check_study_name(name: Any, source: str = "study") -> str:
    """Return ``name`` if it is a safe folder name for ``runs/<study>/``; ConfigError naming the rule otherwise."""
    if not isinstance(name, str) or not STUDY_NAME_RULE.match(name) or ".." in name:
        raise ConfigError(f"study name {name!r} ({source}) is not allowed: a study name must be {STUDY_NAME_TEXT}")
    return name


def run_dir(cfg: Config) -> Path:
    """``<runs_root>/<study>/<run_id>``: where a run's records live, always inside ``tracking.runs_root``."""
    check_study_name(cfg.study, "key 'study'")
    root = Path(cfg.tracking.runs_root)
    directory = root / cfg.study / run_id(cfg)
    # Lexical ('..' folded, not symlinks followed): a runs/<study> symlink to scratch space stays allowed.
    resolved_root = root.resolve()
    if not Path(os.path.normpath(resolved_root / cfg.study / run_id(cfg))).is_relative_to(resolved_root):
        raise ConfigError(f"run directory {str(directory)!r} would lie outside tracking.runs_root="
                          f"{cfg.tracking.runs_root!r}; check the key 'study' ({cfg.study!r})")
    return directory
