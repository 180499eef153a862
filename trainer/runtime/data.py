"""Training data: a manifest-checked dataset root streamed as columnar numpy batches.

Two readers yield the same batches (``dict[str, np.ndarray]``, binary columns as object
arrays of ``bytes``): a Ray Data dataset for the Ray launcher (each worker streams its
part with ``get_dataset_shard``) and a plain pyarrow reader for the local launcher. The local
reader can also hand the whole dataset to the objective's ``collate`` once, so that a GPU run
selects each batch from tensors already on the device instead of decoding rows every step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from fewstep import storage
from fewstep.contract import MANIFEST_NAME, ContractError, check_manifest
from fewstep.storage import StorageOptions
from trainer.runtime.config import DataSection

log = logging.getLogger(__name__)

# Folder of the parquet parts for each dataset kind (see docs/dev/interfaces.md).
KIND_DIRS = {"shards": "shards", "curated": "curated"}


@dataclass(frozen=True)
class DataSource:
    uri: str  # the first root; ``roots`` lists every one
    kind: str
    files: tuple[str, ...]  # full URIs
    manifest: dict  # the first root's
    columns: tuple[str, ...] | None
    tasks: tuple[str, ...] | None
    categories: tuple[str, ...] | None
    roots: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """The root(s), for logs and errors."""
        return self.uri if len(self.roots) <= 1 else f"{len(self.roots)} roots ({', '.join(self.roots)})"

    def backend_paths(self) -> list[str]:
        return [storage._strip(f) for f in self.files]

    def arrow_filter(self) -> pc.Expression | None:
        expr = None
        if self.tasks:
            expr = pc.field("task").isin(list(self.tasks))
        if self.categories:
            cat = pc.field("category").isin(list(self.categories))
            expr = cat if expr is None else (expr & cat)
        return expr

    def ray_filter(self):
        from ray.data.expressions import col

        expr = None
        if self.tasks:
            expr = col("task").is_in(list(self.tasks))
        if self.categories:
            cat = col("category").is_in(list(self.categories))
            expr = cat if expr is None else (expr & cat)
        return expr


def _open_root(uri: str, expected_kind: str, options: StorageOptions | None) -> tuple[dict, tuple[str, ...]]:
    """One root's checked manifest and parquet parts; errors name the config field and the fix."""
    uri = storage.normalize(uri)
    manifest_uri = storage.join(uri, MANIFEST_NAME)
    if not storage.exists(manifest_uri, options):
        raise FileNotFoundError(
            f"data.uri: no {MANIFEST_NAME} under {uri}; point it at a finished "
            f"{'precompute' if expected_kind == 'shards' else 'curate'} output")
    try:
        manifest = check_manifest(storage.read_json(manifest_uri, options), expected_kind)
    except ContractError as exc:
        wanted = ("a `fewstep precompute` output (this objective trains on encoded shards)"
                  if expected_kind == "shards" else "a `fewstep curate` output (this objective trains on images)")
        raise ValueError(f"data.uri: {uri}: {exc}; give {wanted}") from None
    files = tuple(storage.join(uri, entry["path"]) for entry in manifest["shards"])
    if not files:
        files = tuple(storage.list_files(storage.join(uri, KIND_DIRS[expected_kind]), ".parquet", options))
    if not files:
        raise ValueError(f"data.uri: {uri} lists no parquet parts")
    return manifest, files


# Shard-manifest fields that must agree for rows of several roots to be trained on together: the
# empty-prompt embedding (the text encoder) and the latent and text geometry. The teacher is compared
# apart (_teacher_field).
_SAME_ENCODING = (("empty_prompt", "sha256"), ("latent_channels",), ("text_embed_dim",), ("vae_scale_factor",),
                  ("extra", "latent_channels"))


def _field(manifest: dict, path: tuple[str, ...]):
    value = manifest
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _teacher_field(first: dict) -> tuple[str, str]:
    """How the teacher that encoded the first root is compared: by its content digest, or, where the
    manifest has none (older or synthetic ones), by its path. One teacher precomputed from two paths
    has one digest."""
    return ("teacher", "sha256") if _field(first, ("teacher", "sha256")) is not None else ("teacher", "uri")


