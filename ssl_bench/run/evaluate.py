"""Post-hoc evaluation of a run directory or a checkpoint: ``ssl-bench eval knn|linear|attention|collapse``.

The one place that wires a checkpoint (ssl-bench, official DINO or DINOv2), the data of a config and
the protocols of ``eval/``. Each evaluation is recorded with its protocol, the checkpoint's weight
hash and the code version: in the run directory for ssl-bench runs (``evals/`` and
``result.json["evals"]``), under ``<runs_root>/imported/<name>-<sha>/`` for imported checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from ssl_bench import config as config_lib
from ssl_bench import repro, tracking
from ssl_bench.backbones import Backbone
from ssl_bench.backbones.checkpoints import CheckpointInfo, load_backbone
from ssl_bench.eval.features import FeatureCache

IMPORTED_STUDY = "imported"  # study folder under runs_root for checkpoints trained elsewhere
EVAL_SIZE_KEYS = ("data.eval_resize", "data.eval_crop_size")


@dataclass
class Target:
    """What an evaluation runs on and where its records go."""

    backbone: Backbone
    cfg: config_lib.Config
    info: CheckpointInfo
    record_dir: Path  # the run directory, or runs_root/imported/<name>-<sha>
    is_run: bool  # an ssl-bench run directory (its config.yaml describes the training)
    checkpoint: Path | None  # the ssl-bench Lightning checkpoint, when there is one

    @property
    def cache(self) -> FeatureCache:
        return FeatureCache(self.record_dir / tracking.FEATURES_DIR)


def run_directory_of(path: Path) -> Path | None:
    """The ssl-bench run directory that ``path`` is, or holds the checkpoint of (None otherwise)."""
    for candidate in (path, path.parent.parent if path.parent.name == tracking.CHECKPOINT_DIR else None):
        if candidate is not None and (candidate / tracking.CONFIG_FILE).is_file():
            return candidate
    return None


def open_target(target: str, overrides: list[str] = (), dataset: str | None = None,
                key: str = "teacher") -> Target:
    """Load the backbone of ``target`` (run dir or checkpoint file) and the config its evaluation uses.

    Run directories keep their training config (data, preprocessing, protocol) with ``overrides`` on
    top; the architecture comes from the checkpoint and cannot be overridden. Imported checkpoints
    start from the defaults; unless ``data.eval_*`` is given, images are resized for the model's
    native resolution as DINO does for ImageNet (crop = native size, resize = crop * 256/224).
    """
    path = Path(target)
    if not path.exists():
        raise config_lib.ConfigError(f"no run directory or checkpoint at {target!r}")
    parsed = config_lib.parse_overrides(list(overrides))
    if dataset:
        config_lib.set_dotted(parsed, "data.name", dataset)
    run_dir = run_directory_of(path)
    if run_dir is not None:
        return _open_run(path, run_dir, parsed, key)
    return _open_imported(path, parsed, key)


def _open_run(path: Path, run_dir: Path, parsed: dict[str, Any], key: str) -> Target:
    if "backbone" in parsed:
        raise config_lib.ConfigError(f"{run_dir}: backbone.* is fixed by the run's checkpoint; "
                                     f"remove {sorted('backbone.' + k for k in parsed['backbone'])}")
    try:
        tracking.read_result(run_dir)  # its evaluations go into result.json: refuse before computing any
    except tracking.CorruptRecordError as exc:
        raise config_lib.ConfigError(str(exc)) from exc
    tree = config_lib.read_yaml(run_dir / tracking.CONFIG_FILE)
    cfg = config_lib.build_config(tree, parsed, source=str(run_dir / tracking.CONFIG_FILE))
    checkpoints = run_dir / tracking.CHECKPOINT_DIR
    if path.is_file():
        backbone, info = _load(path, cfg.backbone, key)
    elif (checkpoints / tracking.LAST_CHECKPOINT).is_file() or (checkpoints / tracking.PREVIOUS_CHECKPOINT).is_file():
        backbone, info = _load(run_dir, cfg.backbone, key)  # an unreadable last.ckpt falls back to previous.ckpt
    else:
        raise config_lib.ConfigError(f"{run_dir}: no checkpoint at {checkpoints / tracking.LAST_CHECKPOINT} "
                                     f"(did the run finish an epoch?)")
    return Target(backbone, cfg, info, run_dir, True, Path(info.path))


def _open_imported(path: Path, parsed: dict[str, Any], key: str) -> Target:
    backbone_cfg, num_heads = imported_backbone_overrides(parsed.pop("backbone", {}), path)
    backbone, info = _load(path, backbone_cfg, key, num_heads)
    tree = {"study": IMPORTED_STUDY, "backbone": config_lib.to_dict(config_lib.Config(backbone=info.backbone))["backbone"]}
    if not {"eval_resize", "eval_crop_size"} & set(parsed.get("data", {})):
        crop = native_size(backbone, info)
        tree["data"] = {"eval_resize": round(crop * 256 / 224), "eval_crop_size": crop}
    cfg = config_lib.build_config(tree, parsed, source=str(path))
    record_dir = Path(cfg.tracking.runs_root) / IMPORTED_STUDY / f"{path.stem}-{info.weights_sha256[:8]}"
    return Target(backbone, cfg, info, record_dir, False, None)


def imported_backbone_overrides(section: dict[str, Any], path: Path):
    """``backbone.kwargs.num_heads=N`` alone sets the head count (the weights do not hold it);
    any other ``backbone.*`` key replaces shape inference by that full backbone config."""
    if not section:
        return None, None
    if set(section) == {"kwargs"} and set(section["kwargs"]) == {"num_heads"}:
        return None, int(section["kwargs"]["num_heads"])
    return config_lib.build_config({"backbone": section}, source=str(path)).backbone, None


def _load(path: Path, backbone_cfg, key: str, num_heads: int | None = None) -> tuple[Backbone, CheckpointInfo]:
    try:
        return load_backbone(path, backbone_cfg, key=key, num_heads=num_heads,
                             log=lambda line: print(line, flush=True))
    except (ValueError, KeyError, OSError) as exc:
        raise config_lib.ConfigError(str(exc)) from exc


def native_size(backbone: Backbone, info: CheckpointInfo) -> int:
    """The resolution a checkpoint was trained at: the ViT position grid, else DINO's 224."""
    size = info.backbone.img_size if backbone.is_vit else None
    return int(size) if size else 224


