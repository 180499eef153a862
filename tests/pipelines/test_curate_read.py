"""Tolerant readers: Parquet, JSONL, JSON, WebDataset tars, image paths; bad files become rejects."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewstep.contract import RAW_EDIT_SCHEMA, RAW_T2I_SCHEMA, REJECT_REASONS
from pipelines.curate.read import InputError, InputFile, iter_file_rows, list_inputs


def _png(colour=(200, 30, 30), size=(32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _rows(path) -> list[dict]:
    return list(iter_file_rows(InputFile(str(path), 0, 0, path.name), None))


def test_parquet_kind_follows_schema(tmp_path):
    t2i = [{"id": "a", "prompt": "a red square", "image": _png(), "category": None, "source": "s", "meta": None}]
    edit = [{"id": "b", "instruction": "make it blue", "source_image": _png(), "target_image": _png((0, 0, 255)),
             "edit_category": "scene", "source": "s", "meta": "{}"}]
    pq.write_table(pa.Table.from_pylist(t2i, schema=RAW_T2I_SCHEMA), tmp_path / "t.parquet")
    pq.write_table(pa.Table.from_pylist(edit, schema=RAW_EDIT_SCHEMA), tmp_path / "e.parquet")
    (t_row,), (e_row,) = _rows(tmp_path / "t.parquet"), _rows(tmp_path / "e.parquet")
    assert (t_row["task"], t_row["prompt"], t_row["reason"]) == ("t2i", "a red square", None)
    assert (e_row["task"], e_row["prompt"], e_row["category"], e_row["reason"]) == ("edit", "make it blue", "scene", None)
    assert e_row["source_image"] and e_row["image"]
    assert t_row["input"] == "t.parquet#row=0"


def test_parquet_of_another_schema_rejects_each_row(tmp_path):
    pq.write_table(pa.table({"id": ["x", "y"], "text": ["a", "b"]}), tmp_path / "other.parquet")
    rows = _rows(tmp_path / "other.parquet")
    assert [(r["id"], r["reason"]) for r in rows] == [("x", "schema"), ("y", "schema")]


def test_jsonl_bad_lines_and_image_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "one.png").write_bytes(_png())
    lines = [
        json.dumps({"id": "p1", "prompt": "a red square on white", "image": "imgs/one.png", "source": "s"}),
        json.dumps({"id": "p2", "prompt": "a missing picture", "image": "imgs/nope.png", "source": "s"}),
        json.dumps({"id": "p3", "prompt": "meta as an object", "source": "s", "meta": {"k": 1}}),
        "{broken",
        "",
        json.dumps(["not", "an", "object"]),
    ]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    rows = _rows(tmp_path / "c.jsonl")
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("p1", None), ("p2", "missing_field"), ("p3", None), (None, "malformed_row"), (None, "malformed_row")]
    assert rows[0]["image"] == _png()
    assert json.loads(rows[2]["meta"]) == {"k": 1}
    assert "c.jsonl#line=4" == rows[3]["input"]  # blank line skipped, line numbers kept


def _tar_bytes(samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_webdataset_tar_samples_and_truncation(tmp_path):
    data = _tar_bytes([
        ("s000", {"png": _png(), "txt": b"a red square", "json": json.dumps({"source": "wds"}).encode()}),
        ("s001", {"source.png": _png(), "target.png": _png((0, 0, 255)), "instruction.txt": b"make it blue"}),
        ("s002", {"png": _png((0, 255, 0)), "txt": b"a green square"}),
    ])
    (tmp_path / "ok.tar").write_bytes(data)
    rows = _rows(tmp_path / "ok.tar")
    assert [(r["id"], r["task"], r["reason"]) for r in rows] == [
        ("s000", "t2i", None), ("s001", "edit", None), ("s002", "t2i", None)]
    assert rows[0]["source"] == "wds" and rows[1]["prompt"] == "make it blue"
    # Cut inside the third sample: the first two survive, the rest is one malformed reject.
    (tmp_path / "cut.tar").write_bytes(data[: data.index(b"s002.png") + 512 + 20])
    cut = _rows(tmp_path / "cut.tar")
    assert [r["reason"] for r in cut[:2]] == [None, None]
    assert cut[-1]["reason"] == "malformed_row" and "tar" in cut[-1]["detail"]


def test_unreadable_files_are_one_reject_each(tmp_path):
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert [r["reason"] for r in _rows(tmp_path / "zero.parquet")] == ["malformed_row"]
    assert [r["reason"] for r in _rows(tmp_path / "junk.parquet")] == ["malformed_row"]
    assert _rows(tmp_path / "empty.jsonl") == []


def test_every_reason_is_in_the_contract(tmp_path):
    from fewstep.bench.badinputs import write_bad_inputs

    paths = write_bad_inputs(str(tmp_path))
    for name, uri in paths.items():
        if name == "expected.json":
            continue
        for row in iter_file_rows(InputFile(uri, 0, 0, name), None):
            assert row["reason"] is None or row["reason"] in REJECT_REASONS


def test_list_inputs_errors_and_order(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list_inputs([str(tmp_path / "missing")], [".parquet"], None)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="no files ending"):
        list_inputs([str(tmp_path / "d")], [".parquet"], None)
    for name in ("b.parquet", "a.jsonl", "corpus.json"):
        (tmp_path / "d" / name).write_bytes(b"")
    files = list_inputs([str(tmp_path / "d")], [".parquet", ".jsonl"], None)
    assert [f.label for f in files] == ["d/a.jsonl", "d/b.parquet"]  # sorted; manifests left out


def test_a_curated_dataset_reads_back_as_raw_records(tmp_path):
    """A curate output is a valid input (curate again to another composition): its directory
    yields the manifest's parts only, rows map back to the raw contract, bad rows are rejects."""
    from fewstep.contract import CURATED_SCHEMA, ShardEntry, build_manifest

    out = tmp_path / "curated-set"
    (out / "curated").mkdir(parents=True)
    (out / "rejects").mkdir()
    common = {"source": "bench", "meta": "{}", "caption_origin": "given"}
    rows = [
        {"id": "t-1", "origin_id": "t-1", "task": "t2i", "prompt": "a red square", "category": "portrait",
         "image": _png(), "source_image": None, **common},
        {"id": "e-1", "origin_id": "e-1", "task": "edit", "prompt": "make it blue", "category": "scene",
         "image": _png((0, 0, 255)), "source_image": _png(), **common, "caption_origin": "captioned"},
        {"id": "x-1", "origin_id": "x-1", "task": "video", "prompt": "p", "category": "scene",
         "image": _png(), "source_image": None, **common},
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=CURATED_SCHEMA), out / "curated" / "part-00000.parquet")
    pq.write_table(pa.table({"id": ["r"]}), out / "rejects" / "part-00000.parquet")
    part = out / "curated" / "part-00000.parquet"
    entry = ShardEntry("curated/part-00000.parquet", len(rows), "0" * 64, part.stat().st_size)
    manifest = build_manifest(kind="curated", config={}, config_hash="test", shards=[entry])
    (out / "manifest.json").write_text(json.dumps({**manifest, "shards": [{"path": entry.path}]}))
    with pytest.raises(InputError, match=r"broken manifest.json .*shards\[0\]\.rows"):
        list_inputs([str(out)], [".parquet"], None)
    (out / "manifest.json").write_text(json.dumps(manifest))

    (file,) = list_inputs([str(out)], [".parquet"], None)
    assert file.label == "curated-set/curated/part-00000.parquet"
    t_row, e_row, bad = iter_file_rows(file, None)
    assert (t_row["task"], t_row["prompt"], t_row["category"], t_row["reason"]) == ("t2i", "a red square", "portrait", None)
    assert t_row["image"] == rows[0]["image"] and t_row["source_image"] is None
    assert (e_row["task"], e_row["prompt"], e_row["category"], e_row["reason"]) == ("edit", "make it blue", "scene", None)
    assert (e_row["image"], e_row["source_image"]) == (rows[1]["image"], rows[1]["source_image"])
    assert e_row["caption_origin"] == "captioned"
    assert (bad["id"], bad["reason"]) == ("x-1", "schema") and "'video'" in bad["detail"]


