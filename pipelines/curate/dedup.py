"""Global de-duplication: ids, exact / near-duplicate images, exact / near-duplicate prompts.

Needs a view of the whole corpus, so it is one pass on the driver over a narrow projection of
the rows that survived the per-row filters (order, id, task, prompt, hashes; no pixels), walked
in input order: the first occurrence is kept, deterministically, whatever the cluster did. At
this project's scale (up to a few million rows) that is a few seconds and ~100 bytes per row;
a larger deployment would shard the same logic by hash prefix (a groupby on the key columns).

Keys: T2I images by their own hashes; an edit by its (source, target) pair, and its prompt
together with its source image (the same instruction on different images is not a duplicate).
Near-duplicate images: 64-bit perceptual hashes within ``near_image_distance`` bits, found with a
multi-index (split into distance + 1 bands: by pigeonhole two hashes that close share a band),
then confirmed on 8x8 colour thumbnails (every cell within ``near_image_max_cell_diff``): the
grayscale hash alone calls two different small subjects on flat backgrounds alike.
Near-duplicate prompts: equal after case-folding, dropping punctuation and collapsing whitespace.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pipelines.curate.config import DedupConfig
from pipelines.curate.decode import hamming, thumb_distance
from pipelines.curate.text import prompt_key

STAGE = "dedup"


@dataclass(frozen=True)
class Decision:
    stage: str
    reason: str
    detail: str


class NearIndex:
    """Hashes within ``distance`` bits (multi-index hashing over ``distance + 1`` bands) whose
    thumbnails also agree within ``max_cell_diff``."""

    def __init__(self, distance: int, max_cell_diff: int = 255):
        self.distance = distance
        self.max_cell_diff = max_cell_diff
        bands = distance + 1
        width = 64 // bands
        self.bands = [(i * width, 64 if i == bands - 1 else (i + 1) * width) for i in range(bands)]
        self.tables: list[dict[int, list[tuple[tuple[int, ...], tuple[bytes, ...], str]]]] = [
            defaultdict(list) for _ in self.bands]

    def _band_keys(self, value: int) -> list[int]:
        unsigned = value & 0xFFFFFFFFFFFFFFFF
        return [(unsigned >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.bands]

    def find(self, hashes: tuple[int, ...], thumbs: tuple[bytes, ...]) -> str | None:
        """The owner of a stored entry whose every image is near, or None."""
        for table, key in zip(self.tables, self._band_keys(hashes[0])):
            for stored, stored_thumbs, owner in table.get(key, ()):
                if all(hamming(a, b) <= self.distance for a, b in zip(stored, hashes)) and all(
                        thumb_distance(a, b) <= self.max_cell_diff for a, b in zip(stored_thumbs, thumbs)):
                    return owner
        return None

    def add(self, hashes: tuple[int, ...], thumbs: tuple[bytes, ...], owner: str) -> None:
        for table, key in zip(self.tables, self._band_keys(hashes[0])):
            table[key].append((hashes, thumbs, owner))


def find_duplicates(rows: list[dict], cfg: DedupConfig) -> dict[int, Decision]:
    """``rows`` (kept rows, any order) -> {order: Decision} for the rows to reject."""
    decisions: dict[int, Decision] = {}
    seen_ids: dict[str, str] = {}
    exact_images: dict[tuple, str] = {}
    near_images: dict[str, NearIndex] = defaultdict(
        lambda: NearIndex(cfg.near_image_distance, cfg.near_image_max_cell_diff))
    exact_prompts: dict[tuple, str] = {}
    near_prompts: dict[tuple, str] = {}
    for row in sorted(rows, key=lambda r: r["order"]):
        rid, task = row["id"], row["task"]
        label = f"{rid!r} ({row['input']})" if row.get("input") else repr(rid)
        if task == "edit":
            image_key = (row["source_sha"], row["image_sha"])
            with_target = row["image_phash"] is not None
            phashes = (row["source_phash"],) + ((row["image_phash"],) if with_target else ())
            thumbs = (row["source_thumb"],) + ((row["image_thumb"],) if with_target else ())
            has_image = row["source_sha"] is not None
            prompt_scope = (task, row["source_sha"])
        else:
            image_key = (row["image_sha"],)
            phashes = (row["image_phash"],)
            thumbs = (row["image_thumb"],)
            has_image = row["image_sha"] is not None
            prompt_scope = (task,)
        near_key = f"{task}:{len(phashes)}"
        prompt = row["prompt"] or ""
        decision = None
        if cfg.ids and rid in seen_ids:
            decision = Decision(STAGE, "duplicate_id", f"id seen before in {seen_ids[rid]}")
        elif cfg.exact_image and has_image and (task, image_key) in exact_images:
            decision = Decision(STAGE, "duplicate_image", f"same pixels as {exact_images[(task, image_key)]}")
        elif cfg.near_image and has_image and (owner := near_images[near_key].find(phashes, thumbs)) is not None:
            decision = Decision(STAGE, "near_duplicate_image",
                                f"perceptual hash within {cfg.near_image_distance} bits of {owner}")
        elif cfg.exact_prompt and (prompt_scope, prompt) in exact_prompts:
            decision = Decision(STAGE, "duplicate_prompt", f"same prompt as {exact_prompts[(prompt_scope, prompt)]}")
        elif cfg.near_prompt and (prompt_scope, prompt_key(prompt)) in near_prompts:
            decision = Decision(STAGE, "near_duplicate_prompt",
                                f"prompt nearly identical to {near_prompts[(prompt_scope, prompt_key(prompt))]}")
        if decision is not None:
            decisions[row["order"]] = decision
            continue
        seen_ids.setdefault(rid, label)
        if has_image:
            exact_images.setdefault((task, image_key), label)
            near_images[near_key].add(phashes, thumbs, label)
        exact_prompts.setdefault((prompt_scope, prompt), label)
        near_prompts.setdefault((prompt_scope, prompt_key(prompt)), label)
    return decisions
