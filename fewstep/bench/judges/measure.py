"""Deterministic pixel rules: background and text colour, layout (position, size, count).

These attributes are measured directly where a rule is more robust than a learned model:

- background colour: the dominant colour of the image border (a 2-pixel ring, 1/32 of the side),
  named by the nearest world colour;
- text colour: the median colour of the strongest foreground (ink) pixels, nearest text colour;
- layout: the foreground mask (pixels far from the background colour) is compared by IoU with the
  masks of the expected scene re-rendered in every layout the world allows (each position x size
  x count); the best match gives position, size and count at once. Re-rendering the case's own
  subject makes the templates subject-aware (emoji do not fill their boxes).

All functions take any image size; layout templates are rendered at the image's own size.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np
from PIL import Image

from fewstep.bench import world

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as foreground
MIN_BORDER_SHARE = 0.5  # below this share of border pixels in one colour there is no flat background
MIN_LAYOUT_IOU = 0.2  # below this the foreground matches no layout (noise, empty image)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float64)


def nearest_colour(rgb: np.ndarray, names: tuple[str, ...]) -> tuple[str, float]:
    dists = {n: float(np.linalg.norm(rgb - np.array(world.COLORS[n]))) for n in names}
    name = min(dists, key=dists.get)
    return name, dists[name]


def border_colour(image: Image.Image, share: list | None = None) -> np.ndarray:
    """Dominant colour of the border ring: the mean of the most common coarse colour bin.

    ``share``, if given, receives the fraction of border pixels near that colour.
    """
    array = _array(image)
    h, w = array.shape[:2]
    ring = max(1, min(h, w) // 32)
    pixels = np.concatenate([array[:ring].reshape(-1, 3), array[-ring:].reshape(-1, 3),
                             array[:, :ring].reshape(-1, 3), array[:, -ring:].reshape(-1, 3)])
    bins = (pixels // 32).astype(np.int64)
    keys = bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2]
    values, counts = np.unique(keys, return_counts=True)
    top = values[np.argmax(counts)]
    # Neighbouring bins too, so a colour on a bin edge is not split in half.
    near = (np.abs(bins - np.array([top // 64, (top // 8) % 8, top % 8])) <= 1).all(1)
    if share is not None:
        share.append(float(near.mean()))
    return pixels[near].mean(0)


def background(image: Image.Image) -> dict[str, Any]:
    """The named background colour, or name None when the border has no dominant flat colour."""
    share: list[float] = []
    rgb = border_colour(image, share)
    name, dist = nearest_colour(rgb, world.BACKGROUNDS)
    flat = share[0] >= MIN_BORDER_SHARE
    return {"name": name if flat else None, "rgb": [round(float(v), 1) for v in rgb], "distance": round(dist, 1),
            "border_share": round(share[0], 3)}


def foreground_mask(image: Image.Image, bg_rgb: np.ndarray | None = None) -> np.ndarray:
    array = _array(image)
    bg = border_colour(image) if bg_rgb is None else np.asarray(bg_rgb, dtype=np.float64)
    return np.linalg.norm(array - bg, axis=-1) > FOREGROUND_DISTANCE


def text_colour(image: Image.Image) -> dict[str, Any]:
    """Median colour of the pixels farthest from the background (the glyph cores, not their edges)."""
    array = _array(image)
    bg = border_colour(image)
    dist = np.linalg.norm(array - bg, axis=-1)
    if dist.max() <= FOREGROUND_DISTANCE:
        return {"name": None, "rgb": None, "distance": None}
    ink = array[dist >= max(FOREGROUND_DISTANCE, 0.7 * dist.max())]
    rgb = np.median(ink, axis=0)
    name, d = nearest_colour(rgb, world.TEXT_COLORS)
    return {"name": name, "rgb": [round(float(v), 1) for v in rgb], "distance": round(d, 1)}


def _layout_options(attrs: dict) -> list[dict[str, Any]]:
    if attrs["category"] == "text":
        return [{"position": p, "size": s, "count": 1} for p in world.TEXT_POSITIONS for s in world.SIZES]
    return [{"position": p, "size": s, "count": c} for p in world.POSITIONS for s in world.SIZES
            for c in world.COUNTS]


@functools.lru_cache(maxsize=256)
def _templates(attrs_json: str, size: int) -> tuple[tuple[dict, np.ndarray], ...]:
    attrs = json.loads(attrs_json)
    out = []
    for option in _layout_options(attrs):
        variant = {**attrs, **option, "style": None, "degradation": None}
        render = world.render_t2i(variant, size)
        out.append((option, foreground_mask(render, np.array(attrs["background_rgb"]))))
    return tuple(out)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def layout(image: Image.Image, attrs: dict) -> dict[str, Any]:
    """Best-matching layout of the expected scene ``attrs`` and its IoU with the image's foreground.

    Returns ``{"position", "size", "count", "iou", "expected_iou"}``: the matched layout, its IoU,
    and the IoU of the layout the prompt asked for (how well the requested layout fits).
    """
    image = image.convert("RGB")
    if image.width != image.height:
        side = min(image.size)
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    keys = ("category", "subject", "skin_tone", "emoji", "background_rgb", "position", "size", "count",
            "text", "font", "text_color_rgb", "companion")
    core = {k: attrs.get(k) for k in keys}
    templates = _templates(json.dumps(core, sort_keys=True), image.width)
    mask = foreground_mask(image)
    scores = [(option, _iou(mask, tmask)) for option, tmask in templates]
    best, best_iou = max(scores, key=lambda item: item[1])
    expected = next(iou for option, iou in scores if option["position"] == attrs["position"]
                    and option["size"] == attrs["size"] and option["count"] == int(attrs.get("count") or 1))
    if best_iou < MIN_LAYOUT_IOU:
        best = {"position": None, "size": None, "count": None}
    return {**best, "iou": round(best_iou, 3), "expected_iou": round(expected, 3)}


def mean_abs_diff(a: Image.Image, b: Image.Image, box: list[float] | None = None) -> float:
    """Mean absolute RGB difference (0-255) of two images at ``b``'s size, optionally in a box (fractions)."""
    if a.size != b.size:
        a = a.convert("RGB").resize(b.size, Image.Resampling.BILINEAR)
    x, y = _array(a), _array(b)
    if box is not None:
        h, w = y.shape[:2]
        x0, y0 = int(np.floor(box[0] * w)), int(np.floor(box[1] * h))
        x1, y1 = int(np.ceil(box[2] * w)), int(np.ceil(box[3] * h))
        x, y = x[y0:y1, x0:x1], y[y0:y1, x0:x1]
    return float(np.abs(x - y).mean()) if x.size else 0.0


def mean_abs_diff_outside(a: Image.Image, b: Image.Image, box: list[float]) -> float:
    """Mean absolute difference outside ``box`` (fractions, grown by 2 px for antialiasing)."""
    if a.size != b.size:
        a = a.convert("RGB").resize(b.size, Image.Resampling.BILINEAR)
    x, y = _array(a), _array(b)
    h, w = y.shape[:2]
    keep = np.ones((h, w), dtype=bool)
    x0, y0 = max(0, int(np.floor(box[0] * w)) - 2), max(0, int(np.floor(box[1] * h)) - 2)
    x1, y1 = min(w, int(np.ceil(box[2] * w)) + 2), min(h, int(np.ceil(box[3] * h)) + 2)
    keep[y0:y1, x0:x1] = False
    return float(np.abs(x - y)[keep].mean()) if keep.any() else 0.0


def psnr(a: Image.Image, b: Image.Image) -> float:
    if a.size != b.size:
        a = a.convert("RGB").resize(b.size, Image.Resampling.BILINEAR)
    mse = float(((_array(a) - _array(b)) ** 2).mean())
    return 99.0 if mse == 0 else round(10 * np.log10(255.0**2 / mse), 2)