def check_eval_size(target: Target) -> None:
    """A ViT needs an eval crop that is a multiple of its patch size."""
    crop, patch = target.cfg.data.eval_crop_size, target.backbone.patch_size
    if patch and crop % patch:
        raise config_lib.ConfigError(f"data.eval_crop_size={crop} is not a multiple of the backbone's patch size "
                                     f"{patch}; choose e.g. {crop - crop % patch} or {crop - crop % patch + patch}")


def device_of(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise config_lib.ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return torch.device(name)


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) else value


def record(target: Target, kind: str, metrics: dict[str, Any], protocol: dict[str, Any],
           timing: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write the evaluation record; returns its path. Same kind + protocol + weights -> same id."""
    blob = json.dumps({"protocol": protocol, "weights": target.info.weights_sha256}, sort_keys=True, default=str)
    eval_id = f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"
    if not target.is_run:
        _ensure_imported_dir(target)
    entry = {"kind": kind, "eval_id": eval_id, "metrics": metrics, "protocol": protocol, "timing": timing,
             "checkpoint": {k: str(v) if isinstance(v, Path) else _plain(v) for k, v in vars(target.info).items()},
             "code": repro.git_state(), "command": " ".join(sys.argv),
             "created": repro.utc_now(), **(extra or {})}
    return tracking.record_eval(target.record_dir, eval_id, entry)


def _ensure_imported_dir(target: Target) -> None:
    """An imported checkpoint gets a run-like directory: its eval config and a result.json to collect."""
    directory = target.record_dir
    directory.mkdir(parents=True, exist_ok=True)
    if tracking.read_result(directory) is None:  # a corrupt one raises CorruptRecordError: never overwritten
        tracking.atomic_write_text(directory / tracking.CONFIG_FILE, config_lib.to_yaml(target.cfg))
        tracking.write_json(directory / tracking.RESULT_FILE, {
            "run_id": directory.name, "study": IMPORTED_STUDY, "method": f"imported:{target.info.format}",
            "status": "imported", "checkpoint": str(target.info.path), "weights_sha256": target.info.weights_sha256})


def timed(start: float) -> dict[str, float]:
    return {"wall_s": round(time.time() - start, 2), "peak_rss_mb": round(repro.peak_rss_mb(), 1)}


# ----- the four protocols -------------------------------------------------------------------
def eval_knn(target: Target, device: torch.device, use_cache: bool = True) -> dict[str, Any]:
    """DINO k-NN of the target's backbone on ``cfg.data``; features cached under the record dir."""
    from ssl_bench.eval.knn_protocol import run_knn
    from ssl_bench.run.train import feature_progress

    check_eval_size(target)
    start = time.time()
    target.backbone.to(device)
    outcome = run_knn(target.cfg, target.backbone, cache=target.cache if use_cache else None,
                      weights=target.info.weights_sha256, device=device,
                      progress=lambda label: feature_progress(target.cfg, label),
                      log=lambda line: print(line, flush=True))
    path = record(target, "knn", outcome.metrics, outcome.protocol, {**outcome.timing, **timed(start)},
                  {"feature_cache_hits": outcome.cache_hits})
    return {"metrics": outcome.metrics, "protocol": outcome.protocol, "record": path}


def eval_linear(target: Target, device: torch.device) -> dict[str, Any]:
    """The linear-probe grid (lrs x blocks x avgpool), head chosen on a held-out train split."""
    from ssl_bench.eval.linear import linear_probe

    check_eval_size(target)
    start = time.time()
    target.backbone.to(device)
    result = linear_probe(target.backbone, target.cfg, device=device, progress=lambda line: print(line, flush=True))
    chosen = result.chosen
    metrics = {"linear_top1": chosen["test_top1"], "linear_top5": chosen["test_top5"],
               "linear_val_top1": chosen["val_top1"]}
    path = record(target, "linear", metrics, result.protocol, {**result.timing, **timed(start)},
                  {"chosen": chosen, "grid": result.grid})
    return {"metrics": metrics, "protocol": result.protocol, "chosen": chosen, "grid": result.grid, "record": path}


def eval_collapse(target: Target, device: torch.device, batches: int = 4) -> dict[str, Any]:
    """Teacher entropy, KL(teacher || student), RankMe and feature std, with the code the training logs use.

    Runs (with head, center and student) are measured on ``batches`` multi-crop batches of their own
    training pipeline; backbone-only checkpoints have no head, so only RankMe and feature std (on the
    eval-preprocessed test split) can be measured and entropy/KL are recorded as unavailable.
    """
    start = time.time()
    if target.is_run:
        metrics, protocol = _collapse_of_run(target, device, batches)
    else:
        metrics, protocol = _collapse_of_backbone(target, device)
    path = record(target, "collapse", metrics, protocol, timed(start))
    return {"metrics": metrics, "protocol": protocol, "record": path}


@torch.no_grad()
def _collapse_of_run(target: Target, device: torch.device, batches: int) -> tuple[dict, dict]:
    from itertools import islice

    from ssl_bench.run.callbacks import measure
    from ssl_bench.methods import build_method
    from ssl_bench.run.train import build_datamodule

    cfg = target.cfg
    repro.seed_everything(cfg.seed)
    method = build_method(cfg)
    # ssl-bench checkpoints hold tensors and plain values only (methods/base.py), so weights_only=True reads them.
    state = torch.load(target.checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    method.load_state_dict(state)
    method.eval().to(device)
    teacher_temp = method.teacher_temp_at(10**12)  # the end of the schedule: what the checkpoint trained with
    loader = build_datamodule(cfg, method).train_dataloader()
    views: tuple[list, list, list] = ([], [], [])
    for batch in islice(loader, batches):
        crops = [c.to(device) for c in batch[0]]
        teacher_cls = method.teacher.backbone_cls(crops[:2])
        targets = method.teacher_probs(method.teacher.head(teacher_cls), teacher_temp).chunk(2)
        views[0].append(targets)
        views[1].append(method.student(crops).chunk(len(crops)))
        views[2].append(teacher_cls)
    if not views[2]:
        raise config_lib.ConfigError(f"{target.record_dir}: the training set gives no full batch of "
                                     f"data.batch_size={cfg.data.batch_size}")
    targets = [torch.cat(v) for v in zip(*views[0])]
    student = [torch.cat(v) for v in zip(*views[1])]
    values = measure(targets, student, torch.cat(views[2]), cfg.method.student_temp)
    metrics = {key.split("/")[-1]: round(v, 6) for key, v in values.items()}
    protocol = {"batches": len(views[2]), "images": len(views[2]) * cfg.data.batch_size,
                "views": f"{len(student)} crops per image from the run's training pipeline (seed {cfg.seed})",
                "teacher_temp": teacher_temp, "student_temp": cfg.method.student_temp, "mode": "eval (no drop path)",
                "targets": f"{cfg.method.name} teacher targets with the checkpoint's center",
                "rankme_features": "teacher CLS of the global crops",
                "follows": "DINO Fig. 7 (entropy, KL); RankMe (Garrido et al. 2023)"}
    return metrics, protocol


def _collapse_of_backbone(target: Target, device: torch.device) -> tuple[dict, dict]:
    from ssl_bench.data import eval_loaders
    from ssl_bench.eval import collapse
    from ssl_bench.eval.features import cached_features
    from ssl_bench.eval.knn_protocol import feature_spec

    check_eval_size(target)
    cfg = target.cfg
    target.backbone.to(device)
    _, test_loader = eval_loaders(cfg)
    features, _, _ = cached_features(target.backbone, test_loader, feature_spec(cfg, "test", cfg.eval.test_subset),
                                     target.cache, target.info.weights_sha256, device)
    metrics = {"teacher_entropy": None, "kl_teacher_student": None,
               "rankme": round(collapse.rankme(features), 6), "feature_std": round(collapse.feature_std(features), 6)}
    protocol = {"images": len(features), "data": f"{cfg.data.name} test, eval preprocessing "
                f"{cfg.data.eval_resize}/{cfg.data.eval_crop_size}", "rankme_features": "backbone CLS",
                "unavailable": "teacher entropy and KL need the DINO head, which a backbone-only checkpoint lacks",
                "follows": "RankMe (Garrido et al. 2023)"}
    return metrics, protocol


def eval_attention(target: Target, images: list[str], device: torch.device, output: str | None = None,
                   image_size: int | None = None, threshold: float | None = None) -> dict[str, Any]:
    """PNG maps of the last block's CLS attention per head for each image (DINO's Fig. 1 / visualize_attention)."""
    from ssl_bench.data import dataset_info
    from ssl_bench.eval.attention import cls_attention_maps, load_image, save_attention_maps

    if not target.backbone.is_vit:
        raise config_lib.ConfigError(f"attention maps need a ViT; {target.info.backbone.name!r} has no attention")
    size = image_size or target.cfg.data.eval_crop_size
    patch = target.backbone.patch_size
    if size % patch:
        raise config_lib.ConfigError(f"--image-size {size} is not a multiple of the patch size {patch}")
    info = dataset_info(target.cfg.data.name)
    out_dir = Path(output) if output else target.record_dir / "attention"
    start = time.time()
    target.backbone.to(device).eval()
    written: list[Path] = []
    for image_path in images:
        image = load_image(image_path, size, info.mean, info.std)
        maps = cls_attention_maps(target.backbone, image.unsqueeze(0).to(device))[0].cpu()
        written += save_attention_maps(image, maps, out_dir, Path(image_path).stem, patch, info.mean, info.std,
                                       threshold=threshold)
    protocol = {"images": [str(p) for p in images], "image_size": size, "patch_size": patch,
                "heads": int(maps.shape[0]), "attention": "last block, CLS query over patch tokens, per head",
                "threshold": threshold, "normalisation": f"{target.cfg.data.name} mean/std",
                "follows": "DINO visualize_attention.py"}
    record(target, "attention", {}, protocol, timed(start), {"files": [str(p) for p in written]})
    return {"files": written, "protocol": protocol}
