"""Bad raw inputs for the data engine's own tests, each with the outcome it must get.

``make_bad_t2i_records(seed)`` / ``make_bad_edit_records(seed)`` return :class:`BadCase`
lists, in order (for duplicates the *first* occurrence is the one kept). Each case is a
record in the raw contract shape (``fewstep.contract.RAW_*_SCHEMA``) or, for JSONL only, a
malformed line; ``expected`` is a ``fewstep.contract.REJECT_REASONS`` key or ``"keep"``.

Conventions:
- A ``bytes`` value in a string field (``prompt``, ``instruction``) means raw bytes that are
  not valid UTF-8. Parquet: written as-is into the string column (as foreign writers do);
  JSONL: spliced raw into the line, so the line itself is not valid UTF-8.
- A missing key means the field is absent (Parquet: null).
- JSONL images are ``data:image/...;base64,...`` URIs.
- Expectations assume :data:`ASSUMED_LIMITS` (the curate defaults, plus the banned word).

``write_bad_inputs(out)`` writes ``t2i.parquet``, ``t2i.jsonl``, ``edit.parquet``,
``edit.jsonl``, the file-level cases ``empty.jsonl``, ``empty.parquet``,
``truncated.parquet`` and ``expected.json`` (every case, in order).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from fewstep import contract, storage
from fewstep.bench import world

BANNED_WORD = "bannedword"
ASSUMED_LIMITS: dict[str, Any] = {"min_side": 16, "max_aspect_ratio": 3.0, "max_pixels": 16_000_000,
                                  "min_chars": 3, "max_chars": 1000, "banned_words": [BANNED_WORD],
                                  "near_image_distance": 4}
SOURCE = "fewstep-badinputs"

# Distinct free-text prompts, so that no two cases are near duplicates by accident.
_PROMPTS = (
    "a lighthouse on a rocky coast at dusk, painted in watercolour",
    "close-up of a ginger cat asleep on a sunny windowsill",
    "an old red tractor in a wheat field under storm clouds",
    "a bowl of ramen with chopsticks, seen from above",
    "portrait of an elderly fisherman with a knitted cap",
    "neon sign reading OPEN in a rainy alley at night",
    "a snowy pine forest with a frozen lake in the middle",
    "a child flying a yellow kite on a windy beach",
    "minimalist poster of a hot air balloon over mountains",
    "a stack of leather-bound books next to a brass lamp",
    "desert canyon with a winding river, aerial photograph",
    "a violinist performing on a dim wooden stage",
    "macro shot of dew drops on a green spider web",
    "a vintage bicycle leaning against a blue door",
    "street market stall full of oranges and lemons",
    "a robot watering tomato plants in a greenhouse",
    "a sailing boat on calm turquoise water at noon",
    "chalk drawing of a dragon on a school blackboard",
    "a cup of cappuccino with a heart in the foam",
    "astronaut floating above the earth, cinematic light",
    "a paper crane on a wooden desk beside a pencil",
    "foggy harbour with fishing boats at sunrise",
    "a tabby kitten playing with a ball of blue yarn",
    "glass jar of honey with a wooden dipper",
    "skyline of a modern city reflected in a river",
    "a scarecrow in a pumpkin patch in autumn",
    "an owl perched on a mossy branch at night",
    "a red telephone box on a cobbled street",
    "watermelon slices on a picnic blanket",
    "a steam train crossing a stone viaduct",
    "a jellyfish glowing in deep blue water",
    "a mountain cabin with smoke rising from the chimney",
)
_INSTRUCTIONS = (
    "make the sky look like a sunset", "remove the car parked on the left",
    "turn the photo into a pencil sketch", "replace the dog with a fox",
    "change the season to winter", "add a rainbow behind the house",
    "sharpen the blurry photo", "make the person smile", "write HELLO on the sign",
    "give the wall a brick texture", "make the lighting warmer", "turn day into night",
    "put a hat on the cat", "make the river look frozen", "change the shirt colour to green",
    "erase the text in the corner", "add falling snow", "make the tree bigger",
    "swap the apples for pears", "add a moon to the sky",
)


@dataclass(frozen=True)
class BadCase:
    """One bad (or odd but valid) input and the outcome the data engine must give it."""

    name: str
    expected: str  # a contract.REJECT_REASONS key, or "keep"
    record: dict[str, Any] | None = None  # raw-contract record; None for a malformed line
    raw_line: bytes | None = None  # JSONL only: a line that is not a JSON object
    note: str = ""
    formats: tuple[str, ...] = field(default=("parquet", "jsonl"))

    @property
    def id(self) -> str | None:
        value = (self.record or {}).get("id")
        return value if isinstance(value, str) else None


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


class _Scenes:
    """Distinct images: a world render over a smooth random colour field. The random low
    frequencies make perceptual hashes of different calls far apart (no accidental near
    duplicates), the emoji keeps them looking like the corpus."""

    _SUBJECTS = [s.key for s in (*world.PORTRAIT, *world.LANDSCAPE)]

    def __init__(self, seed: int):
        self.rng = np.random.default_rng([seed, 7])

    def image(self) -> Image.Image:
        key = self._SUBJECTS[int(self.rng.integers(len(self._SUBJECTS)))]
        category = "portrait" if any(s.key == key for s in world.PORTRAIT) else "landscape"
        attrs = world.make_attrs(category, subject=key, background="white", position="center", size="small")
        scene = np.asarray(world.render_t2i(attrs, 64), dtype=np.float32)
        field = Image.fromarray(self.rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((64, 64),
                                                                                            Image.BICUBIC)
        mixed = 0.35 * scene + 0.65 * np.asarray(field, dtype=np.float32)
        return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))

    def png(self) -> bytes:
        return _encode(self.image())


def _oversized_png(width: int = 60_000, height: int = 60_000) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` with a tiny IDAT: a decompression bomb
    header. Never decode it; a correct reader rejects it from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def _odd_valid_images(scenes: _Scenes) -> list[tuple[str, bytes, str]]:
    """Encodings a reader must normalise, not reject."""
    cmyk = _encode(scenes.image().convert("CMYK"), "JPEG", quality=95)
    base = scenes.image()
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    pal_alpha = _encode(palette, "PNG", transparency=int(palette.getpixel((0, 0))))
    gray16 = Image.fromarray((np.asarray(scenes.image().convert("L"), dtype="<u2") * 257).astype("<u2"))
    webp = _encode(scenes.image(), "WEBP", quality=90)
    upright = scenes.image()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display, so store it rotated the other way
    rotated = _encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())
    return [("cmyk_jpeg", cmyk, "CMYK JPEG"), ("palette_png_alpha", pal_alpha, "palette PNG with transparency"),
            ("gray16_png", _encode(gray16, "PNG"), "16-bit grayscale PNG"), ("webp", webp, "WebP"),
            ("exif_rotated_jpeg", rotated, "JPEG with EXIF orientation 6")]


def _one_pixel_changed(png: bytes) -> bytes:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    r, g, b = image.getpixel((1, 1))
    image.putpixel((1, 1), (255 - r, 255 - g, 255 - b))
    return _encode(image)


def make_bad_t2i_records(seed: int = 0) -> list[BadCase]:
    """Raw T2I inputs covering every reject reason an input can earn, plus odd-but-valid ones."""
    rng = np.random.default_rng([seed, 1])
    scenes = _Scenes(seed)
    prompts = iter(_PROMPTS)
    n = 0

    def rec(image: bytes | None, prompt: Any = None, **extra: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        record = {"id": f"bad-t2i-{seed}-{n:03d}", "prompt": next(prompts) if prompt is None else prompt,
                  "image": image, "category": "landscape", "source": SOURCE, "meta": None}
        record.update(extra)
        return {k: v for k, v in record.items() if v is not _ABSENT}

    ok = [rec(scenes.png()) for _ in range(3)]
    cases = [BadCase(f"ok_{i}", "keep", r, note="plain valid record") for i, r in enumerate(ok)]
    png, jpeg = scenes.png(), _encode(scenes.image(), "JPEG", quality=90)
    cases += [
        BadCase("corrupt_bytes", "image_undecodable", rec(rng.bytes(2048)), note="random bytes"),
        BadCase("not_an_image", "image_undecodable", rec(b"<html><body>404 not found</body></html>")),
        BadCase("truncated_png", "image_truncated", rec(png[: len(png) * 6 // 10])),
        BadCase("truncated_jpeg", "image_truncated", rec(jpeg[: len(jpeg) * 6 // 10])),
        BadCase("zero_byte_image", "image_empty", rec(b"")),
        BadCase("tiny_image", "image_too_small", rec(_encode(scenes.image().resize((8, 8))))),
        BadCase("extreme_aspect", "aspect_ratio", rec(_encode(scenes.image().resize((512, 32))))),
        BadCase("oversized_header", "too_many_pixels", rec(_oversized_png()),
                note="IHDR claims 60000x60000; must be rejected before decoding"),
        BadCase("non_utf8_prompt", "prompt_invalid_text",
                rec(scenes.png(), b"a caf\xe9 terrace at night \xff\xfe painted"), note="latin-1 bytes"),
        BadCase("control_characters", "prompt_invalid_text",
                rec(scenes.png(), "a brass bell\x07 ringing on a\x00 white table")),
        BadCase("empty_prompt", "prompt_empty", rec(scenes.png(), "   ")),
        BadCase("too_short_prompt", "prompt_too_short", rec(scenes.png(), "ox")),
        BadCase("too_long_prompt", "prompt_too_long",
                rec(scenes.png(), " ".join(["a very long and winding description"] * 160))),
        BadCase("banned_word", "banned_word", rec(scenes.png(), f"a poster of a {BANNED_WORD} next to a tree")),
        BadCase("missing_source", "missing_field", rec(scenes.png(), source=_ABSENT),
                note="required field 'source' absent"),
        BadCase("meta_not_json", "schema", rec(scenes.png(), meta="{not json")),
        BadCase("duplicate_id", "duplicate_id", {**rec(scenes.png()), "id": ok[0]["id"]}),
        BadCase("duplicate_image", "duplicate_image", rec(ok[1]["image"])),
        BadCase("reencoded_duplicate", "duplicate_image",
                rec(_encode(Image.open(io.BytesIO(ok[1]["image"])), "PNG", compress_level=1)),
                note="same pixels, different PNG bytes"),
        BadCase("one_pixel_changed", "near_duplicate_image", rec(_one_pixel_changed(ok[2]["image"]))),
        BadCase("duplicate_prompt", "duplicate_prompt", rec(scenes.png(), ok[0]["prompt"])),
        BadCase("near_duplicate_prompt", "near_duplicate_prompt",
                rec(scenes.png(), ok[2]["prompt"].upper().replace(",", "") + ".")),
    ]
    cases += [BadCase(name, "keep", rec(data), note=note) for name, data, note in _odd_valid_images(scenes)]
    cases += [BadCase(f"malformed_line_{i}", "malformed_row", raw_line=line, formats=("jsonl",))
              for i, line in enumerate(_MALFORMED_LINES)]
    return cases


_ABSENT = object()
_MALFORMED_LINES = (b'{"id": "cut-off", "prompt": "a cat', b"this is not json", b"[1, 2, 3]",
                    b'{"id": "x", "prompt": "unterminated}')


def make_bad_edit_records(seed: int = 0) -> list[BadCase]:
    """Raw edit inputs: broken sources/targets, identical pairs, bad instructions, odd encodings."""
    rng = np.random.default_rng([seed, 2])
    scenes = _Scenes(seed + 1000)
    instructions = iter(_INSTRUCTIONS)
    n = 0

    def rec(source: Any, target: Any, instruction: Any = None, **extra: Any) -> dict[str, Any]:
        nonlocal n
        n += 1
        record = {"id": f"bad-edit-{seed}-{n:03d}",
                  "instruction": next(instructions) if instruction is None else instruction,
                  "source_image": source, "target_image": target, "edit_category": "scene",
                  "source": SOURCE, "meta": None}
        record.update(extra)
        return {k: v for k, v in record.items() if v is not _ABSENT}

    ok = [rec(scenes.png(), scenes.png()) for _ in range(3)]
    cases = [BadCase(f"ok_{i}", "keep", r, note="plain valid pair") for i, r in enumerate(ok)]
    same = scenes.png()
    src_png = scenes.png()
    cases += [
        BadCase("identical_pair", "edit_identical_pair", rec(same, same)),
        BadCase("identical_pair_reencoded", "edit_identical_pair",
                rec(src_png, _encode(Image.open(io.BytesIO(src_png)), "PNG", compress_level=1))),
        BadCase("corrupt_source", "image_undecodable", rec(rng.bytes(1024), scenes.png())),
        BadCase("truncated_target", "image_truncated", rec(scenes.png(), src_png[: len(src_png) // 2])),
        BadCase("zero_byte_source", "image_empty", rec(b"", scenes.png())),
        BadCase("oversized_source", "too_many_pixels", rec(_oversized_png(), scenes.png())),
        BadCase("missing_source_image", "missing_field", rec(_ABSENT, scenes.png())),
        BadCase("empty_instruction", "prompt_empty", rec(scenes.png(), scenes.png(), "")),
        BadCase("non_utf8_instruction", "prompt_invalid_text",
                rec(scenes.png(), scenes.png(), b"make it \xc3\x28 brighter")),
        BadCase("banned_word", "banned_word", rec(scenes.png(), scenes.png(), f"add a {BANNED_WORD} sign")),
        BadCase("duplicate_id", "duplicate_id", {**rec(scenes.png(), scenes.png()), "id": ok[0]["id"]}),
        BadCase("no_target", "keep", rec(scenes.png(), None), note="target is optional"),
    ]
    odd = _odd_valid_images(scenes)
    cases += [BadCase(f"{name}_source", "keep", rec(data, scenes.png()), note=note) for name, data, note in odd[:3]]
    cases += [BadCase(f"malformed_line_{i}", "malformed_row", raw_line=line, formats=("jsonl",))
              for i, line in enumerate(_MALFORMED_LINES[:2])]
    return cases


# ---------------------------------------------------------------------------
# Writers
# ---------------------------------------------------------------------------

_STRING_FIELDS = {"id", "prompt", "instruction", "category", "edit_category", "source", "meta"}


def _string_array(values: list[Any]) -> pa.Array:
    """A string column that may hold invalid UTF-8 (built from buffers, not validated)."""
    raw = [None if v is None else (v if isinstance(v, bytes) else v.encode("utf-8", "surrogatepass"))
           for v in values]
    offsets = np.zeros(len(raw) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([0 if v is None else len(v) for v in raw])
    validity = np.packbits(np.array([v is not None for v in raw], dtype=bool), bitorder="little")
    data = b"".join(v for v in raw if v is not None)
    return pa.Array.from_buffers(pa.string(), len(raw), [pa.py_buffer(validity.tobytes()),
                                                         pa.py_buffer(offsets.tobytes()), pa.py_buffer(data)])


def to_table(cases: list[BadCase], task: str) -> pa.Table:
    """The record cases as a table with the raw contract's columns (all nullable)."""
    schema = contract.RAW_T2I_SCHEMA if task == "t2i" else contract.RAW_EDIT_SCHEMA
    records = [c.record for c in cases if c.record is not None and "parquet" in c.formats]
    columns = []
    for f in schema:
        values = [r.get(f.name) for r in records]
        columns.append(_string_array(values) if f.name in _STRING_FIELDS else pa.array(values, f.type))
    relaxed = pa.schema([f.with_nullable(True) for f in schema], metadata=schema.metadata)
    return pa.Table.from_arrays(columns, schema=relaxed)


