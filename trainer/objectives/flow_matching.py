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
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from fewstep.config import StrictModel
from fewstep.models.adapter import QwenImageAdapter
from fewstep.models.saved import SavedModel
from fewstep.models.tokens import PromptEmbeds
from pipelines.shards import ShardBatch, collate_shard_rows, load_empty_prompt
from trainer.objectives.base import (
    ModelSpec,
    Objective,
    ObjectiveEnv,
    OptimizerConfig,
    TrainState,
)
from trainer.objectives.dmd_math import renoise
from trainer.objectives.flow_heldout import HeldoutConfig, HeldoutScorer
from trainer.runtime.data import check_shards_fit
from trainer.teachers.init import InitConfig, prepare_pipeline_dir

log = logging.getLogger(__name__)

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
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig,
                                   description="Periodic loss on held-out shards (memorisation check).")


def _pad_to(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = length - embeds.shape[1]
    return (torch.nn.functional.pad(embeds, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad)))


def decode_shard_rows(rows: dict[str, np.ndarray], device: torch.device) -> ShardBatch:
    """Shard rows -> ``ShardBatch``; every row must carry target latents (and edit rows a source)."""
    batch = collate_shard_rows(rows, device=device)
    if batch.latents is None or not bool(batch.has_latents.all()):
        missing = [i for i, ok in zip(batch.ids, batch.has_latents.tolist() if batch.has_latents is not None
                                      else [False] * len(batch)) if not ok]
        raise ValueError(f"shard rows {missing[:5]}: no latents; flow matching needs target images "
                         "(prompt-only shards are for DMD)")
    edit = torch.tensor([t == "edit" for t in batch.tasks], device=device)
    if bool(edit.any()):
        has_source = batch.has_source if batch.has_source is not None else torch.zeros_like(edit)
        if not bool((has_source | ~edit).all()):
            raise ValueError("shard rows: an edit row without source_latents")
    return batch


def sample_t(n: int, cfg: TimestepConfig, generator: torch.Generator) -> torch.Tensor:
    if cfg.sampling == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(cfg.mean + cfg.std * torch.randn(n, generator=generator))


