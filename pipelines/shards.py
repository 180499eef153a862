"""Read precomputed shards: as a streaming Ray Dataset, or as plain batches without Ray.

``read_shards`` checks the manifest, then hands the shard files to ``ray.data.read_parquet``
with a pyarrow filesystem, so Ray workers read the Parquet directly (local or S3) and the
driver never holds a row; ``streaming_split`` / ``iter_torch_batches`` work on it as on any
Ray Train dataset. ``collate_shard_rows`` turns a batch (Ray's numpy dict, a pyarrow table or a
list of row dicts) into torch tensors, padding variable-length prompt embeddings to the batch
maximum. ``iter_shard_batches`` is the same data for a single-process launcher (plain pyarrow,
deterministic shuffle, equal row counts per rank).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fewstep import contract, storage
from fewstep.storage import StorageOptions

EMPTY_PROMPT_NAME = "empty_prompt.parquet"


def read_manifest(uri: str, storage_options: StorageOptions | None = None) -> dict:
    """The checked ``shards`` manifest of a precompute output folder."""
    root = storage.normalize(uri)
    manifest_uri = storage.join(root, contract.MANIFEST_NAME)
    if not storage.exists(manifest_uri, storage_options):
        raise contract.ContractError(
            "manifest", "manifest.json", f"a precompute manifest at {manifest_uri} (run `fewstep "
            "precompute`, or wait for it to finish: the manifest is written last)", "missing")
    return contract.check_manifest(storage.read_json(manifest_uri, storage_options), expected_kind="shards")


def shard_paths(uri: str, manifest: dict, storage_options: StorageOptions | None = None) -> list[str]:
    """Backend paths (no scheme) of the manifest's shards, for a pyarrow filesystem."""
    root = storage.normalize(uri)
    return [storage.pyarrow_filesystem(storage.join(root, s["path"]), storage_options)[1]
            for s in manifest["shards"]]


def read_shards(uri: str, storage: StorageOptions | None = None, columns: Sequence[str] | None = None,
                tasks: Sequence[str] | None = None):
    """A streaming ``ray.data.Dataset`` over the shards of ``uri`` (rows read on the workers).

    ``columns`` projects (default: every SHARD_SCHEMA column); ``tasks`` keeps only those tasks
    (pushed down to the Parquet reader).
    """
    import ray.data

    manifest = read_manifest(uri, storage)
    paths = [p for p, s in zip(shard_paths(uri, manifest, storage), manifest["shards"]) if s["rows"] > 0]
    if not paths:
        raise contract.ContractError("manifest", "shards", "at least one non-empty shard", manifest["shards"])
    fs, _ = _fs(uri, storage)
    _check_columns(fs, paths[0], columns)
    if tasks is not None:
        unknown = set(tasks) - set(contract.TASKS)
        if unknown:
            raise ValueError(f"tasks: {sorted(unknown)} are not tasks; use some of {contract.TASKS}")
    ds = ray.data.read_parquet(paths, filesystem=fs)
    if tasks is not None:
        from ray.data.expressions import col

        ds = ds.filter(expr=col("task").is_in(list(tasks)))  # pushed down into the Parquet scan
    if columns:
        ds = ds.select_columns(list(columns))
    return ds


def _fs(uri: str, options: StorageOptions | None):
    return storage.pyarrow_filesystem(storage.normalize(uri), options)


def _check_columns(fs, path: str, columns: Sequence[str] | None) -> None:
    try:
        schema = pq.read_schema(fs.open_input_file(path))
    except (OSError, FileNotFoundError) as exc:
        raise contract.ContractError("manifest", "shards", f"a readable shard at {path}", str(exc)) from None
    missing = {f.name for f in contract.SHARD_SCHEMA} - set(schema.names)
    if missing:
        raise contract.ContractError(path, "<schema>", "the shard schema", f"missing columns {sorted(missing)}")
    if columns:
        unknown = set(columns) - set(schema.names)
        if unknown:
            raise ValueError(f"columns: {sorted(unknown)} are not shard columns ({schema.names})")


# ---------------------------------------------------------------------------
# Collation
# ---------------------------------------------------------------------------


@dataclass
class ShardBatch:
    """One training batch. Optional tensors are None when no row has them; otherwise rows
    without one hold zeros and ``has_*`` is False for them."""

    ids: list[str]
    tasks: list[str]
    categories: list[str]
    prompts: list[str]
    prompt_embeds: Any  # Tensor [B, L, D]
    prompt_mask: Any  # Tensor [B, L] long, 1 on valid tokens
    negative_embeds: Any = None  # Tensor [B, Ln, D] (edit rows: empty prompt + source image)
    negative_mask: Any = None
    has_negative: Any = None  # Tensor [B] bool
    latents: Any = None  # Tensor [B, C, h, w] (T2I image / edit target)
    has_latents: Any = None
    source_latents: Any = None  # Tensor [B, C, h', w'] (edit source)
    has_source: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, index) -> ShardBatch:
        """The rows at ``index`` (a 1-D integer array or tensor), tensors staying on their device.

        Prompt padding stays as wide as this batch's (the objectives trim unused columns).
        """
        import torch

        positions = [int(i) for i in index]
        on_device: dict = {}  # one copy of the index per device
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                if value.device not in on_device:
                    on_device[value.device] = torch.as_tensor(positions, device=value.device)
                picked[f.name] = value.index_select(0, on_device[value.device])
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in positions]
            else:
                picked[f.name] = value
        return ShardBatch(**picked)

    def to(self, device) -> ShardBatch:
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device) if hasattr(value, "to") else value
        return ShardBatch(**moved)


