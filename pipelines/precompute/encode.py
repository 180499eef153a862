"""The work done on Ray workers: load a shard's curated rows, encode prompts, encode images.

Every function here takes and returns a pyarrow table holding exactly one shard (its rows in
plan order, columns ``_shard`` and ``_pos``). Models run over the shard in fixed batches of the
configured size, in eval mode, so a rerun computes the same bits. Rows that cannot be used get
``_reject`` (a contract reason) and ``_detail`` instead of failing the whole run.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fewstep import contract, storage
from fewstep.storage import StorageOptions
from pipelines.precompute.plan import EMPTY_PROMPT_ID, EMPTY_SHARD, ShardPlan

log = logging.getLogger(__name__)

_CURATED_COLUMNS = ["id", "task", "category", "prompt", "image", "source_image"]
_SHAPE = pa.list_(pa.int32())
_TEXT_COLUMNS = {
    "prompt_embeds": pa.binary(), "prompt_embeds_shape": _SHAPE, "prompt_mask": pa.binary(),
    "negative_embeds": pa.binary(), "negative_embeds_shape": _SHAPE, "negative_mask": pa.binary(),
}
_VAE_COLUMNS = {
    "latents": pa.binary(), "latents_shape": _SHAPE,
    "source_latents": pa.binary(), "source_latents_shape": _SHAPE,
}


# ---------------------------------------------------------------------------
# Loading (a plain task)
# ---------------------------------------------------------------------------

def read_row_range(fs, path: str, start: int, stop: int, columns: Sequence[str]) -> pa.Table:
    """Rows ``[start, stop)`` of a Parquet file, reading only the row groups that hold them."""
    pf = pq.ParquetFile(fs.open_input_file(path))
    groups, offset, first = [], 0, None
    for rg in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(rg).num_rows
        if offset + n > start and offset < stop:
            groups.append(rg)
            first = offset if first is None else first
        offset += n
    if not groups:
        return pf.schema_arrow.empty_table().select(list(columns))
    table = pf.read_row_groups(groups, columns=list(columns))
    return table.slice(start - first, stop - start)


def load_shard(batch: pa.Table, input_uri: str, options: StorageOptions | None,
               negative_prompt: str) -> pa.Table:
    """Plan items (one JSON per row, normally one per block) -> that shard's curated rows."""
    fs, _ = storage.pyarrow_filesystem(input_uri, options)
    tables = []
    for text in batch.column("plan").to_pylist():
        plan = ShardPlan.from_json(text)
        if plan.index == EMPTY_SHARD:
            table = pa.table({"id": [EMPTY_PROMPT_ID], "task": ["t2i"], "category": [""],
                              "prompt": [negative_prompt], "image": pa.array([None], pa.binary()),
                              "source_image": pa.array([None], pa.binary()),
                              "_input": pa.array([None], pa.string())})
        else:
            parts = [read_row_range(fs, r.path, r.start, r.stop, _CURATED_COLUMNS).cast(_curated_subschema())
                     for r in plan.ranges]
            # Which curated part each row came from, for its reject record.
            origin = [_part_uri(input_uri, r.path) for r, part in zip(plan.ranges, parts)
                      for _ in range(part.num_rows)]
            table = pa.concat_tables(parts).append_column("_input", pa.array(origin, pa.string()))
        if table.num_rows != plan.rows:
            raise RuntimeError(f"shard {plan.index}: read {table.num_rows} rows, planned {plan.rows}; "
                               "the curated input changed during the run")
        n = table.num_rows
        table = table.append_column("_shard", pa.array([plan.index] * n, pa.int32()))
        table = table.append_column("_pos", pa.array(range(n), pa.int32()))
        table = table.append_column("_expected", pa.array([plan.rows] * n, pa.int32()))
        # The empty-prompt item encodes the negative prompt, which may well be blank.
        reasons, details = ([None], [None]) if plan.index == EMPTY_SHARD else _check_rows(table)
        table = table.append_column("_reject", pa.array(reasons, pa.string()))
        table = table.append_column("_detail", pa.array(details, pa.string()))
        tables.append(table)
    return pa.concat_tables(tables)


