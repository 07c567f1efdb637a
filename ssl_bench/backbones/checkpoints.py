"""Load DINO / DINOv2 / ssl-bench checkpoints onto timm backbones, and export ours in DINO's formats.

Follows the checkpoint layouts of facebookresearch/dino (``main_dino.py`` save_dict, released
``*_pretrain.pth`` backbones, ``utils.load_pretrained_weights``) at 7c446df5 and facebookresearch/dinov2
(``DinoVisionTransformer`` state dicts incl. ``block_chunks``, hub ``*_pretrain.pth``,
``train.do_test`` teacher checkpoints, fvcore ``model`` checkpoints) at b8931f7b.
The official ViT and ResNet key names are timm's, except DINOv2's ``register_tokens``
(timm: ``reg_token`` with ``no_embed_class``) and chunked blocks (``blocks.<chunk>.<i>.``).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from ssl_bench.backbones.timm_backbone import Backbone, build_backbone
from ssl_bench.config import BackboneConfig, ConfigError, from_dict, read_yaml


FORMATS = {
    "ssl-bench": "an ssl-bench run directory or its checkpoints/last.ckpt (Lightning state_dict)",
    "dino-train": "DINO main_dino.py checkpoint.pth ({'student': {'module.backbone.*'}, 'teacher': {'backbone.*'}})",
    "dino-backbone": "DINO released backbone (plain ViT or torchvision ResNet state dict)",
    "dinov2-backbone": "DINOv2 hub backbone (plain state dict with mask_token, LayerScale, registers)",
    "dinov2-train": ("DINOv2 teacher_checkpoint.pth ({'teacher': {'backbone.*'}}) or fvcore model_*.pth "
                     "({'model': {'teacher.backbone.*'}})"),
}
EXPORT_FORMATS = ("dino-backbone", "dino-train", "dinov2-backbone")
IGNORED_PREFIXES = ("head.", "fc.")  # classifier layers of official backbones; never part of our backbone
MAX_LISTED = 8
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+\..*)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large", 1536: "giant"}
_RESNETS = {(False, (2, 2, 2, 2), 64): "resnet18", (False, (3, 4, 6, 3), 64): "resnet34",
            (True, (3, 4, 6, 3), 64): "resnet50", (True, (3, 4, 23, 3), 64): "resnet101",
            (True, (3, 8, 36, 3), 64): "resnet152", (True, (3, 4, 6, 3), 128): "wide_resnet50_2",
            (True, (3, 4, 23, 3), 128): "wide_resnet101_2"}


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit its backbone; the message names the file and format."""


@dataclass
class CheckpointInfo:
    """Where a loaded backbone came from.

    weights_sha256: hash of the loaded backbone's state dict (names, dtypes, shapes, bytes in sorted key
    order), a cache key for features. ignored_keys: checkpoint entries of the chosen network that are not
    backbone weights (heads, classifier). missing_keys: backbone weights left at random init (strict=False).
    """

    format: str
    path: Path
    key: str | None
    weights_sha256: str
    backbone: BackboneConfig
    ignored_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)


