"""Last-block self-attention maps of timm ViTs: DINO's emergent-segmentation figures.

Follows Caron et al. 2021 (arXiv 2104.14294, Fig. 1/3) and the reference
``visualize_attention.py`` / ``VisionTransformer.get_last_selfattention`` of
facebookresearch/dino: the CLS query's attention over the patch tokens in the
last block, one map per head, optionally thresholded to the smallest patch set
holding a given share of the mass, upsampled (nearest) by the patch size.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from timm.layers import Attention
from torch import Tensor, nn

from ssl_bench.backbones import Backbone
from ssl_bench.config import ConfigError
from ssl_bench.data import dataset_info
from ssl_bench.eval.protocol import EvalContext, Outcome, Protocol, arg, register

COLORMAP = "viridis"  # matplotlib's default, the one DINO's plt.imsave figures use


def _check_vit(backbone: Backbone, images: Tensor) -> tuple[int, int]:
    """Patch grid (h, w) of ``images``; clear errors for CNNs and sizes off the patch grid."""
    if not backbone.is_vit or backbone.patch_size is None:
        name = type(backbone.model).__name__
        raise ValueError(f"attention maps need a ViT backbone with patch tokens; got {name} (no patch_embed)")
    if images.ndim != 4:
        raise ValueError(f"images must be (B, 3, H, W); got shape {tuple(images.shape)}")
    p, (height, width) = backbone.patch_size, images.shape[-2:]
    if height % p or width % p:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {p}; "
                         f"crop to {height - height % p}x{width - width % p}")
    return height // p, width // p


def _last_attention_module(backbone: Backbone) -> Attention:
    blocks = getattr(backbone.model, "blocks", None)
    attn = getattr(blocks[-1], "attn", None) if blocks is not None and len(blocks) else None
    # Only timm's plain Attention: RoPE (EVA) or fused-block variants compute scores differently.
    if not isinstance(attn, Attention):
        raise NotImplementedError(f"last block's attention is {type(attn).__name__}, not timm.layers.Attention; "
                                  "attention maps support plain timm ViT blocks only")
    return attn


def _attention_probs(attn: Attention, x: Tensor) -> Tensor:
    """softmax(q k^T * scale) of one timm Attention. Args: x: (B, T, D) input to ``attn``."""
    batch, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    # Scores and softmax in fp32 (autocast off) so bf16/fp16 runs still give rows that sum to 1.
    with torch.autocast(device_type=x.device.type, enabled=False):
        scores = (q.float() * attn.scale) @ k.float().transpose(-2, -1)
        return scores.softmax(dim=-1)


@torch.no_grad()
def last_block_attention(backbone: Backbone, images: Tensor) -> Tensor:
    """Full attention (B, heads, T, T) of the last block, T = prefix tokens + patches.

    Same matrix as DINO's ``get_last_selfattention`` (CLS row included). timm's
    fused attention never materialises it, so a forward pre-hook on the last
    ``attn`` captures its input during a normal eval-mode forward and the
    scores are recomputed from that block's ``qkv``, ``q_norm``/``k_norm`` and
    ``scale``. The backbone's train/eval mode is restored afterwards.

    Args:
        images: (B, 3, H, W) normalised images, H and W multiples of the patch size.
    """
    _check_vit(backbone, images)
    attn = _last_attention_module(backbone)
    captured: list[Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if kwargs.get("attn_mask") is not None or (len(args) > 1 and args[1] is not None):
            raise NotImplementedError("last block was called with an attention mask; not supported")
        captured.append(args[0] if args else kwargs["x"])

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    was_training = backbone.training
    backbone.eval()  # no dropout / drop-path, as in DINO's visualisation
    try:
        backbone.model.forward_features(images)
    finally:
        handle.remove()
        backbone.train(was_training)
    return _attention_probs(attn, captured[-1])


def cls_attention_maps(backbone: Backbone, images: Tensor) -> Tensor:
    """CLS -> patch attention (B, heads, h, w) of the last block; prefix/register keys dropped.

    Rows are not renormalised after dropping the prefix keys (DINO does not either).

    Args:
        images: (B, 3, H, W), H and W multiples of the patch size p; h = H/p, w = W/p.
    """
    grid_h, grid_w = _check_vit(backbone, images)
    if getattr(backbone.model, "cls_token", None) is None:
        raise ValueError(f"{type(backbone.model).__name__} has no CLS token; CLS attention maps need one")
    attn = last_block_attention(backbone, images)
    cls_to_patches = attn[:, :, 0, backbone.num_prefix_tokens:]
    return cls_to_patches.reshape(attn.shape[0], attn.shape[1], grid_h, grid_w)


def threshold_maps(maps: Tensor, keep: float) -> Tensor:
    """Bool masks of the smallest patch set holding ``keep`` of each map's mass (DINO's rule).

    DINO sorts ascending and keeps patches whose cumulative share exceeds
    ``1 - keep``; equivalently a patch is kept when the mass of the patches
    ranked above it is below ``keep``.

    Args:
        maps: (..., h, w) non-negative attention; each (h, w) map is normalised here.
        keep: share of the mass in (0, 1], e.g. 0.6.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1]; got {keep}")
    flat = maps.flatten(-2).float()
    flat = flat / flat.sum(dim=-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    mass_above = values.cumsum(dim=-1) - values
    kept_sorted = mass_above < keep
    kept = torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)
    return kept.reshape(maps.shape)


