"""The tiny world: vocabulary, attributes and pure render functions.

Everything the corpus, the mini benches and the judges know about an image is a plain
JSON-able ``attrs`` dict, and ``render_t2i(attrs, resolution)`` turns it into the exact
picture (same attrs, same machine: same pixels). Subjects are few (tens per category);
variety comes from attributes that combine, so bench cases are new combinations of known
subjects and attributes (as GenEval does).

Scene attributes (``attrs``; a T2I record's ``meta`` is ``attrs`` plus ``boxes``,
``resolution``, ``world_version`` and ``template``):

- ``category``: ``portrait`` | ``landscape`` | ``text``
- ``subject``: subject key (``"grinning_face"``); ``None`` for text
- ``subject_name``: the short English name used in prompts (``"grinning face"``)
- ``unicode_name``: the emoji's CLDR name incl. skin tone (``"man cook: dark skin tone"``)
- ``emoji``: the rendered emoji string (Noto Color Emoji)
- ``skin_tone``: ``None`` (default yellow) or one of :data:`SKIN_TONES`
- ``background``, ``background_rgb``: a :data:`BACKGROUNDS` name and its RGB list
- ``position``: one of :data:`POSITIONS` (text: :data:`TEXT_POSITIONS`)
- ``size``: ``small`` | ``large``; ``count``: 1 | 2 (text: always 1)
- ``text``, ``font``, ``text_color``, ``text_color_rgb``: text category only, else ``None``
- ``companion``: ``None`` or ``{"subject", "subject_name", "emoji", "position"}``: a
  second, small object from :data:`COMPANIONS` (object edits)
- ``style``: ``None`` or one of :data:`STYLES` (post-processing; style-edit targets)
- ``degradation``: ``None`` or ``{"kind": blur|noise|lowres, "seed": int}`` (enhancement sources)
- ``boxes`` (meta only): ``{"subject": [[x0, y0, x1, y1], ...], "companion": box | None,
  "text": box | None}`` as fractions of the image side.

Edit meta (``meta`` of a raw edit record and of an editing-bench case):
``edit_category`` (one of :data:`EDIT_CATEGORIES`), ``operation`` (see
:data:`EDIT_OPERATIONS`), ``source`` and ``target`` (scene attrs with ``boxes``),
``region`` (the edited box as fractions, or ``None`` for global edits), ``resolution``,
``world_version``, ``template``. ``render_edit_pair(meta, resolution)`` re-renders both.

Bench hold-out: ``is_reserved(combo_key(attrs))`` (T2I) and ``is_reserved(edit_key(meta))``
(edits) select the combinations kept for the mini benches; ``fewstep corpus build`` never
emits them.

API (stable): ``make_attrs(category, subject=..., background=..., position=..., size=...,
count=..., skin_tone=..., text=..., font=..., text_color=..., companion=..., style=...,
degradation=...)`` -> attrs; ``render_t2i(attrs, resolution)`` -> PIL RGB;
``render_edit_pair(meta, resolution)`` -> (source, target); ``layout(attrs, resolution)`` ->
boxes; ``scene_meta(attrs, resolution)``; ``apply_style(image, style)``;
``degrade(image, degradation)``; ``png_bytes(image)``; vocabulary tables ``SUBJECTS``
(``PORTRAIT``, ``LANDSCAPE``), ``COMPANIONS``, ``WORDS``, ``FONTS``, ``COLORS``,
``BACKGROUNDS``, ``TEXT_COLORS``, ``POSITIONS``, ``SIZES``, ``COUNTS``, ``SKIN_TONES``,
``STYLES``, ``EDIT_OPERATIONS``; ``readable(text_color, background)``; ``vocabulary()`` /
``vocabulary_hash()``. To train a recogniser, render each subject with ``make_attrs`` over
random backgrounds, positions and sizes (fixed backgrounds teach the background instead).
"""
# ruff: noqa: F403, F405  (the vocabulary is star-imported and re-exported)

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont, ImageOps

from fewstep.bench.vocabulary import *  # the tables are part of the world's API


class WorldDataMissing(FileNotFoundError):
    """An installed data file (font, emoji table) is absent; names the Debian package."""


def subject(key: str) -> Subject:
    if key not in _BY_KEY:
        raise ValueError(f"subject: unknown key {key!r}; known: {sorted(_BY_KEY)}")
    return _BY_KEY[key]