def parquet_bytes(cases: list[BadCase], task: str) -> bytes:
    buf = io.BytesIO()
    pq.write_table(to_table(cases, task), buf)
    return buf.getvalue()


def _data_uri(data: bytes) -> str:
    kind = Image.MIME.get(_sniff(data), "application/octet-stream")
    return f"data:{kind};base64,{base64.b64encode(data).decode('ascii')}"


def _sniff(data: bytes) -> str:
    for magic, fmt in ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"RIFF", "WEBP")):
        if data.startswith(magic):
            return fmt
    return ""


def jsonl_bytes(cases: list[BadCase]) -> bytes:
    """One line per case, in order: records as JSON objects, malformed lines as they are."""
    lines = []
    for case in cases:
        if "jsonl" not in case.formats:
            continue
        if case.record is None:
            lines.append(case.raw_line or b"")
            continue
        raw_fields: dict[str, bytes] = {}
        obj: dict[str, Any] = {}
        for key, value in case.record.items():
            if isinstance(value, bytes) and key in _STRING_FIELDS:
                raw_fields[key] = value  # invalid UTF-8: spliced in raw below
                obj[key] = f"@@RAW-{key}@@"
            elif isinstance(value, bytes):
                obj[key] = _data_uri(value)
            else:
                obj[key] = value
        line = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        for key, value in raw_fields.items():
            line = line.replace(f"@@RAW-{key}@@".encode(), value)
        lines.append(line)
    return b"\n".join(lines) + b"\n"