def check_same_encoding(roots: list[str], manifests: list[dict]) -> None:
    """A clear error when shard roots were encoded differently: their latents or embeddings would
    mean different things, and a model trained on the union would learn neither."""
    first = manifests[0]
    for root, manifest in zip(roots[1:], manifests[1:]):
        for path in (_teacher_field(first), *_SAME_ENCODING):
            a, b = _field(first, path), _field(manifest, path)
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"data.uri: {root} was encoded differently from {roots[0]} ({'.'.join(path)}: "
                    f"{b!r} vs {a!r}); precompute every listed root with the same teacher")


def open_source(section: DataSection, expected_kind: str, columns: tuple[str, ...] | None,
                options: StorageOptions | None) -> DataSource:
    """Check the manifest(s) and list the parts; errors name the config field and the fix."""
    if not section.uri:
        raise ValueError(f"data.uri: required: the {expected_kind} dataset root this objective trains on")
    roots = [storage.normalize(u) for u in section.uris]
    if len({storage.is_s3(r) for r in roots}) > 1:  # the readers open one filesystem for every part
        raise ValueError(f"data.uri: {roots} mix local and s3:// roots; copy them to one store")
    opened = [_open_root(uri, expected_kind, options) for uri in roots]
    manifests = [manifest for manifest, _ in opened]
    if expected_kind == "shards":
        check_same_encoding(roots, manifests)
    files = tuple(f for _, parts in opened for f in parts)
    tasks = tuple(section.tasks) if section.tasks else None
    categories = tuple(section.categories) if section.categories else None
    if columns is not None and (tasks or categories):
        columns = tuple(dict.fromkeys([*columns, "task", "category"]))
    return DataSource(roots[0], expected_kind, files, manifests[0], columns, tasks, categories, tuple(roots))


def union_totals(roots: list[str] | tuple[str, ...], options: StorageOptions | None,
                 tasks: tuple[str, ...] | None = None, categories: tuple[str, ...] | None = None) -> dict:
    """Rows and rows per task over every root, from the manifests' ``totals`` ({} if one lacks them).

    With ``tasks`` or ``categories`` (the run's data filter), ``by_task`` counts only the rows the
    filter keeps, as far as the manifests' ``by_category`` tell (``rows`` stays the whole)."""
    rows, by_task = 0, {}
    for root in roots:
        totals = storage.read_json(storage.join(root, MANIFEST_NAME), options).get("totals")
        if not isinstance(totals, dict):
            return {}
        rows += int(totals.get("rows", 0))
        by_category = totals.get("by_category") or {}
        if categories and by_category:
            counts = {}
            for key, count in by_category.items():
                task, _, category = key.partition("/")
                if category in categories:
                    counts[task] = counts.get(task, 0) + int(count)
        else:
            counts = {task: int(count) for task, count in (totals.get("by_task") or {}).items()}
        for task, count in counts.items():
            if not tasks or task in tasks:
                by_task[task] = by_task.get(task, 0) + count
    return {"rows": rows, "by_task": by_task}


def ray_dataset(source: DataSource, options: StorageOptions | None, shuffle_seed: int | None = None):
    """A streaming Ray Data dataset over the source (nothing is read on the driver).

    With ``shuffle_seed``, the shard files are read in a seeded random order, new each epoch:
    the data engine writes shards grouped by task and category, and a local shuffle buffer alone
    would then serve one category after another.
    """
    import ray.data

    fs, _ = storage.pyarrow_filesystem(source.uri, options)
    shuffle = None if shuffle_seed is None else ray.data.FileShuffleConfig(seed=shuffle_seed)
    dataset = ray.data.read_parquet(source.backend_paths(), filesystem=fs, shuffle=shuffle,
                                    columns=list(source.columns) if source.columns else None)
    expr = source.ray_filter()
    # Arrow-native predicate: Ray pushes it down to the parquet scan where it can.
    return dataset if expr is None else dataset.filter(expr=expr)


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Columnar numpy batch in the same shapes Ray's ``batch_format="numpy"`` gives."""
    out = {}
    for name in table.column_names:
        column = table.column(name)
        out[name] = column.to_numpy(zero_copy_only=False)
    return out


