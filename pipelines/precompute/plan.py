"""Plan a precompute run: which curated rows go to which shard, and which shards are done.

Rows are assigned to shards from the curated manifest alone (its parts in manifest order, each
part's rows in file order): shard ``k`` holds global rows ``[k * n, (k + 1) * n)``. Only Parquet
footers and the ``id`` column are read here, never images, so the driver stays light.
The plan id hashes the curated content (part checksums), the teacher identity and the
config identity; none of them depends on where the data lives, so a local and an S3 run of the
same inputs agree.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import contract, storage
from fewstep.storage import StorageOptions

SHARDS_DIR = "shards"
PROGRESS_DIR = "_progress"
EMPTY_PROMPT_NAME = "empty_prompt.parquet"
EMPTY_PROMPT_ID = "__empty__"
EMPTY_SHARD = -1  # the plan index of the empty-prompt item

_CONFIG_SUFFIXES = (".json", ".txt", ".model", ".yaml", ".jinja")
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


class PrecomputeError(RuntimeError):
    """A precompute run that cannot start or continue; the message says what to do."""


@dataclass(frozen=True)
class RowRange:
    """Rows ``[start, stop)`` of one curated Parquet file (a backend path, no scheme)."""

    path: str
    start: int
    stop: int


@dataclass
class ShardPlan:
    index: int  # EMPTY_SHARD for the empty prompt
    ranges: list[RowRange] = field(default_factory=list)
    rows: int = 0

    @property
    def name(self) -> str:
        return EMPTY_PROMPT_NAME if self.index == EMPTY_SHARD else shard_name(self.index)

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "rows": self.rows,
                           "ranges": [[r.path, r.start, r.stop] for r in self.ranges]})

    @staticmethod
    def from_json(text: str) -> ShardPlan:
        data = json.loads(text)
        return ShardPlan(data["index"], [RowRange(*r) for r in data["ranges"]], data["rows"])


@dataclass
class InputInfo:
    uri: str
    parts: list[tuple[str, int]]  # (backend path, rows) in manifest order
    content_hash: str
    rows: int
    has_images: bool


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def read_curated_input(uri: str, options: StorageOptions | None = None) -> InputInfo:
    """Check the curated manifest and footers; fail early with a message that says what to do."""
    root = storage.normalize(uri)
    manifest_uri = storage.join(root, contract.MANIFEST_NAME)
    if not storage.exists(manifest_uri, options):
        raise PrecomputeError(
            f"no {contract.MANIFEST_NAME} at {root}: --input must be the output folder of a finished "
            "`fewstep curate` run (the manifest is written last, so a missing one means the run "
            "has not finished)")
    try:
        raw_manifest = storage.read_json(manifest_uri, options)
    except ValueError as exc:
        raise PrecomputeError(f"{manifest_uri} is not valid JSON ({exc}); re-run curate") from None
    manifest = contract.check_manifest(raw_manifest, expected_kind="curated")
    fs, _ = storage.pyarrow_filesystem(root, options)
    parts: list[tuple[str, int]] = []
    digest = hashlib.sha256()
    has_images = False
    seen_ids: set[str] = set()
    for entry in manifest["shards"]:
        rel = str(entry["path"])
        if rel.startswith("/") or ".." in rel.replace("\\", "/").split("/"):
            raise PrecomputeError(f"{manifest_uri}: part path {rel!r} leaves the curated folder; a "
                                  "manifest lists its parts relative to its own folder (re-run curate)")
        part_uri = storage.join(root, rel)
        _, path = storage.pyarrow_filesystem(part_uri, options)
        try:
            handle = fs.open_input_file(path)
            size = handle.size()
            if entry.get("bytes") is not None and size != entry["bytes"]:
                raise PrecomputeError(f"{part_uri}: {size} bytes but the manifest says {entry['bytes']}; "
                                      "the curated output was modified after curate wrote it, re-run curate")
            pf = pq.ParquetFile(handle)
        except (OSError, pa.ArrowException) as exc:
            raise PrecomputeError(f"curated part {part_uri} listed in the manifest cannot be "
                                  f"opened ({exc}); re-run curate") from None
        _check_column_types(pf.schema_arrow, part_uri)
        rows = pf.metadata.num_rows
        if rows != entry["rows"]:
            raise PrecomputeError(f"{part_uri}: {rows} rows but the manifest says {entry['rows']}; "
                                  "the curated output was modified, re-run curate")
        has_images = has_images or _may_have_values(pf, ("image", "source_image"))
        for rid in pf.read(columns=["id"]).column("id").to_pylist():
            if rid in seen_ids:
                raise PrecomputeError(f"{part_uri}: duplicate id {rid!r} in the curated input; ids "
                                      "must be unique (re-run curate)")
            seen_ids.add(rid)
        parts.append((path, rows))
        digest.update(f"{entry['path']}\t{entry['rows']}\t{entry['sha256']}\n".encode())
    return InputInfo(root, parts, digest.hexdigest(), sum(r for _, r in parts), has_images)


_TEXT_TYPES = (pa.string(), pa.large_string(), pa.null())
_BYTES_TYPES = (pa.binary(), pa.large_binary(), pa.null())


def _check_column_types(schema: pa.Schema, part_uri: str) -> None:
    """The curated columns precompute reads must have the curated types: a cast would turn an
    integer prompt into the text "0", and image paths into undecodable bytes on every row."""
    missing = {"id", "task", "prompt", "category", "image", "source_image"} - set(schema.names)
    if missing:
        raise PrecomputeError(f"{part_uri}: not a curated part (missing columns {sorted(missing)})")
    for name in ("id", "task", "prompt", "category"):
        if schema.field(name).type not in _TEXT_TYPES:
            raise PrecomputeError(f"{part_uri}: column {name!r} is {schema.field(name).type}, expected "
                                  "string; write curated sets with `fewstep curate`")
    for name in ("image", "source_image"):
        if schema.field(name).type not in _BYTES_TYPES:
            hint = (" (file paths? a curated set holds the encoded PNG/JPEG bytes)"
                    if schema.field(name).type in _TEXT_TYPES else "")
            raise PrecomputeError(f"{part_uri}: column {name!r} is {schema.field(name).type}, expected "
                                  f"binary image bytes{hint}; write curated sets with `fewstep curate`")


def _may_have_values(pf: pq.ParquetFile, columns: tuple[str, ...]) -> bool:
    """True unless the footer statistics prove every value of ``columns`` is null."""
    names = pf.schema_arrow.names
    for rg in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(rg)
        for name in columns:
            col = group.column(names.index(name))
            stats = col.statistics
            if stats is None or not stats.has_null_count or stats.null_count < group.num_rows:
                return True
    return False


def plan_shards(info: InputInfo, rows_per_shard: int) -> list[ShardPlan]:
    """Split the curated rows, in manifest order, into shards of ``rows_per_shard`` rows."""
    shards: list[ShardPlan] = []
    current = ShardPlan(0)
    for path, rows in info.parts:
        start = 0
        while start < rows:
            take = min(rows - start, rows_per_shard - current.rows)
            current.ranges.append(RowRange(path, start, start + take))
            current.rows += take
            start += take
            if current.rows == rows_per_shard:
                shards.append(current)
                current = ShardPlan(len(shards))
    if current.rows:
        shards.append(current)
    return shards


def teacher_identity(uri: str, options: StorageOptions | None, checksum_max_bytes: int) -> dict:
    """Hash of the teacher directory: configs by content, weights by size (and checksum if small)."""
    root = storage.normalize(uri)
    fs, path = storage.resolve(root, options)
    if fs.isfile(path):
        raise PrecomputeError(f"--teacher {root} is a file; pass the pipeline directory (the folder "
                              "that holds model_index.json)")
    files = storage.list_files(root, options=options)
    if not files:
        raise PrecomputeError(f"teacher {root}: no files there; pass a pipeline directory made by "
                              "`fewstep models init-tiny` or a Qwen-Image checkpoint directory")
    prefix = root.rstrip("/") + "/"
    entries = []
    total = 0
    for file_uri in files:
        rel = file_uri[len(prefix):] if file_uri.startswith(prefix) else posixpath.basename(file_uri)
        size = storage.size_of(file_uri, options)
        total += size
        if rel.endswith(_CONFIG_SUFFIXES) or size <= checksum_max_bytes:
            entries.append([rel, size, storage.sha256_of(file_uri, options)])
        else:
            entries.append([rel, size, None])
    if not any(e[0] == "model_index.json" for e in entries):
        raise PrecomputeError(f"teacher {root}: no model_index.json; expected a diffusers pipeline "
                              "directory (transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")
    for component in ("text_encoder", "vae"):  # what precompute runs; the transformer is not needed
        if not any(e[0].startswith(f"{component}/") and e[0].endswith(_WEIGHT_SUFFIXES) for e in entries):
            raise PrecomputeError(f"teacher {root}: no weights in {component}/ (*.safetensors or *.bin); "
                                  "precompute runs the teacher's text encoder and VAE")
    text = json.dumps(sorted(entries), separators=(",", ":"))
    return {"uri": root, "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "files": len(entries), "bytes": total}


def plan_id(config_identity_hash: str, teacher: dict, info: InputInfo) -> str:
    text = json.dumps({"config": config_identity_hash, "teacher": teacher["sha256"],
                       "input": info.content_hash}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Progress: a sidecar per finished shard, written after the shard is published
# ---------------------------------------------------------------------------

def progress_uri(output: str, name: str) -> str:
    return storage.join(output, PROGRESS_DIR, name + ".json")


def finished_shards(output: str, options: StorageOptions | None, pid: str) -> dict[str, dict]:
    """Sidecars of finished shards of this plan, by shard name; a shard without one is redone."""
    published = {posixpath.basename(u) for u in storage.list_files(storage.join(output, SHARDS_DIR),
                                                                   ".parquet", options)}
    if storage.exists(storage.join(output, EMPTY_PROMPT_NAME), options):
        published.add(EMPTY_PROMPT_NAME)
    done = {}
    for uri in storage.list_files(storage.join(output, PROGRESS_DIR), ".json", options):
        name = posixpath.basename(uri)[: -len(".json")]
        if name == "plan":
            continue
        sidecar = storage.read_json(uri, options)
        if sidecar.get("plan_id") == pid and name in published:
            done[name] = sidecar
    return done


def remove_leftovers(output: str, options: StorageOptions | None) -> int:
    """Delete temporary files a killed run left behind, so reruns leave the same folder."""
    removed = 0
    for sub in (SHARDS_DIR, PROGRESS_DIR, "rejects", ""):
        folder = storage.join(output, sub) if sub else storage.normalize(output)
        fs, path = storage.resolve(folder, options)
        if not fs.exists(path):
            continue
        for item in fs.ls(path, detail=False):
            if posixpath.basename(item).startswith(".tmp-") or ".tmp-" in posixpath.basename(item):
                fs.rm(item)
                removed += 1
    return removed