class FlowMatchingObjective(Objective):
    """Trains a pipeline's transformer with flow matching on precomputed shards."""

    name = "flow_matching"
    Config = FlowMatchingConfig
    data_kind = "shards"
    selectable_batches = True  # ShardBatch.select; collate_shard_rows passes a ShardBatch through
    snapshot_prefixes = ("heldout_", "train_fixed_loss")

    def __init__(self, config: FlowMatchingConfig, env: ObjectiveEnv):
        super().__init__(config, env)
        self.config: FlowMatchingConfig = config
        self.pipeline_uri = prepare_pipeline_dir(config.init, env.work_dir, env.storage)
        # Configs only: the transformer is built by the runtime from `model_specs` (partitioned
        # from the start under ZeRO-3).
        self.adapter = QwenImageAdapter.load(self.pipeline_uri, components=(), device="cpu",
                                             storage=env.storage)
        self.saved = SavedModel(self.pipeline_uri, "transformer", env.storage)
        check_shards_fit(self.adapter.transformer_config, env.roots, env.storage,
                         f"objective.init ({config.init.path or self.pipeline_uri})")
        self.empty: PromptEmbeds | None = None
        self.heldout: HeldoutScorer | None = None

    def describe(self) -> str:
        return f"flow matching ({self.config.role})"

    def model_specs(self) -> list[ModelSpec]:
        return [ModelSpec("transformer", build=self.saved.load, trainable=True,
                          optimizer=self.config.optimizer, saved=self.saved)]

    def setup(self, state: TrainState) -> None:
        if self.config.caption_dropout > 0:
            if not self.env.data_uri:
                raise ValueError("data.uri: required (the shard dataset)")
            self.empty = load_empty_prompt(self.env.data_uri, self.env.storage, device=state.device)
        if self.config.heldout.every:
            self.heldout = HeldoutScorer(self.config.heldout, self.adapter, self.env.data_uri, self.env,
                                         self.collate)

    def collate(self, rows: dict[str, np.ndarray], device: torch.device) -> ShardBatch:
        return decode_shard_rows(rows, device)

    def _conditions(self, batch: ShardBatch, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings with dropped rows replaced by their unconditional embedding."""
        embeds, mask = batch.prompt_embeds, batch.prompt_mask
        if not bool(drop.any()):
            return embeds, mask
        if self.empty is None:
            raise RuntimeError("caption dropout needs the empty-prompt embedding (setup was not run)")
        n = len(batch)
        edit = torch.tensor([t == "edit" for t in batch.tasks], device=embeds.device)
        drop = drop.to(embeds.device)
        if bool((drop & edit).any()) and (batch.negative_embeds is None
                                          or not bool(batch.has_negative[drop & edit].all())):
            raise ValueError("caption dropout: an edit row without negative_embeds (re-run precompute)")
        uncond_e = self.empty.embeds.to(embeds).expand(n, -1, -1)
        uncond_m = self.empty.mask.to(mask).expand(n, -1)
        parts = [(embeds, mask), (uncond_e, uncond_m)]
        if batch.negative_embeds is not None:
            parts.append((batch.negative_embeds.to(embeds), batch.negative_mask.to(mask)))
        length = max(int(e.shape[1]) for e, _ in parts)
        parts = [_pad_to(e, m, length) for e, m in parts]
        (embeds, mask), (uncond_e, uncond_m) = parts[0], parts[1]
        if len(parts) == 3:
            neg_e, neg_m = parts[2]
            uncond_e = torch.where(edit.view(-1, 1, 1), neg_e, uncond_e)
            uncond_m = torch.where(edit.view(-1, 1), neg_m, uncond_m)
        return (torch.where(drop.view(-1, 1, 1), uncond_e, embeds),
                torch.where(drop.view(-1, 1), uncond_m, mask))

    def loss(self, state: TrainState, net, batch: ShardBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-matching loss of ``net`` on ``batch`` (differentiable); also per-task values."""
        n = len(batch)
        g = state.generator
        x = batch.latents.float()
        t = sample_t(n, self.config.timestep, g)
        eps = torch.randn(x.shape, generator=g).to(x.device)
        drop = torch.rand(n, generator=g) < self.config.caption_dropout
        t = t.to(x.device)
        z = renoise(x, t, eps)  # the one definition of the path, shared with DMD
        target = eps - x
        embeds, mask = self._conditions(batch, drop)
        total = x.new_zeros(())
        values: dict[str, float] = {}
        tasks = ("t2i", "edit")
        here = [any(name == task for name in batch.tasks) for task in tasks]
        # Same forward passes on every rank (ZeRO-3 gathers parameters collectively per forward).
        for task, needed, present in zip(tasks, state.any_across_ranks(here), here):
            if not needed:
                continue
            idx = [i for i, name in enumerate(batch.tasks) if name == task] if present else [0]
            sel = torch.tensor(idx, device=x.device)
            cond = PromptEmbeds(state.cast(embeds[sel]), mask[sel]).trimmed()
            source = None
            if task == "edit":
                # A rank without edit rows runs one zero-weighted row with a blank source.
                source = batch.source_latents[sel] if present else torch.zeros_like(x[sel])
                source = state.cast(source)
            with state.autocast():
                pred = self.adapter.predict_velocity(net, state.cast(z[sel]), state.cast(t[sel]), cond,
                                                     source_latents=source)
            per_task = torch.nn.functional.mse_loss(pred.float(), target[sel])
            if present:
                total = total + per_task * (len(idx) / n)
                values[f"loss_{task}"] = float(per_task.detach())
            else:
                total = total + per_task * 0.0
        return total, values

    def train_step(self, state: TrainState, batch: ShardBatch) -> dict[str, float]:
        handle = state.models["transformer"]
        loss, values = self.loss(state, handle.net, batch)
        handle.backward(loss)
        stepped = handle.step()
        scored: dict[str, float] = {}
        if self.heldout and self.config.heldout.due(state.step + 1, state.max_steps):
            scored = self.heldout.run(state, handle.net)
        return {"loss": float(loss.detach()), **values, **stepped, **scored}

    def initial_metrics(self, state: TrainState) -> dict[str, float]:
        return self.heldout.run(state, state.models["transformer"].net) if self.heldout else {}

    def closing_metrics(self, state: TrainState) -> dict[str, float]:
        # A step the schedule scored already (an `every` multiple) needs no second pass.
        if not self.heldout or self.config.heldout.due(state.step, state.max_steps):
            return {}
        return self.heldout.run(state, state.models["transformer"].net)

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
