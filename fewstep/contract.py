"""The stage contract: record and shard schemas, manifest format, validation.

Every stage imports its schemas from here, and nowhere else defines them. Bump
``SCHEMA_VERSION`` whenever a schema changes shape; readers refuse manifests of a
different major version with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

SCHEMA_VERSION = "1.0"

Task = Literal["t2i", "edit"]
TASKS: tuple[str, ...] = ("t2i", "edit")

# ---------------------------------------------------------------------------
# Raw records (what a corpus provides)
# ---------------------------------------------------------------------------

RAW_T2I_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
        pa.field("category", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
        pa.field("meta", pa.string(), nullable=True),
    ],
    metadata={"fewstep.schema": "raw_t2i", "fewstep.version": SCHEMA_VERSION},
)

RAW_EDIT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("instruction", pa.string(), nullable=False),
        pa.field("source_image", pa.binary(), nullable=False),
        pa.field("target_image", pa.binary(), nullable=True),
        pa.field("edit_category", pa.string(), nullable=True),
        pa.field("source", pa.string(), nullable=False),
        pa.field("meta", pa.string(), nullable=True),
    ],
    metadata={"fewstep.schema": "raw_edit", "fewstep.version": SCHEMA_VERSION},
)

# ---------------------------------------------------------------------------
# Curated records (after filter, caption/tag, rebalance): one schema for both tasks
# ---------------------------------------------------------------------------

CURATED_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),  # unique in the curated set
        pa.field("origin_id", pa.string(), nullable=False),  # raw id (repeats share it)
        pa.field("task", pa.string(), nullable=False),  # "t2i" | "edit"
        pa.field("prompt", pa.string(), nullable=False),  # T2I prompt or edit instruction
        pa.field("category", pa.string(), nullable=False),  # T2I category or edit category
        pa.field("image", pa.binary(), nullable=True),  # T2I image or edit target (PNG)
        pa.field("source_image", pa.binary(), nullable=True),  # edit source (PNG)
        pa.field("source", pa.string(), nullable=False),
        pa.field("caption_origin", pa.string(), nullable=False),  # given | captioned
        pa.field("meta", pa.string(), nullable=True),
    ],
    metadata={"fewstep.schema": "curated", "fewstep.version": SCHEMA_VERSION},
)

# ---------------------------------------------------------------------------
# Precomputed shard records (what the trainer streams)
# Tensors are stored as raw little-endian bytes plus a shape and the dtype name,
# so readers can view them with ``np.frombuffer`` without a copy.
# ---------------------------------------------------------------------------

TENSOR_DTYPES = ("float32", "float16", "bfloat16")

SHARD_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),  # dtype of every tensor column
        pa.field("prompt_embeds", pa.binary(), nullable=False),  # [seq, dim]
        pa.field("prompt_embeds_shape", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_mask", pa.binary(), nullable=False),  # uint8 [seq]
        pa.field("negative_embeds", pa.binary(), nullable=True),  # edit: empty prompt + source
        pa.field("negative_embeds_shape", pa.list_(pa.int32()), nullable=True),
        pa.field("negative_mask", pa.binary(), nullable=True),
        pa.field("latents", pa.binary(), nullable=True),  # T2I image / edit target [C, H, W]
        pa.field("latents_shape", pa.list_(pa.int32()), nullable=True),
        pa.field("source_latents", pa.binary(), nullable=True),  # edit source [C, H, W]
        pa.field("source_latents_shape", pa.list_(pa.int32()), nullable=True),
    ],
    metadata={"fewstep.schema": "shard", "fewstep.version": SCHEMA_VERSION},
)

REJECT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=True),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=True),
        pa.field("input", pa.string(), nullable=True),  # which input file/URI it came from
    ],
    metadata={"fewstep.schema": "reject", "fewstep.version": SCHEMA_VERSION},
)

# Reject reasons: every dropped row carries one of these (stage, reason, detail).
REJECT_REASONS: dict[str, str] = {
    "malformed_row": "a line, row or file that cannot be parsed",
    "schema": "breaks the raw record contract (wrong type or invalid field)",
    "missing_field": "a required field is absent or empty",
    "duplicate_id": "an id seen before (the first occurrence is kept)",
    "image_empty": "zero-byte image",
    "image_undecodable": "image bytes that no decoder accepts",
    "image_truncated": "image data ends early",
    "image_too_small": "shorter side below the configured minimum",
    "aspect_ratio": "aspect ratio beyond the configured limit",
    "too_many_pixels": "pixel count beyond the limit (checked from the header, before decoding)",
    "duplicate_image": "same image content as a kept record",
    "near_duplicate_image": "perceptual hash within the configured distance of a kept record",
    "duplicate_prompt": "same prompt as a kept record",
    "near_duplicate_prompt": "prompt nearly identical to a kept record",
    "prompt_empty": "empty prompt or instruction",
    "prompt_too_short": "prompt shorter than the configured minimum",
    "prompt_too_long": "prompt longer than the configured maximum",
    "prompt_invalid_text": "not valid UTF-8, or control characters",
    "banned_word": "contains a configured banned word",
    "nsfw": "NSFW classifier score above the threshold",
    "edit_identical_pair": "edit source and target are the same image",
    "no_usable_prompt": "no prompt left after captioning",
    "unknown_category": "category not declared in the composition",
    "over_budget": "not selected by the rebalancer (category above its target)",
    "not_in_composition": "task or category has no target in the declared composition",
}


SCHEMAS: dict[str, pa.Schema] = {
    "raw_t2i": RAW_T2I_SCHEMA,
    "raw_edit": RAW_EDIT_SCHEMA,
    "curated": CURATED_SCHEMA,
    "shard": SHARD_SCHEMA,
    "reject": REJECT_SCHEMA,
}


class ContractError(ValueError):
    """A record or file that breaks the contract. Names the record, field and expectation."""

    def __init__(self, record_id: str | None, field: str, expected: str, got: Any = None):
        self.record_id = record_id
        self.field = field
        self.expected = expected
        self.got = got
        where = f"record {record_id!r}" if record_id is not None else "record without id"
        got_text = "" if got is None else f", got {_describe(got)}"
        super().__init__(f"{where}: field {field!r}: expected {expected}{got_text}")


def _describe(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return f"{len(value)} bytes"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_string(record: dict, rid: str | None, name: str, required: bool) -> None:
    value = record.get(name)
    if value is None:
        if required:
            raise ContractError(rid, name, "a string (required)", "missing")
        return
    if not isinstance(value, str):
        raise ContractError(rid, name, "a string", type(value).__name__)
    if required and not value.strip():
        raise ContractError(rid, name, "a non-empty string", value)


def _check_bytes(record: dict, rid: str | None, name: str, required: bool) -> None:
    value = record.get(name)
    if value is None:
        if required:
            raise ContractError(rid, name, "encoded image bytes (required)", "missing")
        return
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ContractError(rid, name, "encoded image bytes", type(value).__name__)


def _check_meta(record: dict, rid: str | None) -> None:
    meta = record.get("meta")
    if meta is None:
        return
    if not isinstance(meta, str):
        raise ContractError(rid, "meta", "a JSON string", type(meta).__name__)
    try:
        json.loads(meta)
    except json.JSONDecodeError as exc:
        raise ContractError(rid, "meta", f"valid JSON ({exc.msg})", meta) from None


def validate_raw_t2i(record: dict) -> None:
    """Raise ContractError if ``record`` is not a valid raw T2I record."""
    rid = record.get("id") if isinstance(record.get("id"), str) else None
    _check_string(record, rid, "id", required=True)
    _check_string(record, rid, "prompt", required=True)
    _check_bytes(record, rid, "image", required=False)
    _check_string(record, rid, "category", required=False)
    _check_string(record, rid, "source", required=True)
    _check_meta(record, rid)


def validate_raw_edit(record: dict) -> None:
    """Raise ContractError if ``record`` is not a valid raw edit record."""
    rid = record.get("id") if isinstance(record.get("id"), str) else None
    _check_string(record, rid, "id", required=True)
    _check_string(record, rid, "instruction", required=True)
    _check_bytes(record, rid, "source_image", required=True)
    _check_bytes(record, rid, "target_image", required=False)
    _check_string(record, rid, "edit_category", required=False)
    _check_string(record, rid, "source", required=True)
    _check_meta(record, rid)


def validate_curated(record: dict) -> None:
    rid = record.get("id") if isinstance(record.get("id"), str) else None
    for name in ("id", "origin_id", "prompt", "category", "source", "caption_origin"):
        _check_string(record, rid, name, required=True)
    if record.get("task") not in TASKS:
        raise ContractError(rid, "task", f"one of {TASKS}", record.get("task"))
    if record["task"] == "edit":
        _check_bytes(record, rid, "source_image", required=True)
    _check_bytes(record, rid, "image", required=False)
    _check_meta(record, rid)


def detect_raw_kind(schema: pa.Schema) -> str:
    """Tell a raw T2I input from a raw edit input by its columns."""
    names = set(schema.names)
    if {"instruction", "source_image"} <= names:
        return "raw_edit"
    if "prompt" in names:
        return "raw_t2i"
    raise ContractError(
        None,
        "<schema>",
        "a raw T2I table (id, prompt, ...) or a raw edit table (id, instruction, source_image, ...)",
        sorted(names),
    )


# ---------------------------------------------------------------------------
# Tensor columns
# ---------------------------------------------------------------------------


def tensor_to_bytes(array: np.ndarray, dtype: str) -> tuple[bytes, list[int]]:
    """Encode an array as raw little-endian bytes of ``dtype`` plus its shape."""
    if dtype not in TENSOR_DTYPES:
        raise ContractError(None, "dtype", f"one of {TENSOR_DTYPES}", dtype)
    array = np.asarray(array)
    if dtype == "bfloat16":
        as32 = np.ascontiguousarray(array, dtype=np.float32)
        # Round to nearest even on the upper 16 bits.
        bits = as32.view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        return rounded.tobytes(), list(array.shape)
    return np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes(), list(
        array.shape
    )


def tensor_from_bytes(data: bytes, shape: Iterable[int], dtype: str) -> np.ndarray:
    """Inverse of :func:`tensor_to_bytes`; returns float32 for bfloat16, else a view."""
    shape = tuple(int(s) for s in shape)
    if dtype == "bfloat16":
        raw = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
        return raw.view(np.float32).reshape(shape)
    if dtype not in TENSOR_DTYPES:
        raise ContractError(None, "dtype", f"one of {TENSOR_DTYPES}", dtype)
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def mask_to_bytes(mask: np.ndarray) -> bytes:
    return np.ascontiguousarray(mask, dtype=np.uint8).tobytes()


def mask_from_bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


# ---------------------------------------------------------------------------
# Manifest and composition files
# ---------------------------------------------------------------------------

MANIFEST_NAME = "manifest.json"
COMPOSITION_NAME = "composition.json"


@dataclass(frozen=True)
class ShardEntry:
    path: str  # relative to the dataset root
    rows: int
    sha256: str
    bytes: int

    def to_json(self) -> dict:
        return {"path": self.path, "rows": self.rows, "sha256": self.sha256, "bytes": self.bytes}


def build_manifest(
    *,
    kind: str,
    config: dict,
    config_hash: str,
    shards: list[ShardEntry],
    teacher: dict | None = None,
    totals: dict | None = None,
    extra: dict | None = None,
) -> dict:
    """The manifest written last by every stage that publishes a dataset."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": kind,
        "config": config,
        "config_hash": config_hash,
        "teacher": teacher,
        "shards": [s.to_json() for s in sorted(shards, key=lambda s: s.path)],
        "totals": {"rows": sum(s.rows for s in shards), **(totals or {})},
    }
    if extra:
        manifest.update(extra)
    return manifest


def check_manifest(manifest: dict, expected_kind: str | None = None) -> dict:
    """Validate a manifest loaded from JSON; raises ContractError naming the field."""
    version = manifest.get("schema_version")
    if not isinstance(version, str):
        raise ContractError("manifest", "schema_version", "a version string", version)
    if version.split(".")[0] != SCHEMA_VERSION.split(".")[0]:
        raise ContractError(
            "manifest",
            "schema_version",
            f"major version {SCHEMA_VERSION.split('.')[0]} (re-run the producing stage)",
            version,
        )
    if expected_kind is not None and manifest.get("kind") != expected_kind:
        raise ContractError("manifest", "kind", repr(expected_kind), manifest.get("kind"))
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ContractError("manifest", "shards", "a list of shard entries", shards)
    for index, shard in enumerate(shards):
        for key, kind in (("path", str), ("rows", int), ("sha256", str), ("bytes", int)):
            if not isinstance(shard.get(key), kind):
                raise ContractError("manifest", f"shards[{index}].{key}", kind.__name__, shard.get(key))
    return manifest
