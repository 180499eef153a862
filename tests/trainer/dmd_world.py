"""Test helpers of the DMD area: a tiny random teacher and small shards in the shard contract.

The shards are written here directly (real tiny text encoder and VAE, SHARD_SCHEMA, the
precompute layout: ``shards/part-*.parquet``, ``empty_prompt.parquet``, ``manifest.json``)
so the DMD tests do not need a Ray cluster; the end-to-end test uses the real precompute.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import contract, storage

REPO = Path(__file__).resolve().parents[2]
_CACHE: dict[str, str] = {}


def tiny_teacher(root: Path, name: str = "tiny", seed: int = 0) -> str:
    """A random tiny pipeline (configs/models/tiny.yaml), built once per test session (the first
    caller's ``root`` holds it; tests only read it)."""
    from fewstep.models.tiny import init_tiny, load_tiny_config

    key = f"{name}-{seed}"
    if key not in _CACHE or not Path(_CACHE[key]).exists():
        out = Path(root) / f"teacher-{key}"
        init_tiny(str(out), load_tiny_config(REPO / "configs" / "models" / "tiny.yaml"), seed=seed,
                  overwrite=True)
        _CACHE[key] = str(out)
    return _CACHE[key]


def _row(rid: str, task: str, category: str, prompt: str, emb, neg=None, latents=None, source=None) -> dict:
    row = {"id": rid, "task": task, "category": category, "prompt": prompt, "dtype": "float32"}
    data, shape = contract.tensor_to_bytes(emb.embeds[0].numpy(), "float32")
    row.update(prompt_embeds=data, prompt_embeds_shape=shape,
               prompt_mask=contract.mask_to_bytes(emb.mask[0].numpy()))
    for name, value in (("negative_embeds", neg), ("latents", latents), ("source_latents", source)):
        if value is None:
            row[name], row[f"{name}_shape"] = None, None
            if name == "negative_embeds":
                row["negative_mask"] = None
            continue
        tensor = value.embeds[0] if name == "negative_embeds" else value
        data, shape = contract.tensor_to_bytes(tensor.numpy(), "float32")
        row[name], row[f"{name}_shape"] = data, shape
        if name == "negative_embeds":
            row["negative_mask"] = contract.mask_to_bytes(value.mask[0].numpy())
    return row


def _write_table(uri: str, rows: list[dict]) -> contract.ShardEntry:
    table = pa.Table.from_pylist(rows, schema=contract.SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    storage.write_bytes_atomic(uri, data)
    return data


def write_shards(out: Path, teacher: str, n_t2i: int = 8, n_edit: int = 0, resolution: int = 32) -> str:
    """Encode fixture rows with ``teacher`` and write a shards dataset at ``out``."""
    from PIL import Image

    from fewstep.models.adapter import QwenImageAdapter
    from pipelines.precompute.fixtures import curated_rows

    ad = QwenImageAdapter.load(teacher, components=("text_encoder", "vae"))
    rows = []
    for rec in curated_rows(n_t2i, n_edit, resolution):
        if rec["task"] == "t2i":
            emb = ad.encode_prompts([rec["prompt"]]).trimmed()
            lat = None
            if rec["image"] is not None:
                lat = ad.encode_images([Image.open(io.BytesIO(rec["image"]))])[0]
            rows.append(_row(rec["id"], "t2i", rec["category"], rec["prompt"], emb, latents=lat))
        else:
            src = Image.open(io.BytesIO(rec["source_image"]))
            emb = ad.encode_prompts([rec["prompt"]], images=[src]).trimmed()
            neg = ad.encode_prompts([""], images=[src]).trimmed()
            lat = None if rec["image"] is None else ad.encode_images([Image.open(io.BytesIO(rec["image"]))])[0]
            rows.append(_row(rec["id"], "edit", rec["category"], rec["prompt"], emb, neg, lat,
                             ad.encode_images([src])[0]))
    root = storage.normalize(str(out))
    entries = []
    half = (len(rows) + 1) // 2
    # Contiguous halves (T2I rows first): a position split hands ranks different task mixes.
    for k, chunk in enumerate((rows[:half], rows[half:])):
        rel = f"shards/part-{k:05d}.parquet"
        data = _write_table(storage.join(root, rel), chunk)
        entries.append(contract.ShardEntry(rel, len(chunk), hashlib.sha256(data).hexdigest(), len(data)))
    empty = ad.encode_prompts([""]).trimmed()
    _write_table(storage.join(root, "empty_prompt.parquet"), [_row("__empty__", "t2i", "", "", empty)])
    by_task = {"t2i": n_t2i, "edit": n_edit}
    manifest = contract.build_manifest(kind="shards", config={"test": True}, config_hash="test",
                                       shards=entries, teacher={"uri": teacher},
                                       totals={"by_task": {k: v for k, v in by_task.items() if v}},
                                       extra={"empty_prompt": {"path": "empty_prompt.parquet"},
                                              # as precompute records them (the runtime checks models against them)
                                              "latent_channels": int(ad.latent_channels),
                                              "text_embed_dim": int(empty.embeds.shape[-1])})
    storage.write_json_atomic(storage.join(root, contract.MANIFEST_NAME), manifest)
    return root