def _part_uri(input_uri: str, path: str) -> str:
    return f"s3://{path}" if storage.is_s3(input_uri) else path


def _curated_subschema() -> pa.Schema:
    """The curated columns precompute reads, all nullable: a null in a required field must reach
    ``_check_rows`` as one reject, not fail the cast of the whole shard (column types were
    checked when the run was planned)."""
    return pa.schema([contract.CURATED_SCHEMA.field(n).with_nullable(True) for n in _CURATED_COLUMNS])


def _check_rows(table: pa.Table) -> tuple[list[str | None], list[str | None]]:
    reasons: list[str | None] = []
    details: list[str | None] = []
    columns = [table.column(n).to_pylist() for n in ("id", "task", "category", "prompt")]
    for rid, task, category, prompt, no_source in zip(*columns, table.column("source_image").is_null().to_pylist()):
        reason, detail = None, None
        if rid is None or not rid.strip():
            reason, detail = "missing_field", "id is null or empty"
        elif task not in contract.TASKS:
            reason, detail = "schema", f"task {task!r} is not one of {contract.TASKS}"
        elif category is None or not category.strip():
            reason, detail = "missing_field", "category is null or empty"
        elif task == "edit" and no_source:
            reason, detail = "missing_field", "edit row without source_image"
        elif prompt is None or not prompt.strip():
            reason, detail = "prompt_empty", "no prompt" if prompt is None else "prompt is blank"
        reasons.append(reason)
        details.append(detail)
    return reasons, details


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

class ImageTooSmall(ValueError):
    """An image smaller than the VAE can encode at its own size."""


def decode_image(data: bytes, size: int | None, multiple: int = 1):
    """PNG/JPEG bytes -> RGB PIL image (converted as curate converts: alpha on white, 16-bit
    scaled), resized to ``size`` x ``size`` if given, else with each side rounded down to a
    multiple of ``multiple``; at its own size, a side below ``multiple`` raises ImageTooSmall."""
    from PIL import Image

    from pipelines.curate.decode import to_rgb

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        rgb = to_rgb(img)
    if size is None and min(rgb.size) < multiple:
        raise ImageTooSmall(f"{rgb.width}x{rgb.height}, a side below {multiple} px (the VAE factor "
                            "x 2x2 packing); set resolution to resize every image")
    target = (size, size) if size is not None else tuple(side // multiple * multiple for side in rgb.size)
    if rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
    return rgb


def _decode_or_reject(table: pa.Table, column: str, size: int | None, reasons: list, details: list,
                      multiple: int = 1):
    from pipelines.curate.decode import looks_truncated

    images = [None] * table.num_rows
    for i, data in enumerate(table.column(column).to_pylist()):
        if data is None or reasons[i] is not None:
            continue
        if len(data) == 0:
            reasons[i], details[i] = "image_empty", f"{column} has zero bytes"
            continue
        try:
            images[i] = decode_image(data, size, multiple)
        except ImageTooSmall as exc:
            reasons[i], details[i] = "image_too_small", f"{column}: {exc}"
        except Exception as exc:  # any decoder failure is a reject, never a crash
            # No object addresses in the detail: reruns must write the same reject bytes.
            message = re.sub(r"<[^>]* at 0x[0-9a-fA-F]+>", "<data>", str(exc))
            truncated = "truncat" in message.lower() or looks_truncated(data)
            reasons[i] = "image_truncated" if truncated else "image_undecodable"
            details[i] = f"{column}: {type(exc).__name__}: {message}"
    return images


# ---------------------------------------------------------------------------
# Actors
# ---------------------------------------------------------------------------

def pool_threads(pool) -> int:
    """torch threads of one actor of ``pool``: ``torch_threads``, else its whole CPUs (at least 1).

    Set explicitly under both executors: CPU float results depend on the thread count, so a run
    made by Ray actors and one made in-process (or resumed the other way) write the same bytes.
    """
    return pool.torch_threads or max(1, int(pool.num_cpus))


def actor_args(cfg, pool, teacher: str, options: StorageOptions | None) -> tuple:
    """The constructor arguments of one pool's actors, the same for the Ray and local executors."""
    return (teacher, options, cfg.model_dtype, cfg.dtype, pool.num_gpus, pool_threads(pool))


class _ModelActor:
    components: tuple[str, ...] = ()

    def __init__(self, teacher: str, options: StorageOptions | None, model_dtype: str, dtype: str,
                 num_gpus: float, torch_threads: int | None, **load_kwargs):
        import torch

        from fewstep.models.adapter import QwenImageAdapter

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if num_gpus > 0 else "cpu"
        self.dtype = dtype
        torch_dtype = {"float32": torch.float32, "float16": torch.float16,
                       "bfloat16": torch.bfloat16}[model_dtype]
        self.adapter = QwenImageAdapter.load(teacher, components=self.components, device=self.device,
                                             dtype=torch_dtype, storage=options, **load_kwargs)
        for module in (getattr(self.adapter, name, None) for name in self.components):
            if module is not None and hasattr(module, "eval"):
                module.eval()
        log.info("%s ready on %s (pid %d, %d threads)", type(self).__name__, self.device, os.getpid(),
                 torch.get_num_threads())

    def _bytes(self, array: np.ndarray) -> tuple[bytes, list[int]]:
        return contract.tensor_to_bytes(array, self.dtype)


def per_shard(method):
    """Run ``method`` on each shard of a block separately: batches never mix two shards, so the
    bits of a shard do not depend on which other shard shared its block."""
    def wrapper(self, table: pa.Table) -> pa.Table:
        shards = table.column("_shard")
        values = sorted(set(shards.to_pylist()))
        if len(values) <= 1:
            return method(self, table)
        return pa.concat_tables([method(self, table.filter(pc.equal(shards, k))) for k in values])

    wrapper.__doc__ = method.__doc__
    return wrapper


def _chunks(indices: list[int], size: int):
    for i in range(0, len(indices), size):
        yield indices[i:i + size]


def _set_columns(table: pa.Table, values: dict[str, list], types: dict[str, pa.DataType]) -> pa.Table:
    for name, typ in types.items():
        column = pa.array(values[name], typ)
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, column)
        else:
            table = table.append_column(name, column)
    return table