def _columns_of(rows) -> tuple[dict[str, list], int]:
    """Column lists from a numpy dict batch, a pyarrow table, a pandas frame or row dicts."""
    if isinstance(rows, pa.Table):
        return {name: rows.column(name).to_pylist() for name in rows.column_names}, rows.num_rows
    if isinstance(rows, list):
        names = set().union(*(r.keys() for r in rows)) if rows else set()
        return {name: [r.get(name) for r in rows] for name in names}, len(rows)
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas
        return {name: list(rows[name]) for name in rows.columns}, len(rows)
    columns = {name: list(values) for name, values in rows.items()}
    return columns, len(next(iter(columns.values()))) if columns else 0


def _tensor(data, shape, dtype: str) -> np.ndarray:
    return contract.tensor_from_bytes(bytes(data) if isinstance(data, memoryview) else data,
                                      [int(s) for s in shape], dtype)


def _pad_stack(arrays: list[np.ndarray | None], masks: list[np.ndarray | None]):
    """Right-pad [L_i, D] arrays to the longest; missing rows become zeros with an empty mask."""
    present = [a for a in arrays if a is not None]
    length = max(a.shape[0] for a in present)
    dim = present[0].shape[1]
    out = np.zeros((len(arrays), length, dim), np.float32)
    mask = np.zeros((len(arrays), length), np.int64)
    for i, (a, m) in enumerate(zip(arrays, masks)):
        if a is None:
            continue
        if a.shape[1] != dim:
            raise contract.ContractError(None, "prompt_embeds", f"width {dim} in every row", a.shape[1])
        out[i, : a.shape[0]] = a
        mask[i, : a.shape[0]] = m[: a.shape[0]]
    return out, mask


def _stack_latents(arrays: list[np.ndarray | None], column: str):
    present = [a for a in arrays if a is not None]
    if not present:
        return None, None
    shapes = {a.shape for a in present}
    if len(shapes) > 1:
        raise contract.ContractError(None, column, "one latent shape per batch (set precompute "
                                     "resolution so images share a size)", sorted(shapes))
    out = np.zeros((len(arrays), *present[0].shape), np.float32)
    has = np.zeros(len(arrays), bool)
    for i, a in enumerate(arrays):
        if a is not None:
            out[i], has[i] = a, True
    return out, has


def collate_shard_rows(rows, device="cpu", dtype=None) -> ShardBatch:
    """Shard rows -> :class:`ShardBatch` of torch tensors on ``device`` (float32 unless ``dtype``).

    An already collated ``ShardBatch`` (the local launcher's device cache) is only moved.
    """
    import torch

    if isinstance(rows, ShardBatch):
        return rows.to(device)

    cols, n = _columns_of(rows)
    if n == 0:
        raise ValueError("collate_shard_rows got an empty batch")
    for name in ("id", "task", "category", "dtype", "prompt_embeds", "prompt_embeds_shape", "prompt_mask"):
        if name not in cols:
            raise contract.ContractError(None, name, "a shard column (read every SHARD_SCHEMA column)", "missing")
    dtypes = cols["dtype"]

    def tensors(prefix: str, shape_col: str):
        data, shapes = cols.get(prefix, [None] * n), cols.get(shape_col, [None] * n)
        return [None if d is None else _tensor(d, s, t) for d, s, t in zip(data, shapes, dtypes)]

    def masks(name: str):
        return [None if m is None else contract.mask_from_bytes(bytes(m)) for m in cols.get(name, [None] * n)]

    embeds, mask = _pad_stack(tensors("prompt_embeds", "prompt_embeds_shape"), masks("prompt_mask"))
    negatives = tensors("negative_embeds", "negative_embeds_shape")
    neg = neg_mask = has_neg = None
    if any(a is not None for a in negatives):
        neg, neg_mask = _pad_stack(negatives, masks("negative_mask"))
        has_neg = np.array([a is not None for a in negatives])
    latents, has_latents = _stack_latents(tensors("latents", "latents_shape"), "latents")
    source, has_source = _stack_latents(tensors("source_latents", "source_latents_shape"), "source_latents")
    out_dtype = dtype or torch.float32

    def t(x, float_=True):
        if x is None:
            return None
        value = torch.from_numpy(x)
        return value.to(device=device, dtype=out_dtype if float_ else None)

    return ShardBatch(
        ids=[str(x) for x in cols["id"]], tasks=[str(x) for x in cols["task"]],
        categories=[str(x) for x in cols["category"]], prompts=[str(x) for x in cols.get("prompt", [""] * n)],
        prompt_embeds=t(embeds), prompt_mask=t(mask, False),
        negative_embeds=t(neg), negative_mask=t(neg_mask, False), has_negative=t(has_neg, False),
        latents=t(latents), has_latents=t(has_latents, False),
        source_latents=t(source), has_source=t(has_source, False),
    )