@functools.lru_cache(maxsize=1)
def emoji_table() -> dict[str, dict[str, str]]:
    """CLDR name -> {"emoji", "group", "subgroup"} for every fully-qualified emoji."""
    if not EMOJI_TEST.exists():
        raise WorldDataMissing(f"{EMOJI_TEST} not found: install the Debian package 'unicode-data'")
    table: dict[str, dict[str, str]] = {}
    group = subgroup = ""
    pattern = re.compile(r"^[0-9A-F ]+;\s*fully-qualified\s*#\s*(\S+)\s+E[\d.]+\s+(.+)$")
    for line in EMOJI_TEST.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif (match := pattern.match(line)) is not None:
            table[match.group(2)] = {"emoji": match.group(1), "group": group, "subgroup": subgroup}
    return table


def unicode_name(key: str, skin_tone: str | None = None) -> str:
    sub = subject(key)
    if skin_tone is None:
        return sub.cldr
    if skin_tone not in SKIN_TONES or not sub.tones:
        raise ValueError(f"skin_tone: {skin_tone!r} is not valid for subject {key!r} "
                         f"(tones {SKIN_TONES} exist only for {list(IDENTITY_SUBJECTS)})")
    return f"{sub.cldr}: {skin_tone} skin tone"


def emoji_of(key: str, skin_tone: str | None = None) -> str:
    name = unicode_name(key, skin_tone)
    entry = emoji_table().get(name)
    if entry is None:
        raise WorldDataMissing(f"emoji {name!r} not in {EMOJI_TEST}; the 'unicode-data' package is too old")
    return entry["emoji"]


def font_path(font: str) -> Path:
    if font not in FONTS:
        raise ValueError(f"font: unknown {font!r}; choose one of {list(FONTS)}")
    path = FONT_ROOT / FONTS[font][1]
    if not path.exists():
        raise WorldDataMissing(f"font {path} not found: install the Debian package '{FONTS[font][2]}'")
    return path


def _luminance(rgb: tuple[int, int, int]) -> float:
    lin = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def readable(text_color: str, background: str) -> bool:
    """Text/background pairs with a WCAG contrast ratio of at least 2.5."""
    a, b = sorted((_luminance(COLORS[text_color]), _luminance(COLORS[background])))
    return (b + 0.05) / (a + 0.05) >= 2.5


def _choice(field: str, value: Any, allowed: tuple) -> Any:
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {list(allowed)}")
    return value


def make_attrs(category: str, *, subject: str | None = None, background: str, position: str = "center",
               size: str = "large", count: int = 1, skin_tone: str | None = None, text: str | None = None,
               font: str | None = None, text_color: str | None = None, companion: dict | None = None,
               style: str | None = None, degradation: dict | None = None) -> dict[str, Any]:
    """Validated scene attrs with every derived key filled (names, emoji, RGB)."""
    _choice("category", category, T2I_CATEGORIES)
    attrs: dict[str, Any] = {
        "category": category, "subject": None, "subject_name": None, "unicode_name": None,
        "emoji": None, "skin_tone": None, "background": _choice("background", background, BACKGROUNDS),
        "background_rgb": list(COLORS[background]), "position": position,
        "size": _choice("size", size, SIZES), "count": _choice("count", count, COUNTS),
        "text": None, "font": None, "text_color": None, "text_color_rgb": None,
        "companion": None, "style": style and _choice("style", style, STYLES), "degradation": None,
    }
    if category == "text":
        _choice("position", position, TEXT_POSITIONS)
        _choice("count", count, (1,))
        if not text or not text.isascii():
            raise ValueError(f"text: expected a non-empty ASCII word, got {text!r}")
        _choice("text_color", text_color, TEXT_COLORS)
        font_path(font)
        attrs.update(text=text, font=font, text_color=text_color, text_color_rgb=list(COLORS[text_color]))
    else:
        _choice("position", position, POSITIONS)
        _choice(f"subject (for {category})", subject, tuple(s.key for s in SUBJECTS[category]))
        sub = _BY_KEY[subject]
        attrs.update(subject=subject, subject_name=sub.name, skin_tone=skin_tone,
                     unicode_name=unicode_name(subject, skin_tone), emoji=emoji_of(subject, skin_tone))
    if companion is not None:
        key = _choice("companion.subject", companion.get("subject"), tuple(c.key for c in COMPANIONS))
        pos = _choice("companion.position", companion.get("position"), tuple(OPPOSITE))
        attrs["companion"] = {"subject": key, "subject_name": _BY_KEY[key].name,
                              "emoji": emoji_of(key), "position": pos}
    if degradation is not None:
        _choice("degradation.kind", degradation.get("kind"), tuple(DEGRADATION_OF.values()))
        attrs["degradation"] = {"kind": degradation["kind"], "seed": int(degradation.get("seed", 0))}
    return attrs