class LocalReader:
    """Reads the whole (filtered) table once; each epoch is a seeded permutation split by rank.

    Meant for the local launcher and small to medium datasets (a teacher run on one GPU);
    the Ray launcher streams instead.
    """

    def __init__(self, source: DataSource, options: StorageOptions | None):
        fs, _ = storage.pyarrow_filesystem(source.uri, options)
        dataset = pads.dataset(source.backend_paths(), filesystem=fs, format="parquet")
        self.table = dataset.to_table(
            columns=list(source.columns) if source.columns else None, filter=source.arrow_filter())
        if self.table.num_rows == 0:
            # Only on this failure: what the data does hold (task/category), to spot a typo.
            kept = dataset.to_table(columns=["task", "category"])
            present = sorted({f"{t}/{c}" for t, c in zip(kept.column("task").to_pylist(),
                                                         kept.column("category").to_pylist())})
            hint = f"; the data has {present}" if present else ""
            raise ValueError(f"data: no rows left in {source.label} after the task/category filter"
                             f" (tasks {source.tasks}, categories {source.categories}){hint}")
        # One chunk per column: a random-index take over many parquet row groups costs ~15x more.
        self.table = self.table.combine_chunks()
        log.info("data: %d rows from %s", self.table.num_rows, source.label)

    def epoch_indices(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                      shuffle: bool = True) -> Iterator[np.ndarray]:
        """Row positions of each full batch of this rank's part of ``epoch``."""
        n = self.table.num_rows
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        per_rank = n // world_size  # equal parts, as Ray's streaming_split(equal=True)
        mine = order[rank * per_rank:(rank + 1) * per_rank]
        for start in range(0, len(mine) - batch_size + 1, batch_size):
            yield mine[start:start + batch_size]

    def batches(self, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
                shuffle: bool = True) -> Iterator[dict[str, np.ndarray]]:
        for index in self.epoch_indices(batch_size, seed, epoch, rank, world_size, shuffle):
            yield table_to_numpy(self.table.take(pa.array(index)))

    def collate_all(self, collate: Callable[[dict[str, np.ndarray]], Any], limit_mb: float,
                    probe_rows: int = 256) -> Any | None:
        """Every row through ``collate`` at once, if the result fits in ``limit_mb``; else None.

        The size is estimated from a collated probe of the first rows, before anything big is built.
        """
        n = self.table.num_rows
        probe = collate(table_to_numpy(self.table.slice(0, min(n, probe_rows))))
        per_row = _tensor_bytes(probe) / len(probe)
        estimate_mb = per_row * n / 2**20
        if estimate_mb > limit_mb:
            log.info("data: the %d decoded rows would take ~%.0f MiB, over data.device_cache_mb=%.0f: "
                     "decoding each batch instead", n, estimate_mb, limit_mb)
            return None
        started = time.monotonic()
        everything = collate(table_to_numpy(self.table))
        log.info("data: %d rows decoded once (%.0f MiB, %.1f s); batches are selected from them",
                 n, _tensor_bytes(everything) / 2**20, time.monotonic() - started)
        return everything


def _tensor_bytes(batch: Any) -> int:
    """Bytes held by the tensors among a collated batch's attributes."""
    import torch

    values = vars(batch).values() if hasattr(batch, "__dict__") else [batch]
    return sum(v.element_size() * v.nelement() for v in values if isinstance(v, torch.Tensor))