class TextEncodeActor(_ModelActor):
    """The teacher's text encoder: prompt embeddings (edit rows: with the source image)."""

    components = ("text_encoder",)

    def __init__(self, *args, batch_size: int, negative_prompt: str, condition_resolution: int | None,
                 **kwargs):
        super().__init__(*args, condition_image_size=condition_resolution, **kwargs)
        self.batch_size = batch_size
        self.negative_prompt = negative_prompt

    @per_shard
    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        n = table.num_rows
        reasons = table.column("_reject").to_pylist()
        details = table.column("_detail").to_pylist()
        # The adapter sizes the condition image for its vision encoder itself.
        sources = _decode_or_reject(table, "source_image", None, reasons, details)
        tasks = table.column("task").to_pylist()
        prompts = table.column("prompt").to_pylist()
        out = {name: [None] * n for name in _TEXT_COLUMNS}
        t2i = [i for i in range(n) if reasons[i] is None and tasks[i] == "t2i"]
        edit = [i for i in range(n) if reasons[i] is None and tasks[i] == "edit"]
        with torch.inference_mode():
            for rows in _chunks(t2i, self.batch_size):
                self._store(out, "prompt", rows, self.adapter.encode_prompts([prompts[i] for i in rows]))
            for rows in _chunks(edit, self.batch_size):
                images = [sources[i] for i in rows]
                self._store(out, "prompt", rows,
                            self.adapter.encode_prompts([prompts[i] for i in rows], images=images))
                self._store(out, "negative", rows,
                            self.adapter.encode_prompts([self.negative_prompt] * len(rows), images=images))
        table = _set_columns(table, out, _TEXT_COLUMNS)
        table = table.set_column(table.column_names.index("_reject"), "_reject", pa.array(reasons, pa.string()))
        return table.set_column(table.column_names.index("_detail"), "_detail", pa.array(details, pa.string()))

    def _store(self, out: dict, prefix: str, rows: list[int], encoded) -> None:
        embeds = encoded.embeds.float().cpu().numpy()
        masks = encoded.mask.cpu().numpy().astype(np.uint8)
        for j, i in enumerate(rows):
            embed, mask = trim_padding(embeds[j], masks[j])
            out[f"{prefix}_embeds"][i], out[f"{prefix}_embeds_shape"][i] = self._bytes(embed)
            out[f"{prefix}_mask"][i] = contract.mask_to_bytes(mask)


