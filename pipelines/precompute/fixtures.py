"""Small curated datasets in the curate stage's output format, for tests and quick checks.

Real curate output is the normal input of precompute; this writes the same layout
(``curated/part-*.parquet`` in CURATED_SCHEMA, ``manifest.json`` of kind ``curated``) from simple
drawn images (coloured shapes on coloured backgrounds), deterministically.
"""

from __future__ import annotations

import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import contract, storage
from fewstep.storage import StorageOptions

T2I_CATEGORIES = ("portrait", "landscape", "text")
EDIT_CATEGORIES = ("scene", "enhancement", "object", "text", "identity", "style")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "black": (15, 15, 15), "purple": (140, 50, 180), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "triangle")


def draw(shape: str, colour: str, background: str, size: int) -> bytes:
    """PNG bytes of one coloured shape on a plain background."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), COLOURS[background])
    pen = ImageDraw.Draw(img)
    lo, hi = size // 4, size * 3 // 4
    if shape == "circle":
        pen.ellipse([lo, lo, hi, hi], fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle([lo, lo, hi, hi], fill=COLOURS[colour])
    else:
        pen.polygon([(size // 2, lo), (lo, hi), (hi, hi)], fill=COLOURS[colour])
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def curated_rows(n_t2i: int, n_edit: int, resolution: int = 32) -> list[dict]:
    """Rows in CURATED_SCHEMA: T2I rows alternate with/without image, edit rows with/without target."""
    names = list(COLOURS)
    rows = []
    for i in range(n_t2i):
        shape, colour, bg = SHAPES[i % 3], names[i % len(names)], names[(i * 3 + 1) % len(names)]
        if bg == colour:
            bg = names[(names.index(bg) + 1) % len(names)]
        rows.append({
            "id": f"t2i-{i:04d}", "origin_id": f"t2i-{i:04d}", "task": "t2i",
            "prompt": f"a {colour} {shape} on a {bg} background" + " in detail" * (i % 4),
            "category": T2I_CATEGORIES[i % 3],
            "image": draw(shape, colour, bg, resolution) if i % 2 == 0 else None,
            "source_image": None, "source": "fixture", "caption_origin": "given",
            "meta": json.dumps({"shape": shape, "colour": colour, "background": bg}),
        })
    for i in range(n_edit):
        shape, colour, bg = SHAPES[i % 3], names[(i + 2) % len(names)], names[(i * 5 + 3) % len(names)]
        if bg == colour:
            bg = names[(names.index(bg) + 1) % len(names)]
        new = names[(names.index(colour) + 3) % len(names)]
        if new == bg:
            new = names[(names.index(new) + 1) % len(names)]
        rows.append({
            "id": f"edit-{i:04d}", "origin_id": f"edit-{i:04d}", "task": "edit",
            "prompt": f"make the {shape} {new}",
            "category": EDIT_CATEGORIES[i % len(EDIT_CATEGORIES)],
            "image": draw(shape, new, bg, resolution) if i % 3 != 2 else None,
            "source_image": draw(shape, colour, bg, resolution), "source": "fixture",
            "caption_origin": "given",
            "meta": json.dumps({"shape": shape, "from": colour, "to": new, "background": bg}),
        })
    return rows


def write_curated(output: str, rows: list[dict], parts: int = 2, options: StorageOptions | None = None,
                  schema: pa.Schema = contract.CURATED_SCHEMA) -> dict:
    """Write ``rows`` as a curate output folder (parts in order, manifest last); returns the manifest.
    ``schema``: another one writes the malformed sets that precompute must refuse or reject."""
    output = storage.normalize(output)
    entries = []
    per_part = max(1, -(-len(rows) // parts))
    for k in range(parts):
        chunk = rows[k * per_part:(k + 1) * per_part]
        table = pa.Table.from_pylist(chunk, schema=schema)
        sink = io.BytesIO()
        pq.write_table(table, sink, row_group_size=8)
        data = sink.getvalue()
        rel = f"curated/part-{k:05d}.parquet"
        storage.write_bytes_atomic(storage.join(output, rel), data, options)
        entries.append(contract.ShardEntry(rel, len(chunk), hashlib.sha256(data).hexdigest(), len(data)))
    manifest = contract.build_manifest(kind="curated", config={"fixture": True}, config_hash="fixture",
                                       shards=entries)
    storage.write_json_atomic(storage.join(output, contract.MANIFEST_NAME), manifest, options)
    return manifest


def write_curated_fixture(output: str, n_t2i: int = 8, n_edit: int = 6, resolution: int = 32, parts: int = 2,
                          options: StorageOptions | None = None) -> dict:
    return write_curated(output, curated_rows(n_t2i, n_edit, resolution), parts, options)
