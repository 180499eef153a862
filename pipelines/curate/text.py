"""Prompt checks: invalid text, empty / short / long prompts, banned words, and the prompt key.

Runs twice around captioning: before it, a T2I record with an image and no usable prompt is
marked for captioning instead of rejected (when a captioner is configured); after it, every row
must hold a usable prompt, and a captioned row that still does not is ``no_usable_prompt``.
"""

from __future__ import annotations

import re
import unicodedata

from pipelines.curate.config import CaptionConfig, TextFilterConfig
from pipelines.curate.records import reject

STAGE = "text"
_ALLOWED_CONTROLS = {"\t", "\n", "\r"}


def invalid_text(text: str) -> str | None:
    """Why ``text`` is not clean text, or None."""
    for index, char in enumerate(text):
        category = unicodedata.category(char)
        if (category == "Cc" and char not in _ALLOWED_CONTROLS) or category == "Cs":
            return f"control character U+{ord(char):04X} at position {index}"
    return None


def _usable(prompt: str | None, cfg: TextFilterConfig) -> tuple[str, str] | None:
    """(reason, detail) when ``prompt`` is not usable as a prompt, else None."""
    if prompt is None:
        return "missing_field", "prompt: required, absent"
    stripped = prompt.strip()
    if not stripped:
        return "prompt_empty", "empty after stripping whitespace"
    if len(stripped) < cfg.min_chars:
        return "prompt_too_short", f"{len(stripped)} chars < {cfg.min_chars}"
    if len(stripped) > cfg.max_chars:
        return "prompt_too_long", f"{len(stripped)} chars > {cfg.max_chars}"
    return None


def banned_pattern(words: list[str]) -> re.Pattern | None:
    words = [w.strip() for w in words if w.strip()]
    if not words:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in sorted(words)) + r")\b", re.IGNORECASE)


def check_before_caption(row: dict, cfg: TextFilterConfig, captioning: CaptionConfig) -> dict:
    prompt = row["prompt"]
    if prompt is not None and (why := invalid_text(prompt)):
        return reject(row, STAGE, "prompt_invalid_text", why)
    can_caption = captioning.captioner != "none" and row["task"] == "t2i" and row["image"] is not None
    if can_caption and (captioning.mode == "always" or _usable(prompt, cfg) is not None):
        row["needs_caption"] = True
    return row


def check_after_caption(row: dict, cfg: TextFilterConfig, banned: re.Pattern | None) -> dict:
    prompt = row["prompt"]
    problem = _usable(prompt, cfg)
    if problem is not None:
        reason, detail = problem
        if row["caption_origin"] == "captioned" or row["needs_caption"]:
            return reject(row, STAGE, "no_usable_prompt", f"after captioning: {reason} ({detail})")
        if reason == "missing_field" and row["task"] == "edit":
            detail = "instruction: required, absent"
        return reject(row, STAGE, reason, detail)
    if prompt is not None and (why := invalid_text(prompt)):
        return reject(row, STAGE, "prompt_invalid_text" if row["caption_origin"] == "given" else "no_usable_prompt",
                      why)
    if banned is not None and (match := banned.search(prompt)):
        return reject(row, STAGE, "banned_word", f"contains {match.group(0)!r}")
    row["prompt"] = prompt.strip()
    return row


_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)
_SPACE = re.compile(r"\s+")


def prompt_key(prompt: str) -> str:
    """Near-duplicate key: NFKC, case-folded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", prompt).casefold()
    text = _PUNCT.sub(" ", text)
    return _SPACE.sub(" ", text).strip()