def test_a_tar_cut_between_members_is_not_read_as_complete(tmp_path):
    data = _tar_bytes([("s000", {"png": _png(), "txt": b"a red square"}),
                       ("s001", {"png": _png(), "txt": b"a blue square"})])
    boundary = data.index(b"s001.png")  # the start of s001's first header: tarfile stops quietly here
    (tmp_path / "cut.tar").write_bytes(data[:boundary])
    rows = _rows(tmp_path / "cut.tar")
    assert rows[-1]["reason"] == "malformed_row" and "end-of-archive" in rows[-1]["detail"]
    assert not any(r["reason"] is None and r["id"] == "s001" for r in rows)


def test_records_exported_with_one_schema_for_both_tasks(tmp_path):
    """pandas-style exports write the other task's fields as null; the row's own fields decide."""
    t2i = {"id": "t", "prompt": "a red square", "image": _png(), "instruction": None, "source_image": None,
           "target_image": None, "edit_category": None, "category": None, "source": "s"}
    edit = {"id": "e", "prompt": None, "image": None, "instruction": "make it blue", "source_image": _png(),
            "target_image": _png((0, 0, 255)), "edit_category": "scene", "category": None, "source": "s"}
    pq.write_table(pa.Table.from_pylist([t2i, edit]), tmp_path / "mixed.parquet")
    rows = _rows(tmp_path / "mixed.parquet")
    assert [(r["id"], r["task"], r["reason"]) for r in rows] == [("t", "t2i", None), ("e", "edit", None)]
    line = {**t2i, "image": "imgs/one.png"}
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "one.png").write_bytes(_png())
    (tmp_path / "mixed.jsonl").write_text(json.dumps(line) + "\n")
    assert [(r["task"], r["reason"]) for r in _rows(tmp_path / "mixed.jsonl")] == [("t2i", None)]


