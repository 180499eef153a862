"""The per-row operators as Ray Data ``map_batches`` functions (pyarrow blocks of working rows).

Each operator only looks at rows that are still kept and sets its own reject reason; the model
operators (NSFW, captioning, tagging) are actor classes elsewhere. ``apply_decisions`` applies
the driver's global decisions (duplicates, rebalancing) and expands repeats.
"""

from __future__ import annotations

import pyarrow as pa

from pipelines.curate.config import CaptionConfig, ImageFilterConfig, TextFilterConfig
from pipelines.curate.decode import check_images
from pipelines.curate.records import WORK_SCHEMA, from_rows, is_kept, to_rows
from pipelines.curate.text import banned_pattern, check_after_caption, check_before_caption

OUT_SCHEMA = pa.schema(list(WORK_SCHEMA) + [pa.field("origin_id", pa.string()), pa.field("position", pa.int64()),
                                            pa.field("part", pa.int64())])


def _map_kept(table: pa.Table, fn) -> pa.Table:
    return from_rows(fn(row) if is_kept(row) else row for row in to_rows(table))


def images_op(table: pa.Table, limits: ImageFilterConfig, identical_pair: bool) -> pa.Table:
    """Image checks (empty, bomb, undecodable, truncated, size, aspect, identical edit pair) + normalise."""
    return _map_kept(table, lambda row: check_images(row, limits, identical_pair))


def text_before_caption_op(table: pa.Table, text: TextFilterConfig, captioning: CaptionConfig) -> pa.Table:
    """Invalid text; marks T2I rows with an image but no usable prompt for captioning."""
    return _map_kept(table, lambda row: check_before_caption(row, text, captioning))


def text_after_caption_op(table: pa.Table, text: TextFilterConfig) -> pa.Table:
    """Empty / short / long prompts, banned words (on the final prompt, captioned or given)."""
    banned = banned_pattern(text.banned_words)
    return _map_kept(table, lambda row: check_after_caption(row, text, banned))


_DECISIONS: dict[str, dict] = {}


def _decisions(ref) -> dict:
    if isinstance(ref, dict):  # a plan passed directly (tests, single process)
        return ref
    import ray

    key = ref.hex()
    if key not in _DECISIONS:
        _DECISIONS.clear()
        _DECISIONS[key] = ray.get(ref)
    return _DECISIONS[key]


def apply_decisions(table: pa.Table, decisions_ref: list, rows_per_part: int) -> pa.Table:
    """Kept rows selected by the rebalancer -> output rows (repeats expanded); all others dropped.

    ``decisions``: order -> (copies, first_position) for the rows written. Rejected rows are not
    needed here: the driver writes rejects from the narrow projection it already holds.
    """
    decisions = _decisions(decisions_ref[0])
    out = []
    for row in to_rows(table):
        chosen = decisions.get(row["order"]) if is_kept(row) else None
        if chosen is None:
            continue
        copies, first = chosen
        for k in range(copies):
            copy = dict(row)
            copy["origin_id"] = row["id"]
            if k:
                copy["id"] = f"{row['id']}#rep{k}"
            copy["position"] = first + k
            copy["part"] = (first + k) // rows_per_part
            out.append(copy)
    return pa.Table.from_pylist(out, schema=OUT_SCHEMA) if out else OUT_SCHEMA.empty_table()
