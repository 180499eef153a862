"""Publish the curated set: Parquet parts (CURATED_SCHEMA), rejects, composition, stats, manifest last.

Each output row has a global ``position`` (input order, then repeat index), and part ``k`` holds
positions ``[k * rows_per_part, (k + 1) * rows_per_part)``. Parts are written by Ray tasks (one
group per part), each file atomically, so the bytes of every part depend only on the data and the
config: a local run and an S3 run publish identical files.
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import storage
from fewstep.contract import CURATED_SCHEMA, REJECT_SCHEMA, ShardEntry, validate_curated
from fewstep.storage import StorageOptions

CURATED_DIR = "curated"
REJECTS_DIR = "rejects"
STATS_DIR = "stats"


def curated_record(row: dict) -> dict:
    meta = json.loads(row["meta"]) if row["meta"] else {}
    if not isinstance(meta, dict):
        meta = {"raw_meta": meta}
    meta["curate"] = {"category_origin": row["category_origin"], "input": row["input"]}
    record = {
        "id": row["id"],
        "origin_id": row["origin_id"],
        "task": row["task"],
        "prompt": row["prompt"],
        "category": row["category"],
        "image": row["image"],
        "source_image": row["source_image"],
        "source": row["source"],
        "caption_origin": row["caption_origin"],
        "meta": json.dumps(meta, sort_keys=True),
    }
    validate_curated(record)
    return record


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    # Fixed writer options: same rows -> same bytes.
    pq.write_table(table, sink, compression="zstd", write_statistics=False, store_schema=True)
    return sink.getvalue()


def write_part(group: pa.Table, out_uri: str, options: StorageOptions | None, rows_per_part: int) -> pa.Table:
    """``map_groups`` function: one part file from the rows of one ``part`` group."""
    rows = sorted(group.to_pylist(), key=lambda r: r["position"])
    part = rows[0]["position"] // rows_per_part
    table = pa.Table.from_pylist([curated_record(r) for r in rows], schema=CURATED_SCHEMA)
    data = parquet_bytes(table)
    name = f"part-{part:05d}.parquet"
    storage.write_bytes_atomic(storage.join(out_uri, CURATED_DIR, name), data, options)
    return pa.table({"path": [f"{CURATED_DIR}/{name}"], "rows": [len(rows)],
                     "sha256": [hashlib.sha256(data).hexdigest()], "bytes": [len(data)]})


def write_rejects(rows: list[dict], out_uri: str, options: StorageOptions | None,
                  rows_per_part: int = 100_000) -> list[str]:
    """Reject rows (id, stage, reason, detail, input) in input order."""
    rows = sorted(rows, key=lambda r: r["order"])
    paths = []
    for part, start in enumerate(range(0, max(len(rows), 1), rows_per_part)):
        chunk = [{k: r[k] for k in REJECT_SCHEMA.names} for r in rows[start:start + rows_per_part]]
        name = f"{REJECTS_DIR}/part-{part:05d}.parquet"
        storage.write_bytes_atomic(storage.join(out_uri, name),
                                   parquet_bytes(pa.Table.from_pylist(chunk, schema=REJECT_SCHEMA)), options)
        paths.append(name)
    return paths


def shard_entries(table_rows: list[dict]) -> list[ShardEntry]:
    return [ShardEntry(r["path"], int(r["rows"]), r["sha256"], int(r["bytes"])) for r in table_rows]


def clear_outputs(out_uri: str, options: StorageOptions | None) -> None:
    """Remove what an earlier run left (manifest first, so no reader trusts a half-replaced set)."""
    from fewstep.contract import COMPOSITION_NAME, MANIFEST_NAME

    storage.delete(storage.join(out_uri, MANIFEST_NAME), options)
    for sub in (CURATED_DIR, REJECTS_DIR, STATS_DIR):
        storage.delete(storage.join(out_uri, sub), options, recursive=True)
    storage.delete(storage.join(out_uri, COMPOSITION_NAME), options)


def write_text(out_uri: str, relpath: str, text: str, options: StorageOptions | None) -> None:
    storage.write_bytes_atomic(storage.join(out_uri, relpath), text.encode("utf-8"), options)
