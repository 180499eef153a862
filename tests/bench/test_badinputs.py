"""The bad-input generator: every case is what it claims to be, and the files are written as said."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, UnidentifiedImageError

from fewstep import contract, storage
from fewstep.bench import badinputs

REQUIRED_T2I = {"image_undecodable", "image_truncated", "image_empty", "image_too_small", "aspect_ratio",
                "too_many_pixels", "prompt_invalid_text", "prompt_empty", "prompt_too_short", "prompt_too_long",
                "banned_word", "missing_field", "schema", "duplicate_id", "duplicate_image",
                "near_duplicate_image", "duplicate_prompt", "near_duplicate_prompt", "malformed_row", "keep"}
REQUIRED_EDIT = {"edit_identical_pair", "image_undecodable", "image_truncated", "image_empty", "too_many_pixels",
                 "missing_field", "prompt_empty", "prompt_invalid_text", "banned_word", "duplicate_id",
                 "malformed_row", "keep"}


@pytest.fixture(scope="module")
def t2i_cases():
    return {c.name: c for c in badinputs.make_bad_t2i_records(0)}


@pytest.fixture(scope="module")
def edit_cases():
    return {c.name: c for c in badinputs.make_bad_edit_records(0)}


def test_outcomes_are_contract_reasons_and_cover_the_list(t2i_cases, edit_cases):
    for cases, required in ((t2i_cases, REQUIRED_T2I), (edit_cases, REQUIRED_EDIT)):
        outcomes = {c.expected for c in cases.values()}
        assert outcomes <= set(contract.REJECT_REASONS) | {"keep"}
        assert required <= outcomes, required - outcomes


def test_deterministic_for_a_seed():
    a, b, c = (badinputs.make_bad_t2i_records(s) for s in (3, 3, 4))
    assert a == b
    assert [x.record for x in a] != [x.record for x in c]


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_images_are_broken_exactly_as_labelled(t2i_cases):
    img = {name: case.record["image"] for name, case in t2i_cases.items() if case.record}
    assert img["zero_byte_image"] == b""
    for name in ("corrupt_bytes", "not_an_image"):
        with pytest.raises(UnidentifiedImageError):
            _open(img[name])
    for name in ("truncated_png", "truncated_jpeg"):
        with pytest.raises(OSError, match="truncated|broken|EOF"):
            _open(img[name]).load()
    assert min(_open(img["tiny_image"]).size) == 8
    w, h = _open(img["extreme_aspect"]).size
    assert max(w, h) / min(w, h) >= 16 and min(w, h) >= 16
    # The bomb: the header claims 60000 x 60000, the file is a few dozen bytes.
    bomb = img["oversized_header"]
    assert len(bomb) < 200 and struct.unpack(">II", bomb[16:24]) == (60_000, 60_000)
    with pytest.raises(Image.DecompressionBombError):
        _open(bomb)
    original = _open(t2i_cases["ok_1"].record["image"])
    reencoded = _open(img["reencoded_duplicate"])
    assert img["reencoded_duplicate"] != t2i_cases["ok_1"].record["image"]
    assert reencoded.tobytes() == original.tobytes()
    changed = _open(img["one_pixel_changed"]).convert("RGB").tobytes()
    base = _open(t2i_cases["ok_2"].record["image"]).convert("RGB").tobytes()
    assert sum(x != y for x, y in zip(changed, base)) in (1, 2, 3)


def test_odd_but_valid_images_decode(t2i_cases):
    modes = {name: _open(t2i_cases[name].record["image"]) for name in
             ("cmyk_jpeg", "palette_png_alpha", "gray16_png", "webp", "exif_rotated_jpeg")}
    assert modes["cmyk_jpeg"].mode == "CMYK"
    assert modes["palette_png_alpha"].mode == "P" and "transparency" in modes["palette_png_alpha"].info
    assert modes["gray16_png"].mode.startswith("I")
    assert modes["webp"].format == "WEBP"
    assert modes["exif_rotated_jpeg"].getexif().get(0x0112) == 6
    for image in modes.values():
        image.load()
        assert min(image.size) >= 16


def test_prompts_are_broken_exactly_as_labelled(t2i_cases, edit_cases):
    prompt = {name: (case.record or {}).get("prompt") for name, case in t2i_cases.items()}
    with pytest.raises(UnicodeDecodeError):
        prompt["non_utf8_prompt"].decode("utf-8")
    assert any(ord(ch) < 32 for ch in prompt["control_characters"])
    assert not prompt["empty_prompt"].strip() and len(prompt["too_short_prompt"]) < 3
    assert len(prompt["too_long_prompt"]) > badinputs.ASSUMED_LIMITS["max_chars"]
    assert badinputs.BANNED_WORD in prompt["banned_word"]
    assert "source" not in t2i_cases["missing_source"].record
    assert prompt["duplicate_prompt"] == prompt["ok_0"]
    ids = [c.id for c in t2i_cases.values() if c.id]
    assert ids.count(t2i_cases["ok_0"].id) == 2
    pair = edit_cases["identical_pair"].record
    assert pair["source_image"] == pair["target_image"]
    assert "source_image" not in edit_cases["missing_source_image"].record


def test_parquet_and_jsonl_carry_every_case(tmp_path: Path):
    paths = badinputs.write_bad_inputs(str(tmp_path), seed=0)
    expected = json.loads((tmp_path / "expected.json").read_text())
    cases = badinputs.make_bad_t2i_records(0)
    # Parquet: the contract's columns; the non-UTF-8 prompt is raw bytes in the string column.
    table = pq.read_table(paths["t2i.parquet"])
    assert table.schema.names == contract.RAW_T2I_SCHEMA.names
    assert table.num_rows == len(expected["records"]["t2i.parquet"])
    raw = table.column("prompt").cast(pa.binary()).to_pylist()
    names = [e["name"] for e in expected["records"]["t2i.parquet"]]
    assert raw[names.index("non_utf8_prompt")] == next(c for c in cases if c.name == "non_utf8_prompt").record["prompt"]
    assert table.column("source").to_pylist()[names.index("missing_source")] is None
    # JSONL: one line per case; malformed lines do not parse, the non-UTF-8 line does not decode.
    lines = (tmp_path / "t2i.jsonl").read_bytes().splitlines()
    assert len(lines) == len(expected["records"]["t2i.jsonl"])
    outcome = [e["expected"] for e in expected["records"]["t2i.jsonl"]]
    for line, want in zip(lines, outcome):
        if want == "malformed_row":
            with pytest.raises((json.JSONDecodeError, AssertionError)):
                assert isinstance(json.loads(line), dict)
        elif want == "prompt_invalid_text" and b"\xff" in line:
            with pytest.raises(UnicodeDecodeError):
                line.decode("utf-8")
        else:
            record = json.loads(line)
            assert isinstance(record, dict) and record["id"].startswith("bad-t2i-")
    edit = pq.read_table(paths["edit.parquet"])
    assert edit.schema.names == contract.RAW_EDIT_SCHEMA.names
    assert (tmp_path / "empty.jsonl").stat().st_size == 0
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(paths["truncated.parquet"])


def test_writes_to_s3(s3_bucket, s3_options):
    paths = badinputs.write_bad_inputs(f"{s3_bucket}/bad", seed=1, options=s3_options)
    assert storage.read_json(paths["expected.json"], s3_options)["seed"] == 1
    data = storage.read_bytes(paths["edit.parquet"], s3_options)
    assert pq.read_table(io.BytesIO(data)).num_rows == len(badinputs.make_bad_edit_records(1)) - 2
