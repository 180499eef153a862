"""Small shard datasets made by encoding simple drawn images with a pipeline (tests, benchmark).

The rows follow ``contract.SHARD_SCHEMA`` exactly as precompute writes them (shards/,
empty_prompt.parquet, manifest.json last), with real text embeddings and VAE latents of the
given pipeline, so the trainer reads them through its normal path. T2I rows show a coloured
square on a coloured background; edit rows change the square's colour.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageDraw

from fewstep import contract, storage
from fewstep.storage import StorageOptions

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "white": (245, 245, 245), "black": (15, 15, 15)}


def draw(size: int, square: str, background: str, offset: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), COLOURS[background])
    a, b = size // 4 + offset, 3 * size // 4 + offset
    ImageDraw.Draw(image).rectangle([a, a, b, b], fill=COLOURS[square])
    return image


def _row(rid: str, task: str, category: str, prompt: str, embed, mask, latents, source=None,
         negative=None, dtype: str = "float32") -> dict:
    e, es = contract.tensor_to_bytes(embed, dtype)
    lat, ls = contract.tensor_to_bytes(latents, dtype)
    row = {"id": rid, "task": task, "category": category, "prompt": prompt, "dtype": dtype,
           "prompt_embeds": e, "prompt_embeds_shape": es, "prompt_mask": contract.mask_to_bytes(mask),
           "negative_embeds": None, "negative_embeds_shape": None, "negative_mask": None,
           "latents": lat, "latents_shape": ls, "source_latents": None, "source_latents_shape": None}
    if source is not None:
        row["source_latents"], row["source_latents_shape"] = contract.tensor_to_bytes(source, dtype)
        n, ns = contract.tensor_to_bytes(negative[0], dtype)
        row.update(negative_embeds=n, negative_embeds_shape=ns,
                   negative_mask=contract.mask_to_bytes(negative[1]))
    return row


def _valid(pe, i: int) -> tuple[np.ndarray, np.ndarray]:
    n = int(pe.mask[i].sum())
    return pe.embeds[i, :n].float().numpy(), pe.mask[i, :n].numpy().astype(np.uint8)


@torch.no_grad()
def write_synthetic_shards(pipeline_uri: str, out_uri: str, *, t2i_rows: int = 32, edit_rows: int = 0,
                           rows_per_shard: int = 16, repeat: int = 1, first_row: int = 0,
                           options: StorageOptions | None = None) -> str:
    """Encode drawn images with ``pipeline_uri`` and publish a shard dataset at ``out_uri``.

    ``first_row`` starts the drawing further on: rows ``first_row...`` are other colour pairs
    than rows ``0...`` (a held-out set), as long as both stay within the pairs' count.

    ``repeat`` > 1 copies every encoded row that many times (new ids): a bigger dataset for
    throughput measurements at the encoding cost of a small one.
    """
    from fewstep.models.adapter import QwenImageAdapter

    adapter = QwenImageAdapter.load(pipeline_uri, components=("text_encoder", "vae"), storage=options)
    size = int(adapter.resolution or 32)
    names = list(COLOURS)
    pairs = [(s, b) for s, b in itertools.product(names, names) if s != b]
    rows: list[dict] = []
    categories = ["portrait", "landscape", "text"]
    for i in range(first_row, first_row + t2i_rows):
        square, background = pairs[i % len(pairs)]
        prompt = f"a {square} square on a {background} background"
        image = draw(size, square, background, offset=(i // len(pairs)) % 3 - 1)
        pe = adapter.encode_prompts([prompt])
        lat = adapter.encode_images([image])[0].numpy()
        rows.append(_row(f"t2i-{i:05d}", "t2i", categories[i % 3], prompt, *_valid(pe, 0), lat))
    for i in range(first_row, first_row + edit_rows):
        square, background = pairs[i % len(pairs)]
        new = names[(names.index(square) + 1) % len(names)]
        if new == background:
            new = names[(names.index(new) + 1) % len(names)]
        src, tgt = draw(size, square, background), draw(size, new, background)
        instruction = f"make the square {new}"
        pe = adapter.encode_prompts([instruction], images=[src])
        neg = adapter.encode_prompts([" "], images=[src])
        lat_src = adapter.encode_images([src])[0].numpy()
        lat_tgt = adapter.encode_images([tgt])[0].numpy()
        rows.append(_row(f"edit-{i:05d}", "edit", "object", instruction, *_valid(pe, 0), lat_tgt,
                         source=lat_src, negative=_valid(neg, 0)))
    if repeat > 1:
        rows = [dict(row, id=f"{row['id']}-r{r}") for r in range(repeat) for row in rows]
    empty = adapter.encode_prompts([""])
    empty_row = _row("__empty__", "t2i", "none", "", *_valid(empty, 0),
                     np.zeros((1,), np.float32))
    empty_row.update(latents=None, latents_shape=None)

    out_uri = storage.normalize(out_uri)
    entries = []
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    for part, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = [rows[j] for j in order[start:start + rows_per_shard]]
        data = _parquet(chunk)
        rel = f"shards/part-{part:05d}.parquet"
        storage.write_bytes_atomic(storage.join(out_uri, rel), data, options)
        import hashlib

        entries.append(contract.ShardEntry(rel, len(chunk), hashlib.sha256(data).hexdigest(), len(data)))
    storage.write_bytes_atomic(storage.join(out_uri, "empty_prompt.parquet"), _parquet([empty_row]), options)
    manifest = contract.build_manifest(
        kind="shards", config={"synthetic": True}, config_hash="synthetic", shards=entries,
        teacher={"uri": storage.normalize(pipeline_uri)},
        extra={"extra": {"latent_channels": adapter.latent_channels, "resolution": size}})
    storage.write_json_atomic(storage.join(out_uri, contract.MANIFEST_NAME), manifest, options)
    return out_uri


def _parquet(rows: list[dict]) -> bytes:
    table = pa.Table.from_pylist(rows, schema=contract.SHARD_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def write_synthetic_curated(out_uri: str, *, rows: int = 32, size: int = 32, edit_rows: int = 0,
                            t2i_categories: tuple[str, ...] = ("portrait",),
                            options: StorageOptions | None = None) -> str:
    """A curated dataset (``contract.CURATED_SCHEMA``) of drawn images, e.g. for VAE training.

    T2I rows take ``t2i_categories`` in turn (labels only: every image is a drawn square)."""
    import hashlib

    names = list(COLOURS)
    pairs = [(s, b) for s, b in itertools.product(names, names) if s != b]
    records = []

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    for i in range(rows + edit_rows):
        square, background = pairs[i % len(pairs)]
        edit = i >= rows
        records.append({
            "id": f"cur-{i:05d}", "origin_id": f"cur-{i:05d}", "task": "edit" if edit else "t2i",
            "prompt": f"a {square} square on a {background} background", "category": "object" if edit else t2i_categories[i % len(t2i_categories)],
            "image": png(draw(size, square, background, offset=(i // len(pairs)) % 3 - 1)),
            "source_image": png(draw(size, background, square)) if edit else None,
            "source": "synthetic", "caption_origin": "given", "meta": None})
    table = pa.Table.from_pylist(records, schema=contract.CURATED_SCHEMA)
    sink = io.BytesIO()
    pq.write_table(table, sink)
    data = sink.getvalue()
    out_uri = storage.normalize(out_uri)
    rel = "curated/part-00000.parquet"
    storage.write_bytes_atomic(storage.join(out_uri, rel), data, options)
    entry = contract.ShardEntry(rel, len(records), hashlib.sha256(data).hexdigest(), len(data))
    manifest = contract.build_manifest(kind="curated", config={"synthetic": True}, config_hash="synthetic",
                                       shards=[entry])
    storage.write_json_atomic(storage.join(out_uri, contract.MANIFEST_NAME), manifest, options)
    return out_uri


def ensure_tiny_world(root: str | Path, *, t2i_rows: int = 24, edit_rows: int = 8,
                      preset: str = "tiny", repeat: int = 1, rows_per_shard: int = 16) -> tuple[str, str]:
    """Build (once) a tiny random pipeline and a shard dataset encoded with it under ``root``.

    Returns ``(pipeline_dir, shards_dir)``. Reused when already complete, so several test
    modules of one session pay for it once.
    """
    from fewstep.models.tiny import init_tiny, load_tiny_config
    from trainer.teachers.init import REPO_MODEL_CONFIGS

    root = Path(root)
    pipeline, shards = root / "pipeline", root / "shards"
    if not (pipeline / "model_index.json").exists():
        init_tiny(pipeline, load_tiny_config(REPO_MODEL_CONFIGS / f"{preset}.yaml"), overwrite=True)
    if not (shards / contract.MANIFEST_NAME).exists():
        write_synthetic_shards(str(pipeline), str(shards), t2i_rows=t2i_rows, edit_rows=edit_rows,
                               repeat=repeat, rows_per_shard=rows_per_shard)
    return str(pipeline), str(shards)
