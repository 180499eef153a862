"""DMD batches: shard rows split by task, served at the mixture's ratio, decoded to tensors.

The runtime streams mixed rows (``train.batch_size`` per call, any task). The DMD objective
needs whole-task batches in the order its :class:`~trainer.mixture.MixturePlan` says, so
:class:`TaskBuffer` keeps a small per-task buffer: ``collate`` only splits rows by task
(cheap), and ``train_step`` pulls more rows until the planned task has a full batch. Rows of
a task the plan does not need right now wait in its buffer (bounded: the oldest are dropped
and counted, as a sampler would skip them).
"""

from __future__ import annotations

import io
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fewstep.contract import mask_from_bytes, tensor_from_bytes
from fewstep.models.tokens import PromptEmbeds
from trainer.objectives.base import iter_columns

# Columns the DMD objective reads from shards (no image bytes exist in shards anyway).
DMD_COLUMNS = (
    "id", "task", "category", "dtype", "prompt_embeds", "prompt_embeds_shape", "prompt_mask",
    "negative_embeds", "negative_embeds_shape", "negative_mask", "latents", "latents_shape",
    "source_latents", "source_latents_shape",
)


@dataclass
class RowBlock:
    """Rows of one runtime batch, split by task (what ``collate`` returns)."""

    by_task: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @classmethod
    def from_columns(cls, rows: dict[str, np.ndarray]) -> RowBlock:
        block = cls()
        for row in iter_columns(rows):
            block.by_task.setdefault(str(row["task"]), []).append(row)
        return block

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_task.values())


@dataclass
class DMDBatch:
    """One whole-task batch on the device."""

    task: str
    ids: list[str]
    categories: list[str]
    cond: PromptEmbeds
    negative: PromptEmbeds | None  # edit rows: empty prompt + source image
    latents: torch.Tensor | None  # [B, C, h, w] (zeros for rows without; see latents_mask)
    latents_mask: torch.Tensor | None  # [B] 1.0 where the row has latents
    source_latents: torch.Tensor | None  # [B, C, h', w'] (edit)

    def __len__(self) -> int:
        return len(self.ids)


class TaskBuffer:
    """Per-task row buffers between the runtime's mixed stream and the mixture plan."""

    def __init__(self, batch_size: int, max_rows_per_task: int):
        self.batch_size = batch_size
        self.max_rows = max(max_rows_per_task, batch_size)
        self.buffers: dict[str, deque] = {}
        self.dropped: dict[str, int] = {}
        self.seen: dict[str, int] = {}

    def push(self, block: RowBlock) -> None:
        for task, rows in block.by_task.items():
            buf = self.buffers.setdefault(task, deque())
            buf.extend(rows)
            self.seen[task] = self.seen.get(task, 0) + len(rows)
            overflow = len(buf) - self.max_rows
            for _ in range(max(0, overflow)):
                buf.popleft()
            if overflow > 0:
                self.dropped[task] = self.dropped.get(task, 0) + overflow

    def ready(self, task: str) -> bool:
        return len(self.buffers.get(task, ())) >= self.batch_size

    def pop(self, task: str) -> list[dict[str, Any]]:
        buf = self.buffers[task]
        return [buf.popleft() for _ in range(self.batch_size)]


def _tensor(row: dict, name: str) -> torch.Tensor | None:
    data = row.get(name)
    if data is None:
        return None
    shape = row[f"{name}_shape"]
    return torch.from_numpy(np.array(tensor_from_bytes(data, shape, str(row["dtype"])), dtype=np.float32))


def _embeds(rows: list[dict], name: str, mask_name: str) -> PromptEmbeds:
    items = []
    for row in rows:
        emb = _tensor(row, name)
        if emb is None:
            raise ValueError(f"shard row {row.get('id')!r}: {name} is missing")
        mask = torch.from_numpy(mask_from_bytes(row[mask_name]).astype(np.int64))
        if mask.numel() != emb.shape[0]:
            raise ValueError(f"shard row {row.get('id')!r}: {mask_name} has {mask.numel()} entries "
                             f"for {emb.shape[0]} tokens")
        items.append(PromptEmbeds(emb[None], mask[None]))
    return PromptEmbeds.cat(items)


def _stack(rows: list[dict], name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Stacked tensors (zeros where a row has none) and a [B] mask of the rows that have one."""
    tensors = [_tensor(row, name) for row in rows]
    present = [t for t in tensors if t is not None]
    if not present:
        return None, None
    shapes = {tuple(t.shape) for t in present}
    if len(shapes) > 1:
        raise ValueError(f"{name}: rows of one batch have different shapes {sorted(shapes)}; "
                         "precompute every row at one resolution")
    zeros = torch.zeros_like(present[0])
    mask = torch.tensor([t is not None for t in tensors], dtype=torch.float32)
    return torch.stack([zeros if t is None else t for t in tensors]), mask


def decode_rows(rows: list[dict[str, Any]], device: torch.device) -> DMDBatch:
    """Shard rows of one task -> a :class:`DMDBatch` on ``device`` (prompts zero-padded)."""
    tasks = {str(r["task"]) for r in rows}
    if len(tasks) != 1:
        raise ValueError(f"a DMD batch holds one task, got {sorted(tasks)}")
    task = tasks.pop()
    cond = _embeds(rows, "prompt_embeds", "prompt_mask").trimmed()
    negative = None
    if task == "edit":
        negative = _embeds(rows, "negative_embeds", "negative_mask").trimmed()
    latents, latents_mask = _stack(rows, "latents")
    source, source_mask = _stack(rows, "source_latents")
    if task == "edit" and (source_mask is None or not bool(source_mask.all())):
        bad = [r.get("id") for r in rows if r.get("source_latents") is None]
        raise ValueError(f"edit rows without source_latents: {bad[:5]}; re-run precompute")
    return DMDBatch(
        task=task,
        ids=[str(r["id"]) for r in rows],
        categories=[str(r["category"]) for r in rows],
        cond=cond.to(device),
        negative=None if negative is None else negative.to(device),
        latents=None if latents is None else latents.to(device),
        latents_mask=None if latents_mask is None else latents_mask.to(device),
        source_latents=None if source is None else source.to(device),
    )


def load_empty_prompt(data_uri: str, options=None) -> PromptEmbeds:
    """The empty-prompt embedding of a shards dataset (T2I CFG), one row ``[1, L, D]``."""
    import pyarrow.parquet as pq

    from fewstep import storage

    manifest = storage.read_json(storage.join(data_uri, "manifest.json"), options)
    rel = (manifest.get("empty_prompt") or {}).get("path", "empty_prompt.parquet")
    uri = storage.join(data_uri, rel)
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"data.uri: {uri} is missing: the T2I CFG needs the empty-prompt "
                                "embedding that precompute writes; re-run precompute")
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))
    return _embeds(table.to_pylist()[:1], "prompt_embeds", "prompt_mask").trimmed()