def test_odd_jsonl_content_is_a_reject_not_a_crash(tmp_path):
    lines = [
        "\ufeff" + json.dumps({"id": "bom", "prompt": "a red square", "source": "s"}),  # BOM on line 1
        json.dumps({"id": "f", "prompt": "a red square", "image": {"bytes": 3.5}, "source": "s"}),
        json.dumps({"id": "d", "prompt": "a red square", "image": {"bytes": {"x": 1}}, "source": "s"}),
        json.dumps({"id": "r", "prompt": "a red square", "image": {"bytes": [300]}, "source": "s"}),
        "[" * 100000 + "]" * 100000,
    ]
    (tmp_path / "odd.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = _rows(tmp_path / "odd.jsonl")
    assert [(r["id"], r["reason"]) for r in rows] == [
        ("bom", None), ("f", "schema"), ("d", "schema"), ("r", "schema"), (None, "malformed_row")]
    assert "image.bytes" in rows[1]["detail"]


def test_parquet_image_columns_may_hold_paths(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "one.png").write_bytes(_png())
    rows = [{"id": "p", "prompt": "a red square", "image": "imgs/one.png", "source": "s"},
            {"id": "q", "prompt": "a lost square", "image": "imgs/nope.png", "source": "s"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "paths.parquet")
    got = _rows(tmp_path / "paths.parquet")
    assert [(r["id"], r["reason"]) for r in got] == [("p", None), ("q", "missing_field")]
    assert got[0]["image"] == _png()


def test_an_output_inside_an_input_is_refused(tmp_path):
    from pipelines.curate.run import run_curate

    (tmp_path / "corpus").mkdir()
    with pytest.raises(InputError, match="inside --input"):
        run_curate(str(Path(__file__).resolve().parents[2] / "configs" / "curate" / "default.yaml"),
                   [str(tmp_path / "corpus")], str(tmp_path / "corpus" / "out"))


def test_data_files_left_out_only_by_case_or_compression_are_named(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"id": "a", "prompt": "a red square", "source": "s"}) + "\n")
    (corpus / "B.JSONL").write_text("{}\n")
    (corpus / "c.jsonl.gz").write_bytes(b"\x1f\x8b")
    (corpus / "picture.png").write_bytes(_png())  # an image beside the JSONL: expected, not named
    with caplog.at_level("WARNING", logger="pipelines.curate.read"):
        files = list_inputs([str(corpus)], [".parquet", ".jsonl", ".json", ".tar"], None)
    assert [f.ref for f in files] == ["corpus/a.jsonl"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "2 file(s) skipped" in warned and "B.JSONL" in warned and "c.jsonl.gz" in warned
    assert "picture.png" not in warned
