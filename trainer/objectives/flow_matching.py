"""Flow matching (teacher training, and the recipe the fake score follows).

Path ``z_t = (1 - t) x + t eps``, target velocity ``eps - x``, loss ``MSE(v_theta(z_t, t, c), eps - x)``.
``t`` is logit-normal (``sigmoid(N(mean, std))``) or uniform. With probability
``caption_dropout`` a row's condition is replaced by its unconditional one (the empty-prompt
embedding for T2I rows, the row's ``negative_embeds`` for edit rows), so classifier-free
guidance works at sampling time. Edit rows carry their source latents in the token sequence
(after the noisy tokens, as Qwen-Image-Edit does); T2I and edit rows of one batch are run as
two forward passes and one backward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fewstep import contract, storage
from fewstep.config import StrictModel
from trainer.objectives.base import (
    ModelSpec,
    Objective,
    ObjectiveEnv,
    OptimizerConfig,
    TrainState,
)
from trainer.teachers.init import InitConfig, prepare_pipeline_dir

log = logging.getLogger(__name__)

EMPTY_PROMPT_NAME = "empty_prompt.parquet"  # written by precompute next to shards/


class TimestepConfig(StrictModel):
    sampling: Literal["logit_normal", "uniform"] = "logit_normal"
    mean: float = 0.0
    std: float = Field(1.0, gt=0)


class FlowMatchingConfig(StrictModel):
    init: InitConfig
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=8e-4))
    caption_dropout: float = Field(0.1, ge=0, le=1, description="Share of rows trained unconditionally.")
    timestep: TimestepConfig = Field(default_factory=TimestepConfig)
    export_shift: float | None = Field(None, gt=0, description="Scheduler shift written on export.")
    role: str = Field("teacher", description="Recorded in the exported pipeline's metadata.")


@dataclass
class FlowBatch:
    """Decoded shard rows on the device (prompt embeddings zero-padded to the batch's longest)."""

    task: list[str]
    category: list[str]
    latents: torch.Tensor  # [B, C, h, w]
    embeds: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] long
    source_latents: torch.Tensor | None  # [B, C, h', w'] for edit rows (zeros elsewhere)
    negative: list[tuple[np.ndarray, np.ndarray] | None]  # edit rows' unconditional (embeds, mask)

    def __len__(self) -> int:
        return len(self.task)


def _tensor(row_value, shape, dtype: str) -> np.ndarray:
    return contract.tensor_from_bytes(row_value, list(shape), dtype).astype(np.float32, copy=False)


def _pad(items: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(max(int(e.shape[0]) for e, _ in items), 1)
    dim = int(items[0][0].shape[1])
    embeds = np.zeros((len(items), length, dim), np.float32)
    mask = np.zeros((len(items), length), np.int64)
    for i, (e, m) in enumerate(items):
        embeds[i, : e.shape[0]] = e
        mask[i, : m.shape[0]] = m
    return torch.from_numpy(embeds), torch.from_numpy(mask)


def decode_shard_rows(rows: dict[str, np.ndarray], device: torch.device) -> FlowBatch:
    """Columnar shard rows (``contract.SHARD_SCHEMA``) -> a :class:`FlowBatch`."""
    n = len(rows["id"])
    latents, sources, prompts, negatives = [], [], [], []
    for i in range(n):
        rid, dtype = rows["id"][i], rows["dtype"][i]
        if rows["latents"][i] is None:
            raise ValueError(f"shard row {rid!r}: no latents; flow matching needs target images "
                             "(precompute without images makes prompt-only shards, for DMD)")
        latents.append(_tensor(rows["latents"][i], rows["latents_shape"][i], dtype))
        embed = _tensor(rows["prompt_embeds"][i], rows["prompt_embeds_shape"][i], dtype)
        prompts.append((embed, contract.mask_from_bytes(rows["prompt_mask"][i])))
        if rows["task"][i] == "edit":
            if rows["source_latents"][i] is None or rows["negative_embeds"][i] is None:
                raise ValueError(f"shard row {rid!r}: edit row without source_latents/negative_embeds")
            sources.append(_tensor(rows["source_latents"][i], rows["source_latents_shape"][i], dtype))
            neg = _tensor(rows["negative_embeds"][i], rows["negative_embeds_shape"][i], dtype)
            negatives.append((neg, contract.mask_from_bytes(rows["negative_mask"][i])))
        else:
            sources.append(None)
            negatives.append(None)
    embeds, mask = _pad(prompts)
    source_latents = None
    if any(s is not None for s in sources):
        shape = next(s.shape for s in sources if s is not None)
        source_latents = torch.from_numpy(np.stack([s if s is not None else np.zeros(shape, np.float32)
                                                    for s in sources])).to(device)
    return FlowBatch(
        task=[str(t) for t in rows["task"]], category=[str(c) for c in rows["category"]],
        latents=torch.from_numpy(np.stack(latents)).to(device), embeds=embeds.to(device),
        mask=mask.to(device), source_latents=source_latents, negative=negatives)


def load_empty_prompt_embedding(data_uri: str, options) -> tuple[np.ndarray, np.ndarray]:
    """The precomputed empty-prompt embedding (T2I unconditional) of a shard dataset."""
    import io

    import pyarrow.parquet as pq

    uri = storage.join(data_uri, EMPTY_PROMPT_NAME)
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"data.uri: {uri} missing: caption dropout needs the empty-prompt "
                                "embedding that precompute writes (re-run precompute)")
    table = pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))
    row = table.slice(0, 1).to_pylist()[0]
    embed = _tensor(row["prompt_embeds"], row["prompt_embeds_shape"], row["dtype"])
    return embed, contract.mask_from_bytes(row["prompt_mask"])


