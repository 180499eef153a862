"""Tolerant readers for raw corpora: Parquet, JSONL / JSON, WebDataset tars, local or S3.

Ray's own readers stop the job at the first bad file or line. Here each input file is read by
one Ray task that yields working rows, good and rejected alike: an unreadable file becomes one
``malformed_row`` reject, a bad line one reject, a Parquet row group that cannot be decoded one
reject per row it declared. Whether a record is T2I or edit follows from its columns.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from fewstep import contract, storage
from fewstep.storage import StorageOptions
from pipelines.curate.parse import EDIT_KEYS, STAGE, curated_to_raw, parse_record
from pipelines.curate.records import from_rows, new_row, order_key, reject

log = logging.getLogger(__name__)


class InputError(ValueError):
    """An --input that does not exist or holds no readable files (a usage error, not a reject)."""


@dataclass(frozen=True)
class InputFile:
    uri: str
    input_index: int
    file_index: int
    label: str = ""  # name relative to the input's parent ("corpus/t2i/part-00000.parquet"): refs
    # in rejects and curated meta use it, so a local and an S3 copy of a corpus give equal outputs

    @property
    def ref(self) -> str:
        return self.label or self.uri


def list_inputs(inputs: list[str], extensions: list[str], options: StorageOptions | None) -> list[InputFile]:
    """Expand each input (a file or a directory, local or s3://) into its files, in a stable order."""
    if not inputs:
        raise InputError("no --input given: pass at least one corpus file or directory")
    files: list[InputFile] = []
    for input_index, uri in enumerate(inputs):
        uri = storage.normalize(uri)
        fs, path = storage.resolve(uri, options)
        if not fs.exists(path):
            raise InputError(f"--input {uri}: not found (check the path, or the S3 endpoint and bucket)")
        parent = posixpath.dirname(uri.rstrip("/"))
        if fs.isdir(path) and (curated := _curated_parts(uri, options)) is not None:
            found = curated  # a curated dataset: its manifest's parts, not its rejects or stats
        elif fs.isdir(path):
            listed = [f for f in storage.list_files(uri, options=options)
                      if not posixpath.basename(f).startswith((".", "_"))]
            found = [f for f in listed if any(f.endswith(ext) for ext in extensions)]
            _warn_near_misses(uri, [f for f in listed if f not in set(found)], extensions)
            if not found:
                raise InputError(f"--input {uri}: no files ending in {extensions} under it")
        else:
            found = [uri]
        files.extend(InputFile(f, input_index, i, posixpath.relpath(f, parent)) for i, f in enumerate(found))
    return files


def _warn_near_misses(uri: str, skipped: list[str], extensions: list[str]) -> None:
    """Data files that ``read.extensions`` leaves out only by case or compression (``.JSONL``,
    ``.jsonl.gz``) are easy to miss: say so (images beside a JSONL are skipped silently)."""
    near = [f for f in skipped if any(ext in f.lower() for ext in extensions)]
    if near:
        log.warning("--input %s: %d file(s) skipped, not ending in %s exactly (case or compression), "
                    "e.g. %s: rename or decompress them, or add their suffix to read.extensions",
                    uri, len(near), extensions, near[:3])


def _curated_parts(uri: str, options: StorageOptions | None) -> list[str] | None:
    """The data files of a curate output directory, or None if ``uri`` is not one."""
    manifest_uri = storage.join(uri, contract.MANIFEST_NAME)
    if not storage.exists(manifest_uri, options):
        return None
    manifest = storage.read_json(manifest_uri, options)
    if not isinstance(manifest, dict) or manifest.get("kind") != "curated":
        return None
    try:
        contract.check_manifest(manifest, expected_kind="curated")
    except contract.ContractError as exc:
        raise InputError(f"--input {uri}: a curate output with a broken {contract.MANIFEST_NAME} ({exc}); "
                         "re-run that curate") from None
    return [storage.join(uri, entry["path"]) for entry in manifest["shards"]]


def _base_dir(uri: str) -> str:
    return posixpath.dirname(uri) if storage.is_s3(uri) else str(posixpath.dirname(uri))


def _file_reject(file: InputFile, row_index: int, reason: str, detail: str, ref: str | None = None) -> dict:
    row = new_row(order=order_key(file.input_index, file.file_index, row_index), input=ref or file.ref)
    return reject(row, STAGE, reason, detail)


# -- Parquet -----------------------------------------------------------------------------------

def _binary_strings(table: pa.Table) -> pa.Table:
    """Read string columns as bytes so invalid UTF-8 is found per record, not per batch."""
    columns = [col.cast(pa.binary()) if pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
               else col for col in table.columns]
    return pa.Table.from_arrays(columns, names=table.column_names)


def _read_parquet(file: InputFile, handle, options: StorageOptions | None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(handle)
    except Exception as exc:  # noqa: BLE001 - any parser failure is a malformed file
        yield _file_reject(file, 0, "malformed_row", f"not a readable Parquet file: {exc}")
        return
    names = set(pf.schema_arrow.names)
    kind = "edit" if {"instruction", "source_image"} & names or set(EDIT_KEYS) & names else "t2i"
    if kind == "t2i" and "prompt" not in names and "image" not in names:
        kind = None  # neither schema: each row is rejected by the field checks
    # One table for both tasks (T2I rows with null edit fields and vice versa): decided per row.
    per_row = kind == "edit" and bool({"prompt", "image"} & names)
    # Image columns of strings hold paths (or data URIs), not bytes: _binary_strings must not
    # turn them into would-be image bytes.
    path_columns = [f.name for f in pf.schema_arrow if f.name in ("image", "source_image", "target_image")
                    and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]
    # A curated dataset (fewstep's own output) is read back row by row in the raw contract.
    curated = (pf.schema_arrow.metadata or {}).get(b"fewstep.schema") == b"curated"
    base_dir = _base_dir(file.uri)
    row_index = 0
    for group in range(pf.num_row_groups):
        declared = pf.metadata.row_group(group).num_rows
        try:
            table = _binary_strings(pf.read_row_group(group))
        except Exception as exc:  # noqa: BLE001
            for _ in range(declared):
                yield _file_reject(file, row_index, "malformed_row",
                                   f"row group {group} unreadable: {exc}", f"{file.ref}#row={row_index}")
                row_index += 1
            continue
        for record in table.to_pylist():
            for column in path_columns:
                if isinstance(record.get(column), bytes):
                    record[column] = record[column].decode("utf-8", errors="surrogateescape")
            ref = f"{file.ref}#row={row_index}"
            order = order_key(file.input_index, file.file_index, row_index)
            if curated:
                yield _from_curated(record, order, ref, base_dir, options)
            elif kind is None:
                yield _schema_reject(record, order, ref,
                                     f"neither a raw T2I nor a raw edit table (columns {sorted(names)})")
            else:
                yield parse_record(record, order=order, input_ref=ref, base_dir=base_dir, options=options,
                                   kind=None if per_row else kind)
            row_index += 1


def _from_curated(record: dict, order: int, ref: str, base_dir: str, options: StorageOptions | None) -> dict:
    raw, task = curated_to_raw(record)
    if task not in ("t2i", "edit"):
        return _schema_reject(raw, order, ref, f"curated row: task must be 't2i' or 'edit', got {task!r}")
    row = parse_record(raw, order=order, input_ref=ref, base_dir=base_dir, options=options, kind=task)
    if record.get("caption_origin") in (b"captioned", "captioned") and row.get("caption_origin") == "given":
        row["caption_origin"] = "captioned"  # a caption the first curate wrote stays marked as one
    return row


def _schema_reject(record: dict, order: int, ref: str, detail: str) -> dict:
    row = new_row(order=order, input=ref)
    rid = record.get("id")
    if isinstance(rid, bytes):
        try:
            row["id"] = rid.decode("utf-8")
        except UnicodeDecodeError:
            pass
    return reject(row, STAGE, "schema", detail)


# -- JSONL / JSON ------------------------------------------------------------------------------

def _read_jsonl(file: InputFile, handle, options: StorageOptions | None) -> Iterator[dict]:
    base_dir = _base_dir(file.uri)
    row_index = 0
    for line_no, raw in enumerate(handle, start=1):
        if not raw.strip():
            continue
        ref = f"{file.ref}#line={line_no}"
        order = order_key(file.input_index, file.file_index, row_index)
        row_index += 1
        # surrogateescape keeps non-UTF-8 bytes visible to the field checks instead of failing the line.
        text = raw.decode("utf-8", errors="surrogateescape")
        if line_no == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield reject(new_row(order=order, input=ref), STAGE, "malformed_row",
                         f"line {line_no}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        except RecursionError:
            yield reject(new_row(order=order, input=ref), STAGE, "malformed_row",
                         f"line {line_no}: JSON nested too deeply to parse")
            continue
        yield parse_record(record, order=order, input_ref=ref, base_dir=base_dir, options=options)


def _read_json(file: InputFile, handle, options: StorageOptions | None) -> Iterator[dict]:
    try:
        records = json.loads(handle.read().decode("utf-8", errors="surrogateescape"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        yield _file_reject(file, 0, "malformed_row", f"not a JSON document: {exc}")
        return
    if not isinstance(records, list):
        records = [records]
    base_dir = _base_dir(file.uri)
    for index, record in enumerate(records):
        yield parse_record(record, order=order_key(file.input_index, file.file_index, index),
                           input_ref=f"{file.ref}#item={index}", base_dir=base_dir, options=options)


# -- WebDataset tars ---------------------------------------------------------------------------

_IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "gif", "bmp", "tif", "tiff", "image")


def _sample_to_record(key: str, members: dict[str, bytes]) -> dict:
    """WebDataset sample (extension -> bytes) -> raw record. ``json`` may carry any field."""
    record: dict = {}
    if "json" in members:
        loaded = json.loads(members["json"].decode("utf-8", errors="surrogateescape"))
        if not isinstance(loaded, dict):
            raise ValueError("json member is not an object")
        record.update(loaded)
    record.setdefault("id", key)
    for ext, data in members.items():
        head, _, last = ext.rpartition(".")
        if ext in ("txt", "prompt", "prompt.txt", "caption", "caption.txt"):
            record.setdefault("prompt", data)
        elif ext in ("instruction", "instruction.txt"):
            record.setdefault("instruction", data)
        elif ext in ("category", "category.txt", "cls", "edit_category.txt"):
            record.setdefault("edit_category" if "edit" in ext else "category", data)
        elif last in _IMAGE_EXTS and head in ("source", "source_image"):
            record.setdefault("source_image", data)
        elif last in _IMAGE_EXTS and head in ("target", "target_image"):
            record.setdefault("target_image", data)
        elif last in _IMAGE_EXTS and head in ("", "image"):
            record.setdefault("image", data)
    if "source" not in record:
        record["source"] = "webdataset"
    return record


class _CountingReader:
    """A read-only stream that counts the bytes read through it (tar streams cannot seek)."""

    def __init__(self, handle) -> None:
        self.handle, self.bytes_read = handle, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.bytes_read += len(data)
        return data

    def drain(self) -> int:
        """Read to the end; the stream's total length."""
        while self.read(1 << 20):
            pass
        return self.bytes_read


def _read_tar(file: InputFile, handle, options: StorageOptions | None) -> Iterator[dict]:
    base_dir = _base_dir(file.uri)
    row_index = 0

    def emit(key: str, members: dict[str, bytes]) -> dict:
        nonlocal row_index
        order = order_key(file.input_index, file.file_index, row_index)
        ref = f"{file.ref}#sample={key}"
        row_index += 1
        try:
            record = _sample_to_record(key, members)
        except (ValueError, UnicodeDecodeError) as exc:
            return reject(new_row(order=order, input=ref), STAGE, "malformed_row", f"sample {key}: {exc}")
        return parse_record(record, order=order, input_ref=ref, base_dir=base_dir, options=options)

    key, members = None, {}
    counted = _CountingReader(handle)
    try:
        with tarfile.open(fileobj=counted, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = posixpath.basename(name)
                if base.startswith("."):
                    continue
                stem, _, ext = base.partition(".")
                sample_key = posixpath.join(posixpath.dirname(name), stem)
                if sample_key != key and key is not None:
                    yield emit(key, members)
                    members = {}
                key = sample_key
                members[ext] = tar.extractfile(member).read()
            end = tar.offset
        # A stream cut at a header boundary ends the member loop quietly: an archive must still
        # hold its end-of-archive block after the last member.
        if counted.drain() - end < tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"the archive ends at byte {end} without its end-of-archive block "
                                    "(cut short?)")
    except (tarfile.TarError, OSError, EOFError) as exc:
        # The sample in progress is incomplete: reject it with the file's error.
        yield _file_reject(file, row_index, "malformed_row", f"tar unreadable after {row_index} samples: {exc}",
                           f"{file.ref}#sample={key}")
        return
    if key is not None:
        yield emit(key, members)


# -- dispatch ----------------------------------------------------------------------------------

def iter_file_rows(file: InputFile, options: StorageOptions | None) -> Iterator[dict]:
    """Every working row of one input file; never raises for bad content."""
    uri = file.uri
    if uri.endswith(".parquet"):
        reader = _read_parquet
    elif uri.endswith(".jsonl"):
        reader = _read_jsonl
    elif uri.endswith(".json"):
        reader = _read_json
    elif uri.endswith(".tar"):
        reader = _read_tar
    else:
        yield _file_reject(file, 0, "malformed_row", "unknown file type (use .parquet, .jsonl, .json or .tar)")
        return
    try:
        fs, path = storage.resolve(uri, options)
        data = fs.cat_file(path)
    except OSError as exc:
        yield _file_reject(file, 0, "malformed_row", f"cannot read file: {exc}")
        return
    yield from reader(file, io.BytesIO(data), options)


def read_files_batch(batch: pa.Table, options: StorageOptions | None, rows_per_block: int) -> Iterator[pa.Table]:
    """``map_batches`` function: a batch of file descriptors -> blocks of working rows."""
    for item in batch.to_pylist():
        file = InputFile(item["uri"], item["input_index"], item["file_index"], item["label"])
        chunk: list[dict] = []
        for row in iter_file_rows(file, options):
            chunk.append(row)
            if len(chunk) >= rows_per_block:
                yield from_rows(chunk)
                chunk = []
        if chunk:
            yield from_rows(chunk)


def read_inputs(files: list[InputFile], options: StorageOptions | None, rows_per_block: int):
    """A Ray dataset of working rows, one read task per file."""
    import ray.data

    items = [{"uri": f.uri, "input_index": f.input_index, "file_index": f.file_index, "label": f.label}
             for f in files]
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # num_cpus differs from the next operator's on purpose: fused, Ray would bundle many files
    # into one task; the streaming repartition then cuts big files into blocks that later
    # operators (and actors) process in parallel.
    ds = ds.map_batches(read_files_batch, fn_kwargs={"options": options, "rows_per_block": rows_per_block},
                        batch_size=1, batch_format="pyarrow", num_cpus=0.25)
    return ds.repartition(target_num_rows_per_block=rows_per_block)
