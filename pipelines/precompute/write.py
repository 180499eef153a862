"""Publish one finished shard: Parquet bytes (fixed writer options), then its progress sidecar.

The shard is built in memory, hashed and published atomically; the sidecar (rows, checksum,
totals, shapes) is written after it, so a sidecar always names a complete shard. A shard
published without its sidecar (killed in between) is simply made again, to the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep import contract, storage
from fewstep.storage import StorageOptions
from pipelines.precompute.plan import EMPTY_PROMPT_NAME, EMPTY_SHARD, SHARDS_DIR, progress_uri, shard_name

STAGE = "precompute"


def shard_parquet_bytes(table: pa.Table, compression: str, row_group_rows: int) -> bytes:
    """Serialise a SHARD_SCHEMA table with options fixed here (same table -> same bytes)."""
    sink = io.BytesIO()
    pq.write_table(
        table, sink,
        compression=None if compression == "none" else compression,
        row_group_size=row_group_rows,
        use_dictionary=["task", "category", "dtype"],
        write_statistics=["id", "task", "category"],
        version="2.6",
        data_page_version="1.0",
    )
    return sink.getvalue()


def _shard_table(rows: pa.Table, dtype: str) -> pa.Table:
    columns = {}
    for field in contract.SHARD_SCHEMA:
        if field.name == "dtype":
            columns["dtype"] = pa.array([dtype] * rows.num_rows, pa.string())
        else:
            columns[field.name] = rows.column(field.name).cast(field.type)
    return pa.table(columns, schema=contract.SHARD_SCHEMA)


def write_shard(block: pa.Table, output: str, options: StorageOptions | None, input_uri: str,
                dtype: str, compression: str, row_group_rows: int, plan_id: str) -> pa.Table:
    """Write every shard in ``block`` (normally exactly one); return one summary row per shard."""
    summaries = []
    for index in sorted(set(block.column("_shard").to_pylist())):
        rows = block.filter(pc.equal(block.column("_shard"), index))
        expected = rows.column("_expected")[0].as_py()
        if rows.num_rows != expected:
            raise RuntimeError(
                f"shard {index}: {rows.num_rows} rows reached the writer, {expected} planned; a "
                "block was split between stages (raise DataContext.target_max_block_size)")
        rows = rows.sort_by("_pos")
        summaries.append(_write_one(index, rows, output, options, input_uri, dtype, compression,
                                    row_group_rows, plan_id))
    return pa.table({"summary": [json.dumps(s, sort_keys=True) for s in summaries]})


def _write_one(index: int, rows: pa.Table, output: str, options: StorageOptions | None, input_uri: str,
               dtype: str, compression: str, row_group_rows: int, plan_id: str) -> dict:
    rejected = rows.filter(rows.column("_reject").is_valid())
    kept = rows.filter(rows.column("_reject").is_null())
    rel = EMPTY_PROMPT_NAME if index == EMPTY_SHARD else f"{SHARDS_DIR}/{shard_name(index)}"
    name = EMPTY_PROMPT_NAME if index == EMPTY_SHARD else shard_name(index)
    if index == EMPTY_SHARD and kept.num_rows != 1:
        raise RuntimeError("the empty prompt could not be encoded: "
                           f"{rejected.column('_detail').to_pylist()}")
    if rejected.num_rows:
        # Rejects first, so a published shard always has its rejects beside it.
        reject_table = pa.table({
            "id": rejected.column("id"),
            "stage": pa.array([STAGE] * rejected.num_rows, pa.string()),
            "reason": rejected.column("_reject"),
            "detail": rejected.column("_detail"),
            "input": (rejected.column("_input") if "_input" in rejected.column_names
                      else pa.array([input_uri] * rejected.num_rows, pa.string())),
        }, schema=contract.REJECT_SCHEMA)
        storage.write_bytes_atomic(storage.join(output, "rejects", f"precompute-{name}"),
                                   shard_parquet_bytes(reject_table, compression, row_group_rows), options)
    data = shard_parquet_bytes(_shard_table(kept, dtype), compression, row_group_rows)
    storage.write_bytes_atomic(storage.join(output, rel), data, options)
    by_task: Counter = Counter()
    by_category: Counter = Counter()
    for task, category in zip(kept.column("task").to_pylist(), kept.column("category").to_pylist()):
        by_task[task] += 1
        by_category[f"{task}/{category}"] += 1
    lengths = [s[0] for s in kept.column("prompt_embeds_shape").to_pylist()]
    dims = {s[1] for s in kept.column("prompt_embeds_shape").to_pylist()}
    summary = {
        "plan_id": plan_id,
        "index": index,
        "path": rel,
        "rows": kept.num_rows,
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "rejects": rejected.num_rows,
        "reject_reasons": dict(Counter(rejected.column("_reject").to_pylist())),
        "by_task": dict(by_task),
        "by_category": dict(by_category),
        "text_embed_dims": sorted(dims),
        "max_prompt_tokens": int(np.max(lengths)) if lengths else 0,
        "latent_shapes": _distinct(kept, "latents_shape"),
        "source_latent_shapes": _distinct(kept, "source_latents_shape"),
    }
    storage.write_json_atomic(progress_uri(output, name), summary, options)
    return summary


def _distinct(rows: pa.Table, column: str) -> list[list[int]]:
    return [list(s) for s in sorted({tuple(s) for s in rows.column(column).to_pylist() if s is not None})]