def load_image(path: str | Path, size: int, mean: Sequence[float], std: Sequence[float],
               patch_size: int | None = None) -> Tensor:
    """One RGB image as a normalised (3, size, size) tensor: shorter side resized, centre crop.

    ``size`` is rounded down to a multiple of ``patch_size`` when one is given;
    otherwise the caller must pass a multiple (``cls_attention_maps`` checks).
    Resizing is bilinear with antialiasing (torchvision), as DINO's ``Resize``.
    """
    if patch_size is not None:
        size -= size % patch_size
    if size <= 0:
        raise ValueError(f"image size must be positive after rounding to the patch size; got {size}")
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc}") from exc
    img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    return TF.normalize(TF.to_tensor(img), list(mean), list(std))


def _denormalise(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) normalised tensor -> (H, W, 3) uint8."""
    shape = (3, 1, 1)
    pixels = image.detach().float().cpu() * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    return (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _colourise(heat: Tensor) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 through the colormap, min-max scaled like ``plt.imsave``."""
    heat = heat.detach().float().cpu()
    span = heat.max() - heat.min()
    scaled = (heat - heat.min()) / span if span > 0 else torch.zeros_like(heat)
    rgba = colormaps[COLORMAP](scaled.numpy())
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def _upsample(maps: Tensor, patch_size: int) -> Tensor:
    """(heads, h, w) -> (heads, h*p, w*p), nearest, so each patch stays one flat block."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def _save_overview(path: Path, panels: list[tuple[str, np.ndarray]]) -> None:
    """Grid of titled panels written with the Agg canvas (no pyplot, no global backend change)."""
    cols = min(len(panels), 7)
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(2 * cols, 2.2 * rows))
    FigureCanvasAgg(fig)
    for i, (title, pixels) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(pixels)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def save_attention_maps(image: Tensor, maps: Tensor, out_dir: Path, stem: str, patch_size: int,
                        mean: Sequence[float], std: Sequence[float], threshold: float | None = None) -> list[Path]:
    """Write ``<stem>-head<i>.png``, ``-mean.png``, ``-input.png``, ``-overview.png``; return the paths.

    Heads and mean are upsampled to the image resolution and colour-mapped;
    with ``threshold`` they show DINO's binary masks (``threshold_maps``)
    instead of the raw attention. Order: heads, mean, input, overview.

    Args:
        image: (3, H, W) normalised image; maps: (heads, h, w) with H = h*p, W = w*p.
    """
    heads, grid_h, grid_w = maps.shape
    if image.shape[-2:] != (grid_h * patch_size, grid_w * patch_size):
        raise ValueError(f"maps {grid_h}x{grid_w} at patch size {patch_size} do not cover image "
                         f"{tuple(image.shape[-2:])}")
    shown = threshold_maps(maps, threshold).float() if threshold is not None else maps.float()
    full = _upsample(shown.detach().cpu(), patch_size)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    panels = [(f"head {i}", _colourise(full[i])) for i in range(heads)] + [("mean", _colourise(full.mean(0)))]
    paths = [out_dir / f"{stem}-head{i}.png" for i in range(heads)] + [out_dir / f"{stem}-mean.png"]
    for path, (_, pixels) in zip(paths, panels):
        Image.fromarray(pixels).save(path)
    input_pixels = _denormalise(image, mean, std)
    paths.append(out_dir / f"{stem}-input.png")
    Image.fromarray(input_pixels).save(paths[-1])
    paths.append(out_dir / f"{stem}-overview.png")
    _save_overview(paths[-1], [("input", input_pixels)] + panels)
    return paths


def _run(ctx: EvalContext, opts: SimpleNamespace) -> Outcome:
    """PNG maps of the last block's CLS attention per head for each of ``opts.inputs`` (DINO visualize_attention)."""
    if not ctx.backbone.is_vit:
        raise ConfigError(f"attention maps need a ViT; {ctx.backbone_name!r} has no attention")
    size, patch = opts.image_size or ctx.cfg.data.eval_crop_size, ctx.backbone.patch_size
    if size % patch:
        raise ConfigError(f"--image-size {size} is not a multiple of the patch size {patch}")
    info = dataset_info(ctx.cfg.data.name)
    out_dir = Path(opts.output) if opts.output else ctx.record_dir / "attention"
    ctx.backbone.eval()
    written: list[Path] = []
    for image_path in opts.inputs:
        image = load_image(image_path, size, info.mean, info.std)
        maps = cls_attention_maps(ctx.backbone, image.unsqueeze(0).to(ctx.device))[0].cpu()
        written += save_attention_maps(image, maps, out_dir, Path(image_path).stem, patch, info.mean, info.std,
                                       threshold=opts.threshold)
    protocol = {"images": [str(p) for p in opts.inputs], "image_size": size, "patch_size": patch,
                "heads": int(maps.shape[0]), "attention": "last block, CLS query over patch tokens, per head",
                "threshold": opts.threshold, "normalisation": f"{ctx.cfg.data.name} mean/std",
                "follows": "DINO visualize_attention.py"}
    return Outcome({}, protocol, extra={"files": [str(p) for p in written]})


def _show(out: Outcome, opts: SimpleNamespace) -> None:
    files = out.extra["files"]
    print(f"{len(files)} PNG files ({out.protocol['heads']} heads x {len(opts.inputs)} image(s)) in "
          f"{Path(files[0]).parent}")


register(Protocol("attention", "PNGs of the last block's CLS attention per head", _run, _show,
                  inputs="image files", arguments=(
                      arg("--output", help="folder for the PNGs (default: <record dir>/attention)"),
                      arg("--image-size", type=int, help="square input size (default: data.eval_crop_size)"),
                      arg("--threshold", type=float, help="also keep only the patches holding this share of each "
                                                          "head's attention mass (DINO: 0.6)"))))
