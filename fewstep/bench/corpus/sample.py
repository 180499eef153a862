"""Draw scene attributes and edit metas from the world's vocabulary with a numpy Generator.

Pure functions of the generator state: the same seed gives the same draws. Holding out
bench combinations is the caller's job (``world.is_reserved``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fewstep.bench import world
from fewstep.bench.corpus import phrasing

_READABLE = tuple((t, b) for t in world.TEXT_COLORS for b in world.BACKGROUNDS if world.readable(t, b))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(category: str, rng: np.random.Generator, **fixed: Any) -> dict[str, Any]:
    """Random scene attrs for a T2I ``category``; ``fixed`` overrides any make_attrs field."""
    if category == "text":
        text_color, background = _pick(rng, _READABLE)
        fields = {"text": _pick(rng, world.WORDS), "font": _pick(rng, tuple(world.FONTS)),
                  "text_color": text_color, "background": background,
                  "position": _pick(rng, world.TEXT_POSITIONS), "size": _pick(rng, world.SIZES)}
    else:
        fields = {"subject": _pick(rng, world.SUBJECTS[category]).key,
                  "background": _pick(rng, world.BACKGROUNDS), "position": _pick(rng, world.POSITIONS),
                  "size": _pick(rng, world.SIZES), "count": 2 if rng.random() < 0.3 else 1}
    fields.update(fixed)
    return world.make_attrs(category, **fields)


def _emoji_category(rng: np.random.Generator) -> str:
    return "portrait" if rng.random() < 0.5 else "landscape"


def _other(rng: np.random.Generator, options, current):
    return _pick(rng, tuple(o for o in options if o != current))


def _union(boxes: list) -> list[float] | None:
    boxes = [b for b in boxes if b]
    if not boxes:
        return None
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes),
            max(b[3] for b in boxes)]


def sample_edit(edit_category: str, rng: np.random.Generator, resolution: int) -> dict[str, Any]:
    """A random edit meta (see ``world`` docstring) of ``edit_category``, without ``template``."""
    op = _pick(rng, world.EDIT_OPERATIONS[edit_category])
    if edit_category == "scene":
        src = sample_scene(_emoji_category(rng), rng)
        tgt = {**src, "background": _other(rng, world.BACKGROUNDS, src["background"])}
        tgt["background_rgb"] = list(world.COLORS[tgt["background"]])
    elif edit_category == "enhancement":
        tgt = sample_scene(_emoji_category(rng), rng)
        kind = world.DEGRADATION_OF[op]
        src = {**tgt, "degradation": {"kind": kind, "seed": int(rng.integers(2**31))}}
    elif edit_category == "object":
        category = _emoji_category(rng)
        position = _pick(rng, tuple(world.OPPOSITE))
        src = sample_scene(category, rng, position=position, size="small", count=1)
        comp = {"subject": _pick(rng, world.COMPANIONS).key, "position": world.OPPOSITE[position]}
        with_comp = world.make_attrs(category, **_fields(src), companion=comp)
        if op == "add":
            tgt = with_comp
        elif op == "remove":
            src, tgt = with_comp, src
        else:
            other = _other(rng, tuple(c.key for c in world.COMPANIONS), comp["subject"])
            src, tgt = with_comp, world.make_attrs(category, **_fields(src),
                                                   companion={**comp, "subject": other})
    elif edit_category == "text":
        src = sample_scene("text", rng)
        tgt = world.make_attrs("text", **{**_fields(src), "text": _other(rng, world.WORDS, src["text"])})
    elif edit_category == "identity":
        pool = world.IDENTITY_SUBJECTS if op == "skin_tone" else world.GENDER_SUBJECTS
        tones = (None, *world.SKIN_TONES)
        src = sample_scene("portrait", rng, subject=_pick(rng, pool), skin_tone=_pick(rng, tones))
        if op == "skin_tone":
            tgt = world.make_attrs("portrait", **{**_fields(src), "skin_tone": _other(rng, tones,
                                                                                      src["skin_tone"])})
        else:
            swap = world.subject(src["subject"]).swap
            tgt = world.make_attrs("portrait", **{**_fields(src), "subject": swap})
    elif edit_category == "style":
        src = sample_scene(_emoji_category(rng), rng)
        tgt = {**src, "style": op}
    else:
        raise ValueError(f"edit_category: unknown {edit_category!r}; choose one of {world.EDIT_CATEGORIES}")
    return edit_meta(edit_category, op, src, tgt, resolution)


def _fields(attrs: dict) -> dict[str, Any]:
    """The make_attrs keyword arguments that rebuild ``attrs``."""
    keys = ("background", "position", "size", "count", "skin_tone", "style")
    out = {k: attrs[k] for k in keys}
    if attrs["category"] == "text":
        out.update(text=attrs["text"], font=attrs["font"], text_color=attrs["text_color"])
        out.pop("skin_tone")
    else:
        out["subject"] = attrs["subject"]
    return out


def edit_meta(edit_category: str, operation: str, src: dict, tgt: dict, resolution: int) -> dict[str, Any]:
    """Assemble an edit meta with boxes and the edited region."""
    source, target = world.scene_meta(src, resolution), world.scene_meta(tgt, resolution)
    sb, tb = source["boxes"], target["boxes"]
    region = None
    if edit_category == "object":
        region = _union([sb["companion"], tb["companion"]])
    elif edit_category == "text":
        region = _union([sb["text"], tb["text"]])
    elif edit_category == "identity":
        region = _union(sb["subject"] + tb["subject"])
    return {"edit_category": edit_category, "operation": operation, "source": source, "target": target,
            "region": region, "resolution": resolution, "world_version": world.WORLD_VERSION}


def draw_t2i(category: str, rng: np.random.Generator, resolution: int) -> tuple[dict, str]:
    """(meta, prompt) for one T2I record; ``meta["template"]`` records the phrasing."""
    attrs = sample_scene(category, rng)
    template = int(rng.integers(phrasing.t2i_templates(category)))
    meta = {**world.scene_meta(attrs, resolution), "template": template}
    return meta, phrasing.t2i_prompt(attrs, template)


def draw_edit(edit_category: str, rng: np.random.Generator, resolution: int) -> tuple[dict, str]:
    """(meta, instruction) for one edit record."""
    meta = sample_edit(edit_category, rng, resolution)
    template = int(rng.integers(len(phrasing.edit_instructions(meta))))
    meta["template"] = template
    return meta, phrasing.edit_instruction(meta, template)