def sample_t(n: int, cfg: TimestepConfig, generator: torch.Generator) -> torch.Tensor:
    if cfg.sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, generator=generator))


class FlowMatchingObjective(Objective):
    """Trains a pipeline's transformer with flow matching on precomputed shards."""

    name = "flow_matching"
    Config = FlowMatchingConfig
    data_kind = "shards"

    def __init__(self, config: FlowMatchingConfig, env: ObjectiveEnv):
        super().__init__(config, env)
        self.config: FlowMatchingConfig = config
        self.pipeline_uri = prepare_pipeline_dir(config.init, env.work_dir, env.storage)
        from fewstep.models.adapter import QwenImageAdapter

        self.adapter = QwenImageAdapter.load(self.pipeline_uri, components=("transformer",),
                                             device="cpu", storage=env.storage)
        self.empty: tuple[np.ndarray, np.ndarray] | None = None

    def describe(self) -> str:
        return f"flow matching ({self.config.role})"

    def model_specs(self) -> list[ModelSpec]:
        return [ModelSpec("transformer", build=lambda: self.adapter.transformer, trainable=True,
                          optimizer=self.config.optimizer)]

    def setup(self, state: TrainState) -> None:
        if self.config.caption_dropout > 0:
            if not self.env.data_uri:
                raise ValueError("data.uri: required (the shard dataset)")
            self.empty = load_empty_prompt_embedding(self.env.data_uri, self.env.storage)

    def collate(self, rows: dict[str, np.ndarray], device: torch.device) -> FlowBatch:
        return decode_shard_rows(rows, device)

    def _conditions(self, batch: FlowBatch, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings with dropped rows replaced by their unconditional embedding."""
        if not bool(drop.any()):
            return batch.embeds, batch.mask
        items = []
        for i in range(len(batch)):
            valid = int(batch.mask[i].sum())
            row = (batch.embeds[i, :valid].cpu().numpy(), batch.mask[i, :valid].cpu().numpy())
            if bool(drop[i]):
                row = batch.negative[i] if batch.task[i] == "edit" else self.empty
                if row is None:
                    raise ValueError("caption dropout needs the empty-prompt embedding (setup not run)")
            items.append(row)
        embeds, mask = _pad(items)
        return embeds.to(batch.embeds.device), mask.to(batch.embeds.device)

    def loss(self, state: TrainState, net, batch: FlowBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss of ``net`` on ``batch`` (differentiable); also per-task values."""
        from fewstep.models.adapter import PromptEmbeds

        n = len(batch)
        g = state.generator
        x = batch.latents.float()
        t = sample_t(n, self.config.timestep, g)
        eps = torch.randn(x.shape, generator=g).to(x.device)
        drop = torch.rand(n, generator=g) < self.config.caption_dropout
        t = t.to(x.device)
        z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
        target = eps - x
        embeds, mask = self._conditions(batch, drop)
        total = x.new_zeros(())
        values: dict[str, float] = {}
        for task in ("t2i", "edit"):
            idx = [i for i, name in enumerate(batch.task) if name == task]
            if not idx:
                continue
            sel = torch.tensor(idx, device=x.device)
            cond = PromptEmbeds(state.cast(embeds[sel]), mask[sel]).trimmed()
            source = state.cast(batch.source_latents[sel]) if task == "edit" else None
            with state.autocast():
                pred = self.adapter.predict_velocity(net, state.cast(z[sel]), state.cast(t[sel]), cond,
                                                     source_latents=source)
            per_task = torch.nn.functional.mse_loss(pred.float(), target[sel])
            total = total + per_task * (len(idx) / n)
            values[f"loss_{task}"] = float(per_task.detach())
        return total, values

    def train_step(self, state: TrainState, batch: FlowBatch) -> dict[str, float]:
        handle = state.models["transformer"]
        loss, values = self.loss(state, handle.net, batch)
        handle.backward(loss)
        stepped = handle.step()
        return {"loss": float(loss.detach()), **values, **stepped}

    def export(self, state: TrainState, out_dir: Path) -> None:
        module = state.models["transformer"].module
        if module.dtype != torch.float32:
            module = _fp32_copy(module)
        self.adapter.save_pipeline(str(out_dir), transformer=module,
                                   scheduler_shift=self.config.export_shift,
                                   extra_meta={"role": self.config.role, "trained_steps": state.step})


def _fp32_copy(module: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(module).float()
