"""The stage contract: valid records pass, bad ones name the record, field and expectation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from fewstep import contract
from fewstep.contract import ContractError


def _t2i(**overrides):
    record = {"id": "r1", "prompt": "a red apple", "image": b"\x89PNG...", "category": "portrait",
              "source": "unit", "meta": json.dumps({"k": 1})}
    record.update(overrides)
    return record


def _edit(**overrides):
    record = {"id": "e1", "instruction": "make it blue", "source_image": b"png", "target_image": None,
              "edit_category": "scene", "source": "unit", "meta": None}
    record.update(overrides)
    return record


def test_valid_records_pass():
    contract.validate_raw_t2i(_t2i())
    contract.validate_raw_t2i(_t2i(image=None, category=None, meta=None))
    contract.validate_raw_edit(_edit())


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        ({"prompt": None}, "prompt", "a string (required)"),
        ({"prompt": "   "}, "prompt", "a non-empty string"),
        ({"prompt": 5}, "prompt", "a string"),
        ({"image": "not-bytes"}, "image", "encoded image bytes"),
        ({"meta": "{broken"}, "meta", "valid JSON"),
        ({"source": None}, "source", "a string (required)"),
    ],
)
def test_bad_t2i_records_name_record_field_and_expectation(overrides, field, expected):
    with pytest.raises(ContractError) as info:
        contract.validate_raw_t2i(_t2i(**overrides))
    err = info.value
    assert err.record_id == "r1"
    assert err.field == field
    assert expected in err.expected
    assert "record 'r1'" in str(err) and repr(field) in str(err)


def test_missing_id_is_reported_without_id():
    with pytest.raises(ContractError) as info:
        contract.validate_raw_t2i(_t2i(id=None))
    assert info.value.field == "id"
    assert "record without id" in str(info.value)


def test_edit_requires_source_image():
    with pytest.raises(ContractError) as info:
        contract.validate_raw_edit(_edit(source_image=None))
    assert info.value.field == "source_image"


def test_curated_task_must_be_known():
    record = {"id": "c1", "origin_id": "r1", "task": "video", "prompt": "p", "category": "text",
              "source": "s", "caption_origin": "given"}
    with pytest.raises(ContractError) as info:
        contract.validate_curated(record)
    assert info.value.field == "task"


def test_detect_raw_kind_from_schema():
    assert contract.detect_raw_kind(contract.RAW_T2I_SCHEMA) == "raw_t2i"
    assert contract.detect_raw_kind(contract.RAW_EDIT_SCHEMA) == "raw_edit"
    with pytest.raises(ContractError):
        contract.detect_raw_kind(pa.schema([("foo", pa.string())]))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_tensor_round_trip(dtype):
    rng = np.random.default_rng(0)
    array = rng.standard_normal((3, 4, 5)).astype(np.float32)
    data, shape = contract.tensor_to_bytes(array, dtype)
    back = contract.tensor_from_bytes(data, shape, dtype)
    assert back.shape == array.shape
    tolerance = {"float32": 0, "float16": 1e-3, "bfloat16": 1e-2}[dtype]
    np.testing.assert_allclose(back.astype(np.float32), array, atol=tolerance * 4, rtol=tolerance * 2)


def test_tensor_rejects_unknown_dtype():
    with pytest.raises(ContractError):
        contract.tensor_to_bytes(np.zeros(2), "int7")


def test_manifest_round_trip_and_version_check():
    shards = [contract.ShardEntry("shards/part-00001.parquet", 5, "b" * 64, 100),
              contract.ShardEntry("shards/part-00000.parquet", 7, "a" * 64, 120)]
    manifest = contract.build_manifest(kind="shards", config={"x": 1}, config_hash="h", shards=shards)
    assert manifest["totals"]["rows"] == 12
    assert [s["path"] for s in manifest["shards"]] == sorted(s.path for s in shards)
    loaded = json.loads(json.dumps(manifest))
    assert contract.check_manifest(loaded, "shards") is loaded
    loaded["schema_version"] = "2.0"
    with pytest.raises(ContractError, match="major version"):
        contract.check_manifest(loaded)
    with pytest.raises(ContractError, match="kind"):
        contract.check_manifest(manifest, "curated")
    broken = dict(manifest, shards=[{"path": "x", "rows": "many", "sha256": "s", "bytes": 1}])
    with pytest.raises(ContractError, match=r"shards\[0\]\.rows"):
        contract.check_manifest(broken)


def test_schemas_carry_version_metadata():
    for name, schema in contract.SCHEMAS.items():
        assert schema.metadata[b"fewstep.version"] == contract.SCHEMA_VERSION.encode()
        assert schema.metadata[b"fewstep.schema"] == name.encode()