# ---------------------------------------------------------------------------
# Layout (fractions of the image side) and rendering
# ---------------------------------------------------------------------------


def _place(position: str, w: float, h: float) -> tuple[float, float]:
    cx = {"left": MARGIN + w / 2, "right": 1 - MARGIN - w / 2}.get(position, 0.5)
    cy = {"top": MARGIN + h / 2, "bottom": 1 - MARGIN - h / 2}.get(position, 0.5)
    return cx, cy


def _subject_boxes(position: str, size: str, count: int) -> list[list[float]]:
    side = SIZE_FRACTION[size] * (PAIR_SCALE if count == 2 else 1.0)
    gap = 0.02
    vertical = count == 2 and position in ("left", "right")
    w = side if vertical or count == 1 else 2 * side + gap
    h = 2 * side + gap if vertical else side
    cx, cy = _place(position, w, h)
    x0, y0 = cx - w / 2, cy - h / 2
    if count == 1:
        return [[x0, y0, x0 + side, y0 + side]]
    if vertical:
        return [[x0, y0, x0 + side, y0 + side], [x0, y0 + side + gap, x0 + side, y0 + h]]
    return [[x0, y0, x0 + side, y0 + side], [x0 + side + gap, y0, x0 + w, y0 + side]]


def layout(attrs: dict, resolution: int) -> dict[str, Any]:
    """Boxes as fractions: ``{"subject": [...], "companion": box|None, "text": box|None}``."""
    boxes: dict[str, Any] = {"subject": [], "companion": None, "text": None}
    if attrs["category"] == "text":
        boxes["text"] = _text_layout(attrs, resolution)[3]
    else:
        boxes["subject"] = _subject_boxes(attrs["position"], attrs["size"], int(attrs["count"]))
    if attrs.get("companion"):
        boxes["companion"] = _subject_boxes(attrs["companion"]["position"], "small", 1)[0]
    return {k: _round(v) for k, v in boxes.items()}


def _round(value: Any) -> Any:
    if isinstance(value, list):
        return [_round(v) for v in value]
    return round(value, 4) if isinstance(value, float) else value


@functools.lru_cache(maxsize=256)
def _emoji_glyph(emoji: str) -> Image.Image:
    """The emoji rendered once at the font's native size, cropped to its alpha box."""
    if not EMOJI_FONT.exists():
        raise WorldDataMissing(f"{EMOJI_FONT} not found: install the Debian package 'fonts-noto-color-emoji'")
    font = _font(str(EMOJI_FONT), EMOJI_FONT_SIZE)
    canvas = Image.new("RGBA", (EMOJI_FONT_SIZE * 3, EMOJI_FONT_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), emoji, font=font, embedded_color=True)
    bbox = canvas.getbbox()
    if bbox is None:
        raise WorldDataMissing(f"emoji {emoji!r} rendered empty: the Noto Color Emoji font lacks it")
    return canvas.crop(bbox)


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def _paste_emoji(canvas: Image.Image, emoji: str, box: list[float]) -> None:
    res = canvas.width
    glyph = _emoji_glyph(emoji)
    bw, bh = (box[2] - box[0]) * res, (box[3] - box[1]) * res
    scale = min(bw / glyph.width, bh / glyph.height)
    w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
    sprite = glyph.resize((w, h), Image.LANCZOS)
    x = round(box[0] * res + (bw - w) / 2)
    y = round(box[1] * res + (bh - h) / 2)
    canvas.alpha_composite(sprite, (x, y))


@functools.lru_cache(maxsize=4096)
def _largest_fitting(text: str, path: str, size: str, resolution: int) -> int:
    max_w = (0.86 if size == "large" else 0.5) * resolution
    max_h = (0.36 if size == "large" else 0.2) * resolution
    best, lo, hi = 4, 4, resolution
    while lo <= hi:  # binary search on the font size whose ink box fits
        mid = (lo + hi) // 2
        x0, y0, x1, y1 = _font(path, mid).getbbox(text)
        if x1 - x0 <= max_w and y1 - y0 <= max_h:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def _fit_text(text: str, font: str, size: str, resolution: int) -> tuple[int, tuple[int, int, int, int]]:
    """Font size and ink box. One letter height per (font, size): the size that fits the
    widest vocabulary word, so replacing a word keeps the lettering (shrunk only if needed)."""
    path = str(font_path(font))
    widest = max(WORDS, key=lambda w: _font(path, 32).getlength(w))
    px = min(_largest_fitting(widest, path, size, resolution), _largest_fitting(text, path, size, resolution))
    return px, _font(path, px).getbbox(text)