def load_backbone(path: str | Path, backbone: BackboneConfig | None = None, key: str = "teacher",
                  strict: bool = True, num_heads: int | None = None, weights_only: bool = True,
                  log: Callable[[str], None] = print, fallback: Path | None = None,
                  run_config: Path | None = None) -> tuple[Backbone, CheckpointInfo]:
    """Build the timm backbone a checkpoint file describes and load its weights (eval mode).

    Run directories are resolved one level up (``run.checkpoints.load_run_backbone``), where the
    run-directory layout is known; this function reads the files it is given.

    Args:
        path: a checkpoint file: ssl-bench's ``last.ckpt`` or an official DINO / DINOv2 ``.pth``.
        backbone: the model to load into; None = ``run_config``'s (ssl-bench) or inferred from the
            tensor shapes (official; see ``infer_backbone_config``).
        key: network inside training checkpoints (``teacher`` as DINO's eval scripts, or ``student``).
        strict: fail when a backbone weight is missing, unexpected or of another shape.
        num_heads: attention heads for inferred ViT configs (default embed_dim // 64, true for DINO/DINOv2).
        weights_only: refuse pickled objects beyond tensors and containers (argparse args are allowed).
        log: gets the one line saying an unreadable ``path`` was passed over for ``fallback``.
        fallback: a checkpoint read instead when ``path`` is absent or unreadable (a run's previous.ckpt).
        run_config: the config.yaml of the run that wrote an ssl-bench checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; name a checkpoint file. Supported: {supported_formats()}")
    raw, ckpt_path = _read_with_fallback(path, fallback, weights_only, log)
    fmt, state, ignored, key_used = extract_backbone_state(raw, key, ckpt_path)
    if fmt == "ssl-bench":
        backbone = backbone or _run_config(run_config)
    else:
        backbone = backbone or infer_backbone_config(state, num_heads)
        state = {k if k == "mask_token" else f"model.{k}": v for k, v in to_timm_names(state).items()}
    mask_token = "mask_token" in state
    try:
        model = build_backbone(backbone, mask_token=mask_token)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{ckpt_path} ({fmt}): cannot build backbone {backbone.name!r}: {exc}") from exc
    missing, unfit = _load_into(model, state, strict, f"{ckpt_path} ({fmt})", backbone.name)
    model.eval()
    info = CheckpointInfo(fmt, ckpt_path, key_used, weights_sha256(model.state_dict()), backbone,
                          ignored + unfit, missing)
    return model, info


def _read_with_fallback(path: Path, fallback: Path | None, weights_only: bool, log: Callable[[str], None]
                        ) -> tuple[Any, Path]:
    """(contents, file read): ``fallback`` is read when ``path`` is absent or cannot be read."""
    if fallback is None or fallback == path:
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return _read(path, weights_only), path
    try:
        return _read(path, weights_only), path
    except CheckpointError as exc:
        if weights_only and "holds pickled objects" in str(exc):
            raise  # readable, but refused: the fallback would be refused alike
        cause = exc.__cause__ or exc
        reason = type(cause).__name__ + (f": {str(cause).splitlines()[0][:200]}" if str(cause).strip() else "")
        log(f"[ssl-bench] cannot read {path} ({reason}); falling back to {fallback.parent.name}/{fallback.name}")
        return _read(fallback, weights_only), fallback


def _read(path: Path, weights_only: bool) -> Any:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO saves its argparse args
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if weights_only and "weights_only" in str(exc):
            raise CheckpointError(f"{path} holds pickled objects beyond tensors; if you trust the file, "
                                  f"pass weights_only=False. ({str(exc).splitlines()[0]})") from exc
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}. Supported: {supported_formats()}") from exc
    except Exception as exc:  # torch raises RuntimeError, EOFError, ... for truncated or foreign files
        raise CheckpointError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}. "
                              f"Supported: {supported_formats()}") from exc


def _run_config(config_path: Path | None) -> BackboneConfig:
    if config_path is None:
        raise CheckpointError("ssl-bench checkpoint outside its run directory (no config.yaml beside its "
                              "checkpoints/ folder); pass backbone=BackboneConfig(...)")
    try:
        return from_dict(read_yaml(config_path)).backbone
    except ConfigError as exc:
        raise CheckpointError(f"run config {config_path}: {exc}") from exc


def supported_formats() -> str:
    """The checkpoint formats this module reads, one phrase each (for error messages)."""
    return "; ".join(f"{name}: {text}" for name, text in FORMATS.items())


def extract_backbone_state(raw: Any, key: str, path: Path | str = "checkpoint"
                           ) -> tuple[str, dict[str, torch.Tensor], list[str], str | None]:
    """Detect the format and return (format, backbone state, ignored keys, key used).

    ssl-bench states use Backbone's names (``model.<timm key>``, ``mask_token``); official states are
    unchunked official names with ``module.``/``backbone.`` prefixes removed, registers still DINOv2's.
    """
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: a {type(raw).__name__}, not a checkpoint dict. Supported: {supported_formats()}")
    if isinstance(raw.get("state_dict"), dict) and any(".backbone.model." in k for k in raw["state_dict"]):
        state, ignored = _split_backbone(_prefixed_network(raw["state_dict"], key, path, "ssl-bench"))
        return "ssl-bench", state, ignored, key
    if isinstance(raw.get("model"), dict) and any(".backbone." in k for k in raw["model"]):
        net = _prefixed_network(raw["model"], key, path, "dinov2-train")
        return ("dinov2-train", *_official(net), key)
    nets = [k for k, v in raw.items() if isinstance(v, dict) and any(n.startswith(("backbone.", "module.backbone."))
                                                                       for n in v)]
    if nets:
        fmt = "dinov2-train" if any(k.startswith(("dino_head.", "ibot_head.", "backbone.mask_token"))
                                    for k in raw[nets[0]]) else "dino-train"
        if key not in nets:
            raise CheckpointError(f"{path} ({fmt}): key {key!r} not in the checkpoint; networks with a "
                                  f"backbone: {nets}")
        return (fmt, *_official(raw[key]), key)
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state, ignored = _official(raw)
        if "cls_token" in state or "conv1.weight" in state:
            dinov2 = "mask_token" in state or "register_tokens" in state
            return ("dinov2-backbone" if dinov2 else "dino-backbone"), state, ignored, None
    top = _listing(sorted(map(str, raw)))
    raise CheckpointError(f"{path}: unknown checkpoint format (top-level keys: {top}). Supported: {supported_formats()}")


def _prefixed_network(flat: dict[str, torch.Tensor], key: str, path: Path | str, fmt: str
                      ) -> dict[str, torch.Tensor]:
    """``{'<key>.<name>': t}`` -> ``{'<name>': t}`` for one network of a flat state dict."""
    nets = sorted({k.split(".backbone.")[0] for k in flat if ".backbone." in k})
    if key not in nets:
        raise CheckpointError(f"{path} ({fmt}): key {key!r} has no backbone; networks: {nets}")
    return {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(f"{key}.")}


def _split_backbone(net: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """``backbone.*`` entries (prefix removed) and the names of everything else."""
    state = {k[len("backbone."):]: v for k, v in net.items() if k.startswith("backbone.")}
    return state, sorted(k for k in net if not k.startswith("backbone."))


def _official(net: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official network dict -> unchunked backbone state in official names, plus ignored names."""
    net = {k.removeprefix("module."): v for k, v in net.items()}  # DDP wrapper, as load_pretrained_weights
    if any(k.startswith("backbone.") for k in net):
        state, ignored = _split_backbone(net)
    else:
        state, ignored = net, []
    ignored += sorted(k for k in state if k.startswith(IGNORED_PREFIXES))
    state = {_unchunk(k): v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    return state, ignored


def _unchunk(name: str) -> str:
    """DINOv2 ``block_chunks``: ``blocks.<chunk>.<i>.rest`` -> ``blocks.<i>.rest`` (i is global)."""
    match = _CHUNKED.match(name)
    return f"blocks.{match.group(1)}" if match else name


def to_timm_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2 registers onto timm's ``no_embed_class`` layout; other official names are timm's.

    DINOv2 adds ``pos_embed[:, 0]`` to the CLS token only and none to the registers, so the CLS position
    folds into ``cls_token`` and ``pos_embed`` keeps the patch positions.
    """
    if any(".mlp.w12." in k for k in state):
        raise CheckpointError("SwiGLU feed-forward blocks (DINOv2 ViT-g, mlp.w12/w3) are not supported")
    if "register_tokens" not in state:
        return dict(state)
    out = {k: v for k, v in state.items() if k not in ("register_tokens", "cls_token", "pos_embed")}
    out["reg_token"] = state["register_tokens"]
    out["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
    out["pos_embed"] = state["pos_embed"][:, 1:]
    return out


def infer_backbone_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> BackboneConfig:
    """Guess the timm model of an official backbone state (official names) from its tensor shapes.

    ViT: embed dim from cls_token, depth from the block indices, patch size from the patch conv, image
    size from the pos_embed grid, MLP ratio from fc1, LayerScale and registers when present; heads are
    not in the weights: embed_dim // 64 unless ``num_heads`` is given. ResNet: torchvision depth/width.
    """
    if "conv1.weight" in state:
        return _infer_resnet(state)
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError("cannot infer the backbone: neither ViT (cls_token, patch_embed) nor ResNet "
                              "(conv1) weights; pass backbone=BackboneConfig(...)")
    dim = state["cls_token"].shape[-1]
    heads = num_heads or dim // 64
    if heads < 1 or dim % heads:
        raise CheckpointError(f"embed dim {dim}: cannot guess the number of heads (dim // 64); pass num_heads=")
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    if grid * grid != state["pos_embed"].shape[1] - 1:
        raise CheckpointError(f"pos_embed of {state['pos_embed'].shape[1]} tokens is not 1 + a square grid")
    blocks = sorted({int(m.group(1)) for k in state if (m := _BLOCK.match(k))})
    fc1 = next((v for k, v in state.items() if k.endswith(".mlp.fc1.weight")), None)
    layerscale = any(k.endswith(".ls1.gamma") for k in state)
    regs = state["register_tokens"].shape[1] if "register_tokens" in state else 0
    kwargs: dict[str, Any] = {"embed_dim": dim, "num_heads": heads}
    if fc1 is not None and fc1.shape[0] != 4 * dim:
        kwargs["mlp_ratio"] = fc1.shape[0] / dim
    if not any(k.endswith(".attn.qkv.bias") for k in state):
        kwargs["qkv_bias"] = False
    if regs:
        kwargs.update(reg_tokens=regs, no_embed_class=True)
    return BackboneConfig(name=_vit_name(dim, patch, dinov2=layerscale or regs > 0, regs=regs), patch_size=patch,
                          img_size=grid * patch, depth=(blocks[-1] + 1) if blocks else 0, drop_path_rate=0.0,
                          layerscale=1e-5 if layerscale else None, kwargs=kwargs)


def _vit_name(dim: int, patch: int, dinov2: bool, regs: int) -> str:
    """The nearest timm model name; the config's explicit sizes make the choice cosmetic."""
    size = _VIT_SIZES.get(dim, "small")
    if dinov2:
        candidates = [f"vit_{size}_patch14_reg{regs}_dinov2"] if regs else [f"vit_{size}_patch14_dinov2"]
        fallback = "vit_small_patch14_reg4_dinov2" if regs else "vit_small_patch14_dinov2"
    else:
        candidates, fallback = [f"vit_{size}_patch{patch}_224", f"vit_{size}_patch16_224"], "vit_small_patch16_224"
    return next((name for name in candidates if timm.is_model(name)), fallback)


def _infer_resnet(state: dict[str, torch.Tensor]) -> BackboneConfig:
    bottleneck = "layer1.0.conv3.weight" in state
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    width = state["layer1.0.conv1.weight"].shape[0] if "layer1.0.conv1.weight" in state else 0
    name = _RESNETS.get((bottleneck, counts, width))
    if name is None:
        raise CheckpointError(f"unknown ResNet (bottleneck={bottleneck}, blocks={counts}, width={width}); "
                              f"known: {sorted(set(_RESNETS.values()))}")
    # ssl-bench's small-image stem (3x3 conv, no max-pool); its stride is not in the weights, so a bare state
    # dict reads as stride 1 (ssl-bench's own checkpoints take backbone.stem_stride from their config.yaml)
    cifar = state["conv1.weight"].shape[-1] == 3
    return BackboneConfig(name=name, patch_size=None, img_size=None, depth=None, drop_path_rate=0.0,
                          cifar_stem=cifar)


def _load_into(model: Backbone, state: dict[str, torch.Tensor], strict: bool, source: str,
               name: str) -> tuple[list[str], list[str]]:
    """Load ``state`` (Backbone names); returns (missing, unexpected or misshapen) for strict=False."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    misshapen = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                 for k in state if k in expected and state[k].shape != expected[k].shape]
    if strict and (missing or unexpected or misshapen):
        raise CheckpointError(f"{source} does not fit timm model {name!r}: missing keys {_listing(missing)}; "
                              f"unexpected keys {_listing(unexpected)}; shape mismatches {_listing(misshapen)}")
    fitting = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    model.load_state_dict(fitting, strict=False)
    return missing, unexpected + [m.split(" ")[0] for m in misshapen]


def _listing(names: list[str]) -> str:
    """``(n) a, b, ... (+k more)``: long key lists stay readable."""
    shown = ", ".join(n.removeprefix("model.") for n in names[:MAX_LISTED]) or "-"
    more = f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else ""
    return f"({len(names)}) {shown}{more}"


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``state`` in sorted key order.

    The feature cache and evaluation records key on it. iBOT's ``mask_token`` is left out: it never
    enters an evaluation forward pass, so a backbone loaded with or without it hashes the same.
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        if name == "mask_token":
            continue
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_official(backbone: Backbone, path: str | Path, fmt: str = "dino-backbone") -> Path:
    """Write a backbone as a DINO released backbone, a DINO ``checkpoint.pth`` layout, or a DINOv2 backbone.

    dino-*: plain ViTs (no LayerScale, no registers) and ResNets; the ResNet layout is torchvision's
    (an ssl-bench cifar_stem has no torchvision counterpart). dinov2-backbone: ViTs, with ``mask_token``
    (zeros without one) and registers in DINOv2's layout (CLS position folded into ``cls_token``).
    """
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r}; valid: {', '.join(EXPORT_FORMATS)}")
    state = {k: v.detach().cpu().clone() for k, v in backbone.model.state_dict().items()}
    dinov2_only = "reg_token" in state or any(k.endswith(".ls1.gamma") for k in state)
    if fmt.startswith("dino-") and dinov2_only:
        raise ValueError("LayerScale / register models have no DINO layout; export with fmt='dinov2-backbone'")
    if fmt == "dinov2-backbone":
        state = _dinov2_names(backbone, state)
    if fmt == "dino-train":  # DINO DDP-wraps the student, and the teacher too when it has batch norms
        has_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
                     for m in backbone.modules())
        teacher = "module.backbone." if has_bn else "backbone."
        state = {"teacher": {teacher + k: v for k, v in state.items()},
                 "student": {"module.backbone." + k: v for k, v in state.items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _dinov2_names(backbone: Backbone, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT state -> DINOv2 hub names (the inverse of ``to_timm_names``)."""
    if not backbone.is_vit:
        raise ValueError("the DINOv2 backbone format holds ViTs only")
    mask = getattr(backbone, "mask_token", None)
    state["mask_token"] = (mask.detach().cpu().clone() if mask is not None
                           else torch.zeros(1, backbone.embed_dim))
    if "reg_token" in state:
        state["register_tokens"] = state.pop("reg_token")
        pos = state["pos_embed"]  # the CLS position lives in cls_token already: give it a zero slot
        state["pos_embed"] = torch.cat([torch.zeros_like(pos[:, :1]), pos], dim=1)
    return state
