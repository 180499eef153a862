"""Turn one raw record (a dict from Parquet, JSONL or a WebDataset sample) into a working row.

Field checks follow the raw contract (``fewstep.contract.RAW_T2I_SCHEMA`` / ``RAW_EDIT_SCHEMA``);
a record that breaks it becomes a reject row (``malformed_row``, ``schema``, ``missing_field`` or
``prompt_invalid_text``), never an exception. Prompts are checked later, after captioning.
"""

from __future__ import annotations

import base64
import json
import posixpath
from typing import Any

from fewstep import storage
from fewstep.storage import StorageOptions
from pipelines.curate.records import new_row, reject

STAGE = "read"

EDIT_KEYS = ("instruction", "source_image", "target_image", "edit_category")


def kind_of(record: dict) -> str:
    """``edit`` when the record carries any edit field with a value, else ``t2i`` (exports with one
    schema for both tasks write the other task's fields as null)."""
    return "edit" if any(record.get(key) is not None for key in EDIT_KEYS) else "t2i"


class FieldError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _text(value: Any, name: str, *, invalid_reason: str = "schema") -> str | None:
    """A string field: bytes are decoded as UTF-8 (invalid bytes reject the record)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FieldError(invalid_reason, f"{name}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    if not isinstance(value, str):
        raise FieldError("schema", f"{name}: expected a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates: a JSON line whose bytes were not valid UTF-8 (decoded with surrogateescape).
        raise FieldError(invalid_reason, f"{name}: not valid UTF-8") from None
    return value


def _required_text(record: dict, name: str) -> str:
    value = _text(record.get(name), name)
    if value is None or not value.strip():
        raise FieldError("missing_field", f"{name}: required, {'absent' if value is None else 'empty'}")
    return value


def _meta(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    text = _text(value, "meta")
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        raise FieldError("schema", f"meta: not valid JSON ({exc.msg})") from None
    return text


def _image(value: Any, name: str, base_dir: str, options: StorageOptions | None) -> bytes | None:
    """Image bytes, or a path (relative to the input file) / data URI / {"bytes"|"path": ...}."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            data = value["bytes"]
            if isinstance(data, str):
                return _b64(data, name)
            try:
                if not isinstance(data, (bytes, bytearray, memoryview, list)):
                    raise TypeError(type(data).__name__)
                return bytes(data)
            except (TypeError, ValueError):
                raise FieldError("schema", f"{name}.bytes: expected bytes or base64 text, got "
                                 f"{type(data).__name__}") from None
        if value.get("path") is not None:
            value = value["path"]
        else:
            raise FieldError("schema", f"{name}: an object needs 'bytes' or 'path'")
    if not isinstance(value, str):
        raise FieldError("schema", f"{name}: expected image bytes or a path, got {type(value).__name__}")
    if value.startswith("data:"):
        return _b64(value.split(",", 1)[-1], name)
    if value.startswith("base64:"):
        return _b64(value[len("base64:"):], name)
    if not value.strip():
        return b""  # an empty path is an empty image: the image filters reject it as image_empty
    uri = value if storage.is_s3(value) or value.startswith(("/", "file://")) else posixpath.join(base_dir, value)
    try:
        return storage.read_bytes(uri, options)
    except (OSError, ValueError) as exc:
        raise FieldError("missing_field", f"{name}: image path {value!r} cannot be read ({type(exc).__name__})") from None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _b64(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise FieldError("schema", f"{name}: invalid base64") from None


def curated_to_raw(record: dict) -> tuple[dict, Any]:
    """A row of a curated dataset (``CURATED_SCHEMA``) as a raw record and its task, so a curated set
    can be curated again (another composition, stricter filters). A task other than ``t2i`` or
    ``edit`` comes back as found, with no fields mapped; the caller rejects the row."""
    task = record.get("task")
    task = bytes(task).decode("utf-8", "replace") if isinstance(task, (bytes, bytearray)) else task
    common = {"id": record.get("id"), "source": record.get("source"), "meta": record.get("meta")}
    if task == "edit":
        return {**common, "instruction": record.get("prompt"), "edit_category": record.get("category"),
                "source_image": record.get("source_image"), "target_image": record.get("image")}, task
    if task == "t2i":
        return {**common, "prompt": record.get("prompt"), "category": record.get("category"),
                "image": record.get("image")}, task
    return common, task


def parse_record(
    record: Any,
    *,
    order: int,
    input_ref: str,
    base_dir: str,
    options: StorageOptions | None,
    kind: str | None = None,
) -> dict:
    """One raw record -> one working row (kept, or rejected with its reason)."""
    if not isinstance(record, dict):
        return reject(new_row(order=order, input=input_ref), STAGE, "malformed_row",
                      f"expected an object, got {type(record).__name__}")
    kind = kind or kind_of(record)
    row = new_row(order=order, input=input_ref, task=kind, caption_origin="given")
    raw_id = record.get("id")
    if isinstance(raw_id, str) and _encodable(raw_id):
        row["id"] = raw_id  # kept on the reject row too, so a reject names its record
    try:
        row["id"] = _required_text(record, "id")
        row["source"] = _required_text(record, "source")
        row["meta"] = _meta(record.get("meta"))
        if kind == "edit":
            row["prompt"] = _text(record.get("instruction"), "instruction", invalid_reason="prompt_invalid_text")
            row["category"] = _text(record.get("edit_category"), "edit_category")
            source = _image(record.get("source_image"), "source_image", base_dir, options)
            if source is None:
                raise FieldError("missing_field", "source_image: required, absent")
            row["source_image"] = source
            row["image"] = _image(record.get("target_image"), "target_image", base_dir, options)
        else:
            row["prompt"] = _text(record.get("prompt"), "prompt", invalid_reason="prompt_invalid_text")
            row["category"] = _text(record.get("category"), "category")
            row["image"] = _image(record.get("image"), "image", base_dir, options)
    except FieldError as exc:
        return reject(row, STAGE, exc.reason, exc.detail)
    if row["category"] is not None and not row["category"].strip():
        row["category"] = None
    return row
