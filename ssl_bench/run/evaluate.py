"""Post-hoc evaluation of a run directory or a checkpoint with any protocol registered in ``eval/``.

The one place that wires a checkpoint (ssl-bench, official DINO or DINOv2), the data of a config and
the protocols of ``eval/`` (``ssl_bench.eval.protocol.PROTOCOLS``). Each evaluation is recorded with its protocol, the checkpoint's weight
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
from types import SimpleNamespace
from typing import Any

import torch

from ssl_bench import config as config_lib
from ssl_bench import dist, repro, tracking
from ssl_bench.backbones import Backbone
from ssl_bench.backbones.checkpoints import CheckpointInfo
from ssl_bench.eval.features import FeatureCache
from ssl_bench.eval.protocol import EvalContext, MethodOutputs, Outcome, Protocol, protocols
from ssl_bench.run.checkpoints import load_run_backbone
from ssl_bench.run.progress import feature_progress

IMPORTED_STUDY = "imported"  # study folder under runs_root for checkpoints trained elsewhere


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
    elif (checkpoints / tracking.LAST_CHECKPOINT).exists() or (checkpoints / tracking.PREVIOUS_CHECKPOINT).exists():
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
        return load_run_backbone(path, backbone_cfg, key=key, num_heads=num_heads,
                                 log=lambda line: print(line, flush=True))
    except (ValueError, KeyError, OSError) as exc:
        raise config_lib.ConfigError(str(exc)) from exc


def native_size(backbone: Backbone, info: CheckpointInfo) -> int:
    """The resolution a checkpoint was trained at: the ViT position grid, else DINO's 224."""
    size = info.backbone.img_size if backbone.is_vit else None
    return int(size) if size else 224


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


def evaluate(target: Target, name: str, device: torch.device, **options: Any) -> Outcome | None:
    """Run the registered protocol ``name`` on ``target`` and record it; ``options`` replace its argument defaults."""
    protocol = protocols().get(name)
    return run_protocol(target, protocol, device, protocol.defaults(**options))


def evaluate_launched(target: str, kinds: list[str], device: str | None, launcher: str
                      ) -> tuple[dict[str, Path | None], int]:
    """Every protocol of ``kinds`` on ``target`` in the process group of the tasks ``launcher`` started.

    Returns (kind -> record path, None on ranks other than 0; the number of ranks).
    """
    done = {}
    with dist.launched_group(launcher, device_of(device)) as rank_device:
        for kind in kinds:  # a fresh target each: a protocol may move or change the backbone
            out = evaluate(open_target(target), kind, rank_device)
            done[kind] = out.record if out is not None else None
        ranks = dist.world_size()
    return done, ranks


def run_protocol(target: Target, protocol: Protocol, device: torch.device, opts: SimpleNamespace) -> Outcome | None:
    """The backbone on ``device``, the protocol's run, then its record (``Outcome.record`` is its path).

    Under DDP every rank calls this. A sharded protocol (k-NN, linear) runs on every rank; any other
    runs on rank 0 alone while the rest wait (they return None). Rank 0 alone writes the record.
    """
    start = time.time()
    if dist.world_size() > 1 and not protocol.sharded:
        out = None
        if dist.rank() == 0:
            out = _run_and_record(target, protocol, device, opts, start)
        dist.barrier()
        return out
    return _run_and_record(target, protocol, device, opts, start)


def _run_and_record(target: Target, protocol: Protocol, device: torch.device, opts: SimpleNamespace,
                    start: float) -> Outcome:
    target.backbone.to(device)
    out = protocol.run(context(target, device), opts)
    if dist.rank() == 0:
        out.record = record(target, protocol.name, out.metrics, out.protocol, {**out.timing, **timed(start)},
                            out.extra)
    return out


def context(target: Target, device: torch.device) -> EvalContext:
    """What a protocol sees of the target; the trained method is reachable (lazily) for runs only."""
    return EvalContext(target.cfg, target.backbone, device, target.info.weights_sha256, target.cache,
                       target.record_dir, target.info.backbone.name,
                       progress=lambda label: feature_progress(target.cfg, label),
                       log=lambda line: print(line, flush=True),
                       method_outputs=(lambda n: method_outputs(target, device, n)) if target.is_run else None)


@torch.no_grad()
def method_outputs(target: Target, device: torch.device, batches: int) -> MethodOutputs:
    """The run's method, loaded from its checkpoint in eval mode, on ``batches`` batches of its training pipeline."""
    from itertools import islice

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
    datamodule = build_datamodule(cfg, method)
    views: tuple[list, list, list] = ([], [], [])
    for batch in islice(datamodule.train_dataloader(), batches):
        crops = datamodule.on_device(batch, device).crops  # data.augment_on=device makes the crops here
        teacher_cls = method.teacher.backbone_cls(crops[:2])
        views[0].append(method.teacher_probs(method.teacher.head(teacher_cls), teacher_temp).chunk(2))
        views[1].append(method.student(crops).chunk(len(crops)))
        views[2].append(teacher_cls)
    if not views[2]:
        raise config_lib.ConfigError(f"{target.record_dir}: the training set gives no full batch of "
                                     f"{config_lib.rank_batch_size(cfg)} images ({config_lib.rank_batch_terms(cfg)})")
    return MethodOutputs([torch.cat(v) for v in zip(*views[0])], [torch.cat(v) for v in zip(*views[1])],
                         torch.cat(views[2]), len(views[2]), teacher_temp)
