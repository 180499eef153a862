"""Build a raw corpus: plan records (bench hold-out aware), render them, publish Parquet.

Layout under ``out`` (any storage URI):
``t2i/part-*.parquet`` (RAW_T2I_SCHEMA), ``edit/part-*.parquet`` (RAW_EDIT_SCHEMA), and
``corpus.json`` written last (counts by category, seed, preset, resolution, vocabulary
hash, one entry per part with rows and sha256; manifest-shaped, kind ``raw_corpus``).

Determinism: planning is sequential with one numpy Generator per (seed, task, category),
and rendering is a pure function of the planned meta, so a seed gives byte-identical parts
whatever the number of workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from fewstep import contract, storage
from fewstep.bench import world
from fewstep.bench.corpus import sample

log = logging.getLogger(__name__)

CORPUS_SUMMARY = "corpus.json"


@dataclass(frozen=True)
class Preset:
    t2i_per_category: int
    edit_per_category: int
    rows_per_part: int


PRESETS: dict[str, Preset] = {
    "small": Preset(t2i_per_category=100, edit_per_category=50, rows_per_part=200),
    "standard": Preset(t2i_per_category=2000, edit_per_category=500, rows_per_part=1000),
}


class CorpusError(ValueError):
    """A corpus build that cannot proceed; the message says what to change."""


@dataclass(frozen=True)
class PlannedRecord:
    id: str
    task: str  # "t2i" | "edit"
    category: str
    text: str  # prompt or instruction
    meta: dict[str, Any]


def _edit_identity(meta: dict) -> str:
    """Two edits with this equal would render the same pair (noise seeds aside)."""
    def strip(attrs: dict) -> dict:
        deg = attrs.get("degradation")
        return {**attrs, "degradation": deg and deg["kind"]}
    return json.dumps([meta["operation"], strip(meta["source"]), strip(meta["target"])], sort_keys=True)


def plan(task: str, category: str, count: int, seed: int, resolution: int,
         exclude_texts: frozenset[str] = frozenset(), max_tries_per_record: int = 200) -> list[PlannedRecord]:
    """``count`` distinct, non-reserved records of one category, in a deterministic order."""
    categories = world.T2I_CATEGORIES if task == "t2i" else world.EDIT_CATEGORIES
    if category not in categories:
        raise CorpusError(f"category: {category!r} is not one of {list(categories)} for task {task!r}")
    rng = np.random.default_rng([seed, 0 if task == "t2i" else 1, categories.index(category)])
    records: list[PlannedRecord] = []
    seen: set = set()
    tries = 0
    while len(records) < count:
        tries += 1
        if tries > count * max_tries_per_record:
            raise CorpusError(f"only {len(records)} distinct {task}/{category} combinations found for the "
                              f"{count} asked; lower the preset's count or grow the world's vocabulary")
        if task == "t2i":
            meta, text = sample.draw_t2i(category, rng, resolution)
            key, ident = world.combo_key(meta), world.combo_key(meta)
        else:
            meta, text = sample.draw_edit(category, rng, resolution)
            key, ident = world.edit_key(meta), _edit_identity(meta)
        if world.is_reserved(key) or ident in seen or text in exclude_texts:
            continue
        seen.add(ident)
        prefix = "t2i" if task == "t2i" else "edit"
        records.append(PlannedRecord(f"{prefix}-{category}-s{seed}-{len(records):06d}", task, category,
                                     text, meta))
    return records


def render_record(record: PlannedRecord) -> dict[str, Any]:
    """The raw contract row for a planned record (runs in worker processes)."""
    resolution = int(record.meta["resolution"])
    meta_json = json.dumps(record.meta, sort_keys=True)
    if record.task == "t2i":
        source = "fewstep-world:fonts" if record.category == "text" else "fewstep-world:noto-emoji"
        row = {"id": record.id, "prompt": record.text,
               "image": world.png_bytes(world.render_t2i(record.meta, resolution)),
               "category": record.category, "source": source, "meta": meta_json}
        contract.validate_raw_t2i(row)
        return row
    src, tgt = world.render_edit_pair(record.meta, resolution)
    row = {"id": record.id, "instruction": record.text, "source_image": world.png_bytes(src),
           "target_image": world.png_bytes(tgt), "edit_category": record.category,
           "source": "fewstep-world:edit", "meta": meta_json}
    contract.validate_raw_edit(row)
    return row


def _render_all(records: list[PlannedRecord], workers: int, desc: str) -> Iterator[dict[str, Any]]:
    bar = tqdm(total=len(records), desc=desc, unit="rec", leave=False, mininterval=1.0)
    try:
        if workers <= 1 or len(records) < 400:
            for record in records:
                yield render_record(record)
                bar.update()
            return
        # spawn, not fork: the caller may hold threads (Ray, pyarrow) that fork would copy badly.
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for row in pool.imap(render_record, records, chunksize=64):
                yield row
                bar.update()
    finally:
        bar.close()


def _chunks(rows: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _publish_parts(rows: Iterable[dict], schema: pa.Schema, out: str, folder: str, rows_per_part: int,
                   options: storage.StorageOptions | None) -> list[contract.ShardEntry]:
    entries = []
    for index, chunk in enumerate(_chunks(rows, rows_per_part)):
        table = pa.Table.from_pylist(chunk, schema=schema)
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        data = buf.getvalue()
        rel = f"{folder}/part-{index:05d}.parquet"
        storage.write_bytes_atomic(storage.join(out, rel), data, options)
        entries.append(contract.ShardEntry(rel, len(chunk), hashlib.sha256(data).hexdigest(), len(data)))
    return entries


def build_corpus(out: str, *, preset: str = "small", seed: int = 0, resolution: int = 64, workers: int = 1,
                 overwrite: bool = False, options: storage.StorageOptions | None = None,
                 t2i_per_category: int | None = None, edit_per_category: int | None = None) -> dict[str, Any]:
    """Build and publish a corpus at ``out``; returns the ``corpus.json`` payload."""
    if preset not in PRESETS:
        raise CorpusError(f"--preset: {preset!r} is not one of {list(PRESETS)}")
    if not 16 <= resolution <= 1024:
        raise CorpusError(f"--resolution: {resolution} is outside 16..1024")
    spec = PRESETS[preset]
    n_t2i = spec.t2i_per_category if t2i_per_category is None else t2i_per_category
    n_edit = spec.edit_per_category if edit_per_category is None else edit_per_category
    summary_uri = storage.join(out, CORPUS_SUMMARY)
    existing = [u for sub in ("t2i", "edit") for u in storage.list_files(storage.join(out, sub), "", options)]
    if storage.exists(summary_uri, options) or existing:
        if not overwrite:
            raise CorpusError(f"{out} already holds a corpus; pass --overwrite to replace it")
        storage.delete(summary_uri, options)  # first, so no reader trusts a half-replaced corpus
        for uri in existing:
            storage.delete(uri, options)

    from fewstep.bench.benches import bench_texts  # prompts the benches use, never emitted here

    exclude = frozenset(bench_texts())
    started = time.time()
    t2i = [r for c in world.T2I_CATEGORIES for r in plan("t2i", c, n_t2i, seed, resolution, exclude)]
    edits = [r for c in world.EDIT_CATEGORIES for r in plan("edit", c, n_edit, seed, resolution, exclude)]
    log.info("planned %d T2I and %d edit records in %.1f s", len(t2i), len(edits), time.time() - started)
    shards = _publish_parts(_render_all(t2i, workers, "t2i"), contract.RAW_T2I_SCHEMA, out, "t2i",
                            spec.rows_per_part, options)
    shards += _publish_parts(_render_all(edits, workers, "edit"), contract.RAW_EDIT_SCHEMA, out, "edit",
                             spec.rows_per_part, options)
    config = {"preset": preset, "seed": seed, "resolution": resolution,
              "t2i_per_category": n_t2i, "edit_per_category": n_edit}
    counts = {"t2i": dict(Counter(r.category for r in t2i)), "edit": dict(Counter(r.category for r in edits))}
    summary = contract.build_manifest(
        kind="raw_corpus", config=config, config_hash=hashlib.sha256(
            json.dumps(config, sort_keys=True).encode()).hexdigest()[:16],
        shards=shards, totals={"t2i": len(t2i), "edit": len(edits)},
        extra={"preset": preset, "seed": seed, "resolution": resolution, "counts": counts,
               "world_version": world.WORLD_VERSION, "vocabulary_hash": world.vocabulary_hash(),
               "holdout": {"salt": world.RESERVE_SALT, "percent": world.RESERVE_PERCENT,
                           "excluded_bench_texts": len(exclude)},
               "build_seconds": round(time.time() - started, 2)})
    storage.write_json_atomic(summary_uri, summary, options)  # last: the corpus is complete
    log.info("corpus at %s: %s in %.1f s", out, counts, time.time() - started)
    return summary


def read_corpus(out: str, task: str, options: storage.StorageOptions | None = None) -> pa.Table:
    """All rows of one task (``t2i`` | ``edit``) of a built corpus, as one table (tests, tools)."""
    summary = contract.check_manifest(storage.read_json(storage.join(out, CORPUS_SUMMARY), options),
                                      expected_kind="raw_corpus")
    tables = []
    for entry in summary["shards"]:
        if entry["path"].startswith(f"{task}/"):
            data = storage.read_bytes(storage.join(out, entry["path"]), options)
            tables.append(pq.read_table(io.BytesIO(data)))
    schema = contract.RAW_T2I_SCHEMA if task == "t2i" else contract.RAW_EDIT_SCHEMA
    return pa.concat_tables(tables) if tables else schema.empty_table()
