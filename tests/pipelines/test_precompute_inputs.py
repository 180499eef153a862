"""precompute on inputs a hand-made or damaged curated set brings: a bad row is a reject with a
reason (never a crashed run), a bad set or store is one clear error before any work."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewstep import contract
from fewstep.storage import StorageError
from pipelines.precompute import PrecomputeError, run_precompute
from pipelines.precompute.encode import ImageTooSmall, _decode_or_reject, decode_image
from pipelines.precompute.fixtures import curated_rows, write_curated

REPO = Path(__file__).resolve().parents[2]
LOCAL = {"executor": "local", "rows_per_shard": 4, "dtype": "float32",
         "text_encoder": {"batch_size": 4}, "vae": {"batch_size": 4}}
NULLABLE = pa.schema([f.with_nullable(True) for f in contract.CURATED_SCHEMA],
                     metadata=contract.CURATED_SCHEMA.metadata)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from fewstep.models.tiny import init_tiny, load_tiny_config

    return init_tiny(str(tmp_path_factory.mktemp("teacher") / "tiny"),
                     load_tiny_config(REPO / "configs/models/tiny.yaml"), seed=0)


def _rejects(out: str) -> list[dict]:
    return [r for f in sorted(Path(out, "rejects").glob("precompute-*.parquet"))
            for r in pq.read_table(f).to_pylist()]


def test_rows_with_null_or_blank_fields_are_rejected_and_counts_reconcile(teacher, tmp_path):
    rows = curated_rows(6, 3, resolution=32)
    rows[0]["prompt"] = None
    rows[1]["prompt"] = "   "
    rows[2]["id"] = None
    rows[3]["category"] = None
    rows[6]["task"] = None
    curated = str(tmp_path / "curated")
    write_curated(curated, rows, parts=2, schema=NULLABLE)
    out = str(tmp_path / "out")
    manifest = run_precompute(LOCAL, teacher, curated, out, show_progress=False)

    rejects = _rejects(out)
    assert manifest["totals"]["rows"] + len(rejects) == len(rows)
    assert sorted(r["reason"] for r in rejects) == ["missing_field", "missing_field", "prompt_empty",
                                                    "prompt_empty", "schema"]
    blank = next(r for r in rejects if r["id"] == rows[1]["id"])
    assert blank["detail"] == "prompt is blank"
    assert blank["input"].endswith("curated/part-00000.parquet")  # the part file, not the folder
    assert manifest["totals"]["rejects"] == {"missing_field": 2, "prompt_empty": 2, "schema": 1}


@pytest.mark.parametrize(("column", "value", "message"), [
    ("prompt", 7, "column 'prompt' is int64, expected string"),
    ("image", "images/a.png", r"column 'image' is string, expected binary image bytes \(file paths\?"),
])
def test_columns_of_the_wrong_type_are_refused_before_any_work(teacher, tmp_path, column, value, message):
    rows = [{**row, column: value} for row in curated_rows(3, 0, resolution=32)]
    fields = [pa.field(column, pa.infer_type([value])) if f.name == column else f
              for f in contract.CURATED_SCHEMA]
    curated = str(tmp_path / "curated")
    write_curated(curated, rows, parts=1, schema=pa.schema(fields))
    with pytest.raises(PrecomputeError, match=message):
        run_precompute(LOCAL, teacher, curated, str(tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_a_damaged_curated_set_is_one_clear_error(teacher, tmp_path):
    curated = tmp_path / "curated"
    write_curated(str(curated), curated_rows(3, 2, resolution=32), parts=2)
    out = str(tmp_path / "out")
    manifest_file = curated / contract.MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())

    part = curated / manifest["shards"][0]["path"]
    original = part.read_bytes()
    table = pq.read_table(part)
    prompts = table.column("prompt").to_pylist()
    edited = table.set_column(table.column_names.index("prompt"), "prompt",
                              pa.array([prompts[0] + " at dusk", *prompts[1:]], pa.string()))
    pq.write_table(edited, part, row_group_size=8)  # changed after curate wrote the manifest
    with pytest.raises(PrecomputeError, match="modified after curate wrote it"):
        run_precompute(LOCAL, teacher, str(curated), out, show_progress=False)
    part.write_bytes(b"x" * len(original))  # the right size, but not Parquet
    with pytest.raises(PrecomputeError, match="cannot be opened"):
        run_precompute(LOCAL, teacher, str(curated), out, show_progress=False)
    part.write_bytes(original)

    escaping = {**manifest, "shards": [{**manifest["shards"][0], "path": "../elsewhere/part.parquet"}]}
    manifest_file.write_text(json.dumps(escaping))
    with pytest.raises(PrecomputeError, match="leaves the curated folder"):
        run_precompute(LOCAL, teacher, str(curated), out, show_progress=False)
    manifest_file.write_text("{not json")
    with pytest.raises(PrecomputeError, match="not valid JSON"):
        run_precompute(LOCAL, teacher, str(curated), out, show_progress=False)


def test_teachers_and_outputs_that_cannot_work_are_refused_up_front(teacher, tmp_path):
    curated = str(tmp_path / "curated")
    write_curated(curated, curated_rows(3, 0, resolution=32), parts=1)
    out = str(tmp_path / "out")

    no_vae = tmp_path / "no-vae"
    shutil.copytree(teacher, no_vae)
    for weights in (no_vae / "vae").glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(PrecomputeError, match=r"no weights in vae/"):
        run_precompute(LOCAL, str(no_vae), curated, out, show_progress=False)
    with pytest.raises(PrecomputeError, match="is a file; pass the pipeline directory"):
        run_precompute(LOCAL, str(Path(teacher) / "model_index.json"), curated, out, show_progress=False)

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        run_precompute(LOCAL, teacher, curated, str(a_file / "out"), show_progress=False)
    with pytest.raises(PrecomputeError, match=r"text_encoder.num_gpus: 1 with executor: local"):
        run_precompute({**LOCAL, "text_encoder": {"num_gpus": 1}}, teacher, curated, out, show_progress=False)


def test_an_s3_output_in_a_missing_bucket_is_refused_before_any_work(teacher, tmp_path, s3_options):
    curated = str(tmp_path / "curated")
    write_curated(curated, curated_rows(2, 0, resolution=32), parts=1)
    with pytest.raises(StorageError, match="bucket s3://no-such-bucket-here does not exist"):
        run_precompute(LOCAL, teacher, curated, "s3://no-such-bucket-here/shards", storage=s3_options,
                       show_progress=False)


def test_another_plan_in_the_output_names_what_differs(teacher, tmp_path):
    curated = str(tmp_path / "curated")
    write_curated(curated, curated_rows(3, 0, resolution=32), parts=1)
    out = str(tmp_path / "out")
    run_precompute(LOCAL, teacher, curated, out, show_progress=False)
    with pytest.raises(PrecomputeError, match=r"these differ: config \(dtype: 'float32' -> 'bfloat16'\)"):
        run_precompute({**LOCAL, "dtype": "bfloat16"}, teacher, curated, out, show_progress=False)


def _png(size: tuple[int, int], mode: str = "RGB", colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_are_converted_as_curate_converts_and_bad_ones_get_their_reason():
    clear = _png((16, 16), "RGBA", (0, 0, 0, 0))
    assert decode_image(clear, 16).getpixel((3, 3)) == (255, 255, 255)  # alpha on white, as in curate
    with pytest.raises(ImageTooSmall):
        decode_image(_png((1, 1)), None, multiple=16)  # own size: too small for the VAE
    assert decode_image(_png((1, 1)), 32).size == (32, 32)  # a fixed resolution resizes, as configured

    whole = _png((32, 32))
    table = pa.table({"image": pa.array([whole[: len(whole) // 2], _png((4, 40)), b"junk"], pa.binary())})
    reasons, details = [None] * 3, [None] * 3
    images = _decode_or_reject(table, "image", None, reasons, details, multiple=16)
    assert reasons == ["image_truncated", "image_too_small", "image_undecodable"]
    assert images == [None, None, None] and all(details)
