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
    needed here: the driver writes rejects from the narrow projection it already holds. Columnar
    (one ``take`` of the block): the rows carry image bytes, and per-row dicts cost more than the
    rest of the write.
    """
    import numpy as np
    import pyarrow.compute as pc

    decisions = _decisions(decisions_ref[0])
    orders = table.column("order").to_numpy(zero_copy_only=False)
    kept = pc.is_null(table.column("reason")).to_numpy(zero_copy_only=False)
    copies = np.zeros(len(orders), dtype=np.int64)
    first = np.zeros(len(orders), dtype=np.int64)
    for i, (order, is_row_kept) in enumerate(zip(orders.tolist(), kept.tolist())):
        chosen = decisions.get(order) if is_row_kept else None
        if chosen is not None:
            copies[i], first[i] = chosen
    if not copies.any():
        return OUT_SCHEMA.empty_table()
    index = np.repeat(np.arange(len(orders)), copies)
    repeat = np.arange(len(index)) - np.repeat(np.cumsum(copies) - copies, copies)  # 0, 1, .. per row
    position = first[index] + repeat
    out = table.take(pa.array(index))
    ids = out.column("id").to_pylist()
    new_ids = [row_id if k == 0 else f"{row_id}#rep{k}" for row_id, k in zip(ids, repeat.tolist())]
    out = out.set_column(out.schema.get_field_index("id"), "id", pa.array(new_ids, pa.string()))
    out = out.append_column("origin_id", pa.array(ids, pa.string()))
    out = out.append_column("position", pa.array(position, pa.int64()))
    out = out.append_column("part", pa.array(position // rows_per_part, pa.int64()))
    return out.select(OUT_SCHEMA.names).cast(OUT_SCHEMA)
