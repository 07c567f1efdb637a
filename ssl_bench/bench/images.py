"""Test JPEGs for pipeline benchmarks: an ImageNet-layout folder ``root/{train,val}/<class>/*.jpg``.

The content is generated, deterministic from the seed, and made to cost what photographs cost: a
smooth random colour field (a coarse grid of colours upsampled bicubically), a linear gradient,
random ellipses, rectangles and polygons, and fine sensor-like noise, so JPEG decoding, resizing and
colour jitter all have real work. Each class has its own palette, so the classes differ in colour
statistics. Image ``i`` of a split belongs to class ``i % classes``; its content depends only on
(seed, split, i), so a larger ``count`` extends a smaller one's set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

SPLITS = ("train", "val")
MANIFEST = "make_images.json"


def parse_size(text: str) -> tuple[int, int]:
    """``"500x375"`` -> (width 500, height 375)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError as exc:
        raise ValueError(f"size {text!r}: give WIDTHxHEIGHT, e.g. 500x375") from exc
    if width < 1 or height < 1:
        raise ValueError(f"size {text!r}: width and height must be >= 1")
    return width, height


def make_images(root: str | Path, count: int, size: tuple[int, int] = (500, 375), classes: int = 10,
                seed: int = 0, val_count: Optional[int] = None, quality: int = 90) -> dict[str, Any]:
    """Write ``count`` train and ``val_count`` val JPEGs of ``size`` (width, height) under ``root``.

    Args:
        root: output folder; its ``train/`` and ``val/`` must not exist yet or be empty.
        count: train images (>= classes, so that every class folder has one).
        size: (width, height) in pixels.
        classes: class folders ``class_000`` ... per split.
        seed: the content's seed.
        val_count: val images; default ``max(classes, count // 10)``.
        quality: JPEG quality (PIL, 4:2:0 subsampling).

    Returns:
        The settings and the number of files per split, also written to ``root/make_images.json``.
    """
    val_count = max(classes, count // 10) if val_count is None else val_count
    _check(root, count, val_count, size, classes, quality)
    root = Path(root)
    palettes = [_palette(np.random.default_rng([seed, 1, c])) for c in range(classes)]
    counts = {"train": count, "val": val_count}
    for split_index, split in enumerate(SPLITS):
        for c in range(classes):
            (root / split / class_name(c)).mkdir(parents=True, exist_ok=True)
        for i in range(counts[split]):
            c = i % classes
            rng = np.random.default_rng([seed, 2, split_index, i])
            image = generate_image(rng, size, palettes[c])
            image.save(root / split / class_name(c) / f"{split}_{i:06d}.jpg", "JPEG", quality=quality)
    manifest = {"count": count, "val_count": val_count, "size": list(size), "classes": classes, "seed": seed,
                "quality": quality, "files": counts}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check(root: str | Path, count: int, val_count: int, size: tuple[int, int], classes: int, quality: int) -> None:
    if classes < 1 or count < classes or val_count < classes:
        raise ValueError(f"need classes >= 1 and at least one image per class in each split, got "
                         f"classes={classes}, count={count}, val_count={val_count}")
    if not 1 <= quality <= 95:
        raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
    if min(size) < 1:
        raise ValueError(f"size must be positive, got {size}")
    for split in SPLITS:
        folder = Path(root) / split
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder} is not empty; give a new folder (the images would mix with its files)")


def class_name(c: int) -> str:
    return f"class_{c:03d}"


def _palette(rng: np.random.Generator) -> np.ndarray:
    """A class's 4 base colours (RGB floats in 0..255)."""
    return rng.uniform(0, 255, size=(4, 3))


def generate_image(rng: np.random.Generator, size: tuple[int, int], palette: np.ndarray) -> Image.Image:
    """One RGB image of ``size`` (width, height) drawn from ``rng``: field, gradient, shapes, noise."""
    image = _colour_field(rng, size, palette)
    image = _with_gradient(rng, image)
    _draw_shapes(rng, image, palette)
    pixels = np.asarray(image, dtype=np.float32)
    pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)  # grain: JPEG has detail to encode
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _colour_field(rng: np.random.Generator, size: tuple[int, int], palette: np.ndarray) -> Image.Image:
    """A coarse grid of palette colours (jittered) upsampled bicubically: smooth, photo-like regions."""
    gw, gh = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    picks = palette[rng.integers(0, len(palette), size=(gh, gw))]
    coarse = np.clip(picks + rng.normal(0, 30, size=picks.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(coarse, "RGB").resize(size, Image.BICUBIC)


def _with_gradient(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """Blend in a linear brightness gradient in a random direction (as lighting falls off in photos)."""
    width, height = image.size
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.cos(angle) * xs / max(width, 1) + np.sin(angle) * ys / max(height, 1)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    strength = rng.uniform(0.3, 0.9)
    pixels = np.asarray(image, dtype=np.float32) * (1 - strength + strength * ramp[..., None] * 1.4)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _draw_shapes(rng: np.random.Generator, image: Image.Image, palette: np.ndarray) -> None:
    """5-15 filled ellipses, rectangles and polygons of palette-near or random colours, in place."""
    width, height = image.size
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(5, 16))):
        base = palette[rng.integers(len(palette))] if rng.random() < 0.7 else rng.uniform(0, 255, 3)
        colour = tuple(int(v) for v in np.clip(base + rng.normal(0, 40, 3), 0, 255))
        kind = int(rng.integers(3))
        if kind == 2:
            n = int(rng.integers(3, 7))
            points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height))) for _ in range(n)]
            draw.polygon(points, fill=colour)
            continue
        x0, y0 = rng.uniform(-0.1 * width, width), rng.uniform(-0.1 * height, height)
        w, h = rng.uniform(0.05, 0.5) * width, rng.uniform(0.05, 0.5) * height
        box = [float(x0), float(y0), float(x0 + w), float(y0 + h)]
        (draw.ellipse if kind == 0 else draw.rectangle)(box, fill=colour)