def _text_layout(attrs: dict, resolution: int):
    px, ink = _fit_text(attrs["text"], attrs["font"], attrs["size"], resolution)
    w, h = (ink[2] - ink[0]) / resolution, (ink[3] - ink[1]) / resolution
    cx, cy = _place(attrs["position"], w, h)
    box = [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    origin = (round(box[0] * resolution - ink[0]), round(box[1] * resolution - ink[1]))
    return px, origin, ink, box


def render_t2i(attrs: dict, resolution: int = 64) -> Image.Image:
    """Render scene ``attrs`` (see the module docstring) as an RGB ``resolution``² image."""
    canvas = Image.new("RGBA", (resolution, resolution), tuple(attrs["background_rgb"]) + (255,))
    if attrs["category"] == "text":
        px, origin, _, _ = _text_layout(attrs, resolution)
        ImageDraw.Draw(canvas).text(origin, attrs["text"], font=_font(str(font_path(attrs["font"])), px),
                                    fill=tuple(attrs["text_color_rgb"]) + (255,))
    else:
        for box in _subject_boxes(attrs["position"], attrs["size"], int(attrs["count"])):
            _paste_emoji(canvas, attrs["emoji"], box)
    if attrs.get("companion"):
        comp = attrs["companion"]
        _paste_emoji(canvas, comp["emoji"], _subject_boxes(comp["position"], "small", 1)[0])
    image = canvas.convert("RGB")
    if attrs.get("degradation"):
        image = degrade(image, attrs["degradation"])
    if attrs.get("style"):
        image = apply_style(image, attrs["style"])
    return image


def degrade(image: Image.Image, degradation: dict) -> Image.Image:
    """Blur, add seeded noise, or lose resolution (enhancement-edit sources)."""
    kind, res = degradation["kind"], image.width
    if kind == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=0.035 * res))
    if kind == "noise":
        rng = np.random.default_rng(int(degradation.get("seed", 0)))
        noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 40, (res, res, 3))
        return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    if kind == "lowres":
        small = image.resize((max(2, res // 4), max(2, res // 4)), Image.BOX)
        return small.resize((res, res), Image.BILINEAR)
    raise ValueError(f"degradation.kind: unknown {kind!r}; choose blur, noise or lowres")


def apply_style(image: Image.Image, style: str) -> Image.Image:
    """The five style-transfer targets, as pure image functions."""
    if style == "grayscale":
        return ImageOps.grayscale(image).convert("RGB")
    if style == "sepia":
        return ImageOps.colorize(ImageOps.grayscale(image), (40, 26, 13), (255, 240, 192))
    if style == "outline":
        edges = ImageOps.grayscale(image).filter(ImageFilter.FIND_EDGES)
        lines = edges.point(lambda v: 0 if v > 24 else 255)  # dark lines on white
        return lines.convert("RGB")
    if style == "pixelate":
        res = image.width  # a 12 x 12 grid at 64 px: coarser than the "lowres" degradation
        return image.resize((max(2, res * 3 // 16),) * 2, Image.BOX).resize((res, res), Image.NEAREST)
    if style == "invert":
        return ImageOps.invert(image)
    raise ValueError(f"style: unknown {style!r}; choose one of {list(STYLES)}")


def scene_meta(attrs: dict, resolution: int) -> dict[str, Any]:
    """``attrs`` plus ``boxes``, ``resolution`` and ``world_version`` (a T2I record's meta)."""
    return {**attrs, "boxes": layout(attrs, resolution), "resolution": resolution,
            "world_version": WORLD_VERSION}


def render_edit_pair(meta: dict, resolution: int = 64) -> tuple[Image.Image, Image.Image]:
    """(source, target) images of an edit ``meta``."""
    return render_t2i(meta["source"], resolution), render_t2i(meta["target"], resolution)


def png_bytes(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


# The hold-out rule and the vocabulary fingerprint live in holdout.py; they are part of the
# world's API, so they are re-exported here.
from fewstep.bench.holdout import (  # noqa: E402, F401
    RESERVE_PERCENT,
    RESERVE_SALT,
    combo_key,
    edit_key,
    is_reserved,
    vocabulary,
    vocabulary_hash,
)