def trim_padding(embed: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop right padding (stored rows are variable length; the reader pads per batch)."""
    valid = int(mask.sum())
    if 0 < valid < len(mask) and mask[:valid].all():
        return embed[:valid], mask[:valid]
    return embed, mask


class VaeEncodeActor(_ModelActor):
    """The teacher's VAE: normalised latents of T2I images, edit targets and edit sources."""

    components = ("vae",)

    def __init__(self, *args, batch_size: int, resolution: int | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.batch_size = batch_size
        self.resolution = resolution or self.adapter.resolution
        self.multiple = self.adapter.vae_scale_factor * 2

    @per_shard
    def __call__(self, table: pa.Table) -> pa.Table:
        import torch

        n = table.num_rows
        reasons = table.column("_reject").to_pylist()
        details = table.column("_detail").to_pylist()
        targets = _decode_or_reject(table, "image", self.resolution, reasons, details, self.multiple)
        sources = _decode_or_reject(table, "source_image", self.resolution, reasons, details, self.multiple)
        out = {name: [None] * n for name in _VAE_COLUMNS}
        with torch.inference_mode():
            for prefix, images in (("latents", targets), ("source_latents", sources)):
                todo = [i for i in range(n) if images[i] is not None and reasons[i] is None]
                for rows in _same_size_chunks(todo, images, self.batch_size):
                    latents = self.adapter.encode_images([images[i] for i in rows]).float().cpu().numpy()
                    for j, i in enumerate(rows):
                        out[prefix][i], out[f"{prefix}_shape"][i] = self._bytes(latents[j])
        table = _set_columns(table, out, _VAE_COLUMNS)
        table = table.set_column(table.column_names.index("_reject"), "_reject", pa.array(reasons, pa.string()))
        return table.set_column(table.column_names.index("_detail"), "_detail", pa.array(details, pa.string()))


def _same_size_chunks(indices: list[int], images: list, size: int):
    """Batches of ``size`` in row order; an image of another size starts a new batch."""
    batch: list[int] = []
    for i in indices:
        if batch and (len(batch) == size or images[i].size != images[batch[0]].size):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def drop_images(table: pa.Table) -> pa.Table:
    """Used instead of the VAE stage when the input has no images at all (prompt-only T2I)."""
    return _set_columns(table, {name: [None] * table.num_rows for name in _VAE_COLUMNS}, _VAE_COLUMNS)


class TeacherEncodeActor:
    """Both encoders in one actor: the text encoder, then the VAE (or ``drop_images``), per block.

    One process, one start-up and one model load per actor, and no hand-off of image bytes
    between two pools. On a small CPU machine two pipelined single-thread pools leave a core idle
    whenever one encoder waits for the other; one actor with every thread does not.
    """

    def __init__(self, teacher: str, options: StorageOptions | None, model_dtype: str, dtype: str,
                 num_gpus: float, torch_threads: int | None, *, text_batch_size: int, vae_batch_size: int,
                 negative_prompt: str, condition_resolution: int | None, resolution: int | None,
                 has_images: bool):
        common = (teacher, options, model_dtype, dtype, num_gpus, torch_threads)
        self.text = TextEncodeActor(*common, batch_size=text_batch_size, negative_prompt=negative_prompt,
                                    condition_resolution=condition_resolution)
        self.vae = VaeEncodeActor(*common, batch_size=vae_batch_size, resolution=resolution) if has_images else None

    def __call__(self, table: pa.Table) -> pa.Table:
        table = self.text(table)
        return self.vae(table) if self.vae is not None else drop_images(table)