def sample_rows(source: DataSource, rows: int, seed: int, options: StorageOptions | None,
                spread: int = 32) -> dict[str, np.ndarray]:
    """A seeded sample of ``rows`` rows spread over up to ``spread`` files at a time, reading single
    row groups only: cheap at any dataset size (a fixed evaluation set, not an epoch)."""
    import pyarrow.parquet as pq

    fs, _ = storage.pyarrow_filesystem(source.uri, options)
    rng = np.random.default_rng(seed)
    all_paths = source.backend_paths()
    paths = [all_paths[i] for i in rng.permutation(len(all_paths))]
    expr, taken, count = source.arrow_filter(), [], 0
    for start in range(0, len(paths), spread):
        files = [pq.ParquetFile(fs.open_input_file(p)) for p in paths[start:start + spread]]
        groups = [list(rng.permutation(f.num_row_groups)) for f in files]
        per_group = max(1, -(-rows // len(files)))
        while count < rows and any(groups):
            for file, order in zip(files, groups):
                if not order or count >= rows:
                    continue
                table = file.read_row_group(int(order.pop(0)), columns=list(source.columns) if source.columns else None)
                if expr is not None:
                    table = table.filter(expr)
                keep = np.sort(rng.permutation(table.num_rows)[:min(per_group, rows - count)])
                taken.append(table.take(pa.array(keep, type=pa.int64())))
                count += len(keep)
        if count >= rows:
            break
    if count == 0:
        raise ValueError(f"data.uri: no rows in {source.label} after the task/category filter")
    return table_to_numpy(pa.concat_tables(taken).combine_chunks())


def batches_per_epoch(rows: int, batch_size: int, world_size: int) -> int:
    return (rows // world_size) // batch_size


def _nbytes(rows: dict[str, np.ndarray]) -> int:
    total = 0
    for column in rows.values():
        if column.dtype == object:
            total += sum(len(v) if isinstance(v, (bytes, str)) else getattr(v, "nbytes", 64)
                         for v in column)
        else:
            total += column.nbytes
    return total


class EpochCache:
    """Keeps a worker's part of the dataset in memory after its first full epoch, if it fits.

    Every Ray Data epoch re-runs the streaming read (tasks, split coordination), a fixed cost
    that dominates when an epoch is only tens of steps. When each worker's part fits in
    ``limit_mb`` (all ranks must agree: one all-reduce at the end of the first epoch), later
    epochs are seeded permutations of the cached rows. Larger datasets keep streaming.
    """

    def __init__(self, limit_mb: float, batch_size: int, seed: int, rank: int, world_size: int,
                 device) -> None:
        self.limit = int(limit_mb * 2**20)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.device = device
        self.parts: list[dict[str, np.ndarray]] | None = [] if self.limit > 0 else None
        self.size = 0
        self.table: dict[str, np.ndarray] | None = None

    @property
    def ready(self) -> bool:
        return self.table is not None

    def collect(self, source: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        """Pass batches through, keeping copies; at the end of the epoch decide with all ranks."""
        for rows in source:
            if self.parts is not None:
                self.size += _nbytes(rows)
                if self.size > self.limit:
                    self.parts = None  # too big for this worker: keep streaming
                else:
                    self.parts.append(rows)
            yield rows
        fits = self.parts is not None and len(self.parts) > 0
        if self.limit > 0 and self.world_size > 1:
            import torch

            if torch.distributed.is_initialized():
                flag = torch.tensor([int(fits)], dtype=torch.int32, device=self.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
                fits = bool(flag.item())
        if fits and self.parts:
            self.table = {name: np.concatenate([p[name] for p in self.parts]) for name in self.parts[0]}
            log.info("data: rank %d keeps its %d rows (%.1f MiB) in memory for later epochs",
                     self.rank, len(next(iter(self.table.values()))), self.size / 2**20)
        self.parts = None if self.table is None else []

    def batches(self, epoch: int, shuffle: bool) -> Iterator[dict[str, np.ndarray]]:
        assert self.table is not None
        n = len(next(iter(self.table.values())))
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(n) if shuffle else np.arange(n)
        for start in range(0, n - self.batch_size + 1, self.batch_size):
            index = order[start:start + self.batch_size]
            yield {name: column[index] for name, column in self.table.items()}


def check_shards_fit(transformer_config: dict, roots: tuple[str, ...], options: StorageOptions | None,
                     model: str) -> None:
    """Shards made with another teacher (other latent channels or text width) would end in a
    matrix-shape error on the first step; say so up front, naming both."""
    want = {"latent_channels": transformer_config.get("out_channels"),
            "text_embed_dim": transformer_config.get("joint_attention_dim")}
    for root in roots:
        uri = storage.join(root, MANIFEST_NAME)
        if not storage.exists(uri, options):
            continue  # the data source reports a missing manifest itself
        manifest = storage.read_json(uri, options)
        for key, wanted in want.items():
            got = manifest.get(key)
            if got is not None and wanted is not None and int(got) != int(wanted):
                raise ValueError(f"data.uri: {root} was precomputed for another model ({key} {got}; {model} "
                                 f"takes {wanted}): precompute the data with that model's pipeline, or point "
                                 "the objective at the teacher that made these shards")
