"""The working row every curate operator sees: kept and rejected rows flow together.

A row is rejected once its ``reason`` is set (with ``stage`` and ``detail``); later operators pass
it through untouched and its image bytes are dropped, so rejects cost almost nothing downstream.
``order`` is the input position (input, file, row) packed into one integer: every global
decision (duplicate ids, duplicate images and prompts, sampling) walks rows in this order, so
"the first occurrence is kept" means the same record on every run and on every cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa

WORK_SCHEMA = pa.schema(
    [
        pa.field("order", pa.int64()),
        pa.field("id", pa.string()),
        pa.field("task", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("category", pa.string()),
        pa.field("category_origin", pa.string()),  # given | tagged
        pa.field("image", pa.binary()),  # T2I image or edit target
        pa.field("source_image", pa.binary()),  # edit source
        pa.field("source", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("input", pa.string()),  # file URI and row/line/member, for rejects
        pa.field("caption_origin", pa.string()),  # given | captioned
        pa.field("needs_caption", pa.bool_()),
        pa.field("image_sha", pa.string()),  # sha256 of decoded pixels (exact duplicate key)
        pa.field("image_phash", pa.int64()),  # 64-bit perceptual hash (near duplicates)
        pa.field("image_thumb", pa.binary()),  # 8x8 RGB thumbnail: verifies near-duplicate candidates
        pa.field("source_sha", pa.string()),
        pa.field("source_phash", pa.int64()),
        pa.field("source_thumb", pa.binary()),
        pa.field("stage", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("detail", pa.string()),
    ]
)

NAMES = WORK_SCHEMA.names

# Packing of the order key: 11 bits of input index, 20 of file index, 32 of row index.
_INPUT_SHIFT = 52
_FILE_SHIFT = 32


def order_key(input_index: int, file_index: int, row_index: int) -> int:
    if input_index >= 1 << 11 or file_index >= 1 << 20 or row_index >= 1 << 32:
        raise ValueError(f"too many inputs/files/rows for the order key: {input_index}/{file_index}/{row_index}")
    return (input_index << _INPUT_SHIFT) | (file_index << _FILE_SHIFT) | row_index


def new_row(**values) -> dict:
    row = dict.fromkeys(NAMES)
    row.update(values)
    unknown = set(values) - set(NAMES)
    if unknown:
        raise KeyError(f"unknown working columns {sorted(unknown)}")
    return row


def reject(row: dict, stage: str, reason: str, detail: str | None = None) -> dict:
    """Mark ``row`` rejected (first reason wins) and drop its pixels."""
    if row.get("reason") is None:
        row["stage"], row["reason"], row["detail"] = stage, reason, detail
        row["image"] = None
        row["source_image"] = None
    return row


def is_kept(row: dict) -> bool:
    return row.get("reason") is None


def to_rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()


def from_rows(rows: Iterable[dict]) -> pa.Table:
    rows = list(rows)
    return pa.Table.from_pylist(rows, schema=WORK_SCHEMA) if rows else WORK_SCHEMA.empty_table()


def row_op(fn):
    """Turn ``fn(row) -> row`` into a pyarrow ``map_batches`` function over kept rows only."""

    def apply(table: pa.Table) -> pa.Table:
        out = []
        for row in to_rows(table):
            out.append(fn(row) if is_kept(row) else row)
        return from_rows(out)

    apply.__name__ = getattr(fn, "__name__", "row_op")
    return apply