def load_empty_prompt(uri: str, storage: StorageOptions | None = None, device="cpu"):
    """The empty-prompt embedding (T2I classifier-free guidance) as a one-row ``PromptEmbeds``."""
    from fewstep.models.tokens import PromptEmbeds

    manifest = read_manifest(uri, storage)
    rel = manifest.get("empty_prompt", {}).get("path", EMPTY_PROMPT_NAME)
    fs, path = _fs(_join(uri, rel), storage)
    try:
        table = pq.read_table(fs.open_input_file(path))
    except (OSError, FileNotFoundError):
        raise contract.ContractError("manifest", "empty_prompt", f"a readable file at {path}", "missing") from None
    batch = collate_shard_rows(table, device=device)
    return PromptEmbeds(batch.prompt_embeds, batch.prompt_mask)


def _join(uri: str, rel: str) -> str:
    return storage.join(storage.normalize(uri), *rel.split("/"))


# ---------------------------------------------------------------------------
# Without Ray
# ---------------------------------------------------------------------------


def iter_shard_batches(uri: str, batch_size: int, shuffle_seed: int | None = 0, rank: int = 0,
                       world_size: int = 1, storage: StorageOptions | None = None, *,
                       epochs: int | None = 1, tasks: Sequence[str] | None = None, drop_last: bool = True,
                       device="cpu") -> Iterator[ShardBatch]:
    """Batches for one rank of a single-process launcher (no Ray), read with plain pyarrow.

    Each epoch orders the shards by a seeded permutation (``shuffle_seed`` + epoch; None keeps
    manifest order and row order) and splits that row stream into ``world_size`` contiguous,
    equally long slices (the remainder is dropped), so every rank gets the same number of
    batches and reads only its own shards. Rows are shuffled within the slice. ``epochs=None``
    repeats forever.
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
    manifest = read_manifest(uri, storage)
    paths = shard_paths(uri, manifest, storage)
    fs, _ = _fs(uri, storage)
    rows_of = _row_indices(fs, paths, manifest, tasks)
    epoch = 0
    while epochs is None or epoch < epochs:
        rng = None if shuffle_seed is None else np.random.default_rng([shuffle_seed, epoch])
        order = list(range(len(paths))) if rng is None else list(rng.permutation(len(paths)))
        stream = [(s, int(r)) for s in order for r in rows_of[s]]
        per_rank = len(stream) // world_size
        mine = stream[rank * per_rank:(rank + 1) * per_rank]
        if rng is not None:
            mine = [mine[i] for i in rng.permutation(len(mine))]
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            if len(chunk) < batch_size and drop_last:
                break
            yield collate_shard_rows(_take(fs, paths, chunk), device=device)
        epoch += 1


def _row_indices(fs, paths: list[str], manifest: dict, tasks: Sequence[str] | None) -> list[np.ndarray]:
    if tasks is None:
        return [np.arange(s["rows"]) for s in manifest["shards"]]
    wanted = set(tasks)
    out = []
    for path in paths:
        task = pq.read_table(fs.open_input_file(path), columns=["task"]).column("task").to_pylist()
        out.append(np.array([i for i, t in enumerate(task) if t in wanted], dtype=np.int64))
    return out


def _take(fs, paths: list[str], chunk: list[tuple[int, int]]) -> pa.Table:
    """The rows ``chunk`` = [(shard, row)] in that order, reading only the row groups needed."""
    by_shard: dict[int, list[int]] = {}
    for s, r in chunk:
        by_shard.setdefault(s, []).append(r)
    tables, where = [], {}
    offset = 0
    for s, rows in by_shard.items():
        pf = pq.ParquetFile(fs.open_input_file(paths[s]))
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        groups = sorted({int(np.searchsorted(starts, r, side="right")) - 1 for r in rows})
        read_starts = np.concatenate([[0], np.cumsum([sizes[g] for g in groups])])
        table = pf.read_row_groups(groups)
        for r in rows:
            g = int(np.searchsorted(starts, r, side="right")) - 1
            where[(s, r)] = offset + int(read_starts[groups.index(g)] + r - starts[g])
        tables.append(table)
        offset += table.num_rows
    return pa.concat_tables(tables).take(pa.array([where[key] for key in chunk], pa.int64()))


def shard_names(manifest: dict) -> list[str]:
    return [posixpath.basename(s["path"]) for s in manifest["shards"]]
