"""Hold-out rule: which attribute combinations are reserved for the mini benches, and the
vocabulary fingerprint the corpus, benches and judges record.

``is_reserved(combo_key(attrs))`` (T2I) and ``is_reserved(edit_key(meta))`` (edits) select the
combinations kept for the mini benches; ``fewstep corpus build`` never emits them. The keys hold
every field a prompt or an instruction states, so a reserved case never shares its text with a
training record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from typing import Any

from fewstep.bench.vocabulary import (
    BACKGROUNDS,
    COLORS,
    COMPANIONS,
    COUNTS,
    EDIT_CATEGORIES,
    EDIT_OPERATIONS,
    FONTS,
    POSITIONS,
    SIZES,
    SKIN_TONES,
    STYLES,
    SUBJECTS,
    TEXT_COLORS,
    TEXT_POSITIONS,
    WORDS,
    WORLD_VERSION,
)

RESERVE_SALT = "fewstep-bench-holdout-v1"
RESERVE_PERCENT = 10


def combo_key(attrs: dict) -> tuple:
    """Every attribute a T2I prompt states; two scenes with the same key share a prompt."""
    return ("t2i", attrs["category"], attrs.get("subject"), attrs.get("skin_tone"), attrs["background"],
            attrs["position"], attrs["size"], int(attrs["count"]), attrs.get("text"), attrs.get("font"),
            attrs.get("text_color"))


def edit_key(meta: dict) -> tuple:
    """Every field an edit instruction states, so reserved keys never share an instruction."""
    src, tgt, op = meta["source"], meta["target"], meta["operation"]
    cat = meta["edit_category"]
    if cat == "scene":
        fields: tuple = (src["subject"], src["background"], tgt["background"])
    elif cat in ("enhancement", "style"):
        fields = (src["subject"], src["background"])
    elif cat == "object":
        a, b = src.get("companion") or {}, tgt.get("companion") or {}
        fields = (src["subject"], a.get("subject"), b.get("subject"), a.get("position") or b.get("position"))
    elif cat == "text":
        fields = (src["text"], tgt["text"])
    elif cat == "identity":
        fields = (src["subject"], tgt["subject"], src["skin_tone"], tgt["skin_tone"])
    else:
        raise ValueError(f"edit_category: unknown {cat!r}; choose one of {list(EDIT_CATEGORIES)}")
    return ("edit", cat, op, *fields)


def is_reserved(key: tuple) -> bool:
    """True for the ~10% of combination keys held out for the mini benches."""
    digest = hashlib.sha256(f"{RESERVE_SALT}|{json.dumps(list(key))}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < RESERVE_PERCENT


def vocabulary() -> dict[str, Any]:
    """The whole vocabulary as JSON (for the corpus summary and the judges)."""
    return {
        "world_version": WORLD_VERSION,
        "subjects": {cat: [asdict(s) for s in subs] for cat, subs in SUBJECTS.items()},
        "companions": [asdict(s) for s in COMPANIONS], "words": list(WORDS),
        "fonts": {k: {"name": v[0], "file": v[1]} for k, v in FONTS.items()},
        "colors": {k: list(v) for k, v in COLORS.items()}, "backgrounds": list(BACKGROUNDS),
        "text_colors": list(TEXT_COLORS), "positions": list(POSITIONS), "text_positions": list(TEXT_POSITIONS),
        "sizes": list(SIZES), "counts": list(COUNTS), "skin_tones": list(SKIN_TONES),
        "styles": list(STYLES), "edit_operations": {k: list(v) for k, v in EDIT_OPERATIONS.items()},
        "reserve": {"salt": RESERVE_SALT, "percent": RESERVE_PERCENT},
    }


def vocabulary_hash() -> str:
    text = json.dumps(vocabulary(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