def expected_outcomes(cases: list[BadCase], fmt: str) -> list[dict[str, Any]]:
    return [{"name": c.name, "id": c.id, "expected": c.expected} for c in cases if fmt in c.formats]


def write_bad_inputs(out: str, seed: int = 0, options: storage.StorageOptions | None = None) -> dict[str, str]:
    """Write every bad-input file under ``out``; returns name -> URI. ``expected.json`` last."""
    t2i, edit = make_bad_t2i_records(seed), make_bad_edit_records(seed)
    good = parquet_bytes(t2i, "t2i")
    files = {"t2i.parquet": good, "t2i.jsonl": jsonl_bytes(t2i), "edit.parquet": parquet_bytes(edit, "edit"),
             "edit.jsonl": jsonl_bytes(edit), "empty.jsonl": b"", "empty.parquet": b"",
             "truncated.parquet": good[: len(good) // 2]}
    paths = {}
    for name, data in files.items():
        paths[name] = storage.join(out, name)
        storage.write_bytes_atomic(paths[name], data, options)
    expected = {
        "limits": ASSUMED_LIMITS, "seed": seed,
        "records": {"t2i.parquet": expected_outcomes(t2i, "parquet"), "t2i.jsonl": expected_outcomes(t2i, "jsonl"),
                    "edit.parquet": expected_outcomes(edit, "parquet"),
                    "edit.jsonl": expected_outcomes(edit, "jsonl")},
        "files": {"empty.jsonl": "no records, no error", "empty.parquet": "malformed_row",
                  "truncated.parquet": "malformed_row"},
    }
    paths["expected.json"] = storage.join(out, "expected.json")
    storage.write_json_atomic(paths["expected.json"], expected, options)
    return paths
