"""Held-out flow-matching loss: does the model generalise, or memorise its training rows?

The training loss alone cannot tell: on a small corpus trained for hundreds of epochs it keeps
falling while the loss on rows the model never saw stalls (measured on the shipped tiny base:
0.008 on its training rows against 0.025 on a fresh corpus at t = 0.6, docs/teachers.md).

Every ``heldout.every`` steps (and at the first and the last step, also one where
``train.max_minutes`` stops the run) the model is scored on a fixed
sample of rows of a held-out shard dataset, with the same fixed noise and the same fixed
timesteps each time, without caption dropout; the same protocol on a fixed sample of the
training rows gives ``train_fixed_loss``, so ``heldout_ratio`` (held-out over training) reads as
the memorisation gap. Metrics: ``heldout_loss``, ``heldout_loss_t2i``, ``heldout_loss_edit``,
``train_fixed_loss``, ``heldout_ratio``.

Every rank scores the same rows (they are few), so ZeRO-3's collective forward passes line up.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from fewstep.config import StrictModel
from fewstep.models.tokens import PromptEmbeds
from pipelines.shards import ShardBatch, load_empty_prompt
from trainer.objectives.dmd_math import flow_matching_loss
from trainer.runtime.config import DataSection
from trainer.runtime.data import open_source, sample_rows

log = logging.getLogger(__name__)

class HeldoutConfig(StrictModel):
    uri: str | None = Field(
        None, description="Held-out shard dataset (a precompute output made with the same teacher "
        "encoders as data.uri, from rows never trained on, e.g. a corpus built with another seed).")
    every: int = Field(0, ge=0, description="Score every N steps (and at the first and last, also when "
                       "train.max_minutes stops the run); 0 disables.")
    rows: int = Field(256, ge=1, description="Rows scored from each dataset (a fixed seeded sample).")
    timesteps: list[float] = Field(
        [0.3, 0.6, 0.9], min_length=1, description="Fixed t values; each row is scored at each.")
    batch_size: int = Field(64, ge=1, description="Rows per forward pass.")
    compare_train: bool = Field(True, description="Also score a fixed sample of the training rows "
                                "(train_fixed_loss, heldout_ratio).")
    tasks: list[Literal["t2i", "edit"]] | None = Field(
        None, description="Score only these tasks (as data.tasks; set both alike for a specialist).")
    categories: list[str] | None = Field(None, description="Score only these categories "
                                         "(as data.categories).")
    seed: int = 0

    @model_validator(mode="after")
    def _check(self) -> HeldoutConfig:
        if self.every and not self.uri:
            raise ValueError("heldout.uri: required when heldout.every > 0 (a precompute output of rows "
                             "never trained on); or set heldout.every: 0")
        bad = [t for t in self.timesteps if not 0.0 < t < 1.0]
        if bad:
            raise ValueError(f"heldout.timesteps: {bad} outside (0, 1); use values such as 0.3, 0.6, 0.9")
        return self

    def due(self, step: int, max_steps: int) -> bool:
        """``step`` counts completed steps; 0 is the model before training."""
        return bool(self.every) and (step == 0 or step % self.every == 0 or step == max_steps)


def check_compatible(train_uri: str, heldout_uri: str, train: ShardBatch, heldout: ShardBatch,
                     options) -> None:
    """A clear error when the held-out shards were encoded differently from the training shards:
    another text encoder (the empty-prompt embeddings differ) or another latent geometry."""
    from fewstep import storage

    if storage.normalize(train_uri) == storage.normalize(heldout_uri):
        raise ValueError(f"heldout.uri: {heldout_uri} is data.uri itself, so the held-out loss equals the "
                         "training loss and heldout_ratio cannot show memorisation; give rows kept out "
                         "of training (a precompute output of another curated set)")
    a, b = (load_empty_prompt(uri, options, device=torch.device("cpu")) for uri in (train_uri, heldout_uri))
    same_text = a.embeds.shape == b.embeds.shape and torch.allclose(a.embeds.float(), b.embeds.float(),
                                                                     atol=1e-3)
    if not same_text:
        raise ValueError(f"heldout.uri: {heldout_uri} was encoded by another text encoder than data.uri "
                         f"({train_uri}): their empty-prompt embeddings differ; precompute it with the "
                         "same teacher")
    if tuple(train.latents.shape[1:]) != tuple(heldout.latents.shape[1:]):
        raise ValueError(f"heldout.uri: latents {tuple(heldout.latents.shape[1:])} differ from the training "
                         f"data's {tuple(train.latents.shape[1:])}; precompute it with the same teacher")


class HeldoutScorer:
    """Fixed rows, noise and timesteps; ``run`` scores a network on them (no gradients)."""

    def __init__(self, cfg: HeldoutConfig, adapter, train_uri: str | None, env, collate) -> None:
        self.cfg, self.adapter = cfg, adapter
        self.batches: dict[str, ShardBatch] = {}
        self.noise: dict[str, torch.Tensor] = {}
        uris = {"heldout": (cfg.uri, "heldout.uri"), "train": (train_uri, "data.uri")}
        for salt, (name, (uri, field)) in enumerate(uris.items()):
            rows = cfg.rows if name == "heldout" or cfg.compare_train else 1  # 1: the compatibility check
            self.batches[name] = collate(self._sample(uri, field, rows, env), env.device)
            generator = torch.Generator().manual_seed(cfg.seed * 1000 + salt)
            self.noise[name] = torch.randn((len(cfg.timesteps), *self.batches[name].latents.shape),
                                           generator=generator).to(env.device)
        check_compatible(str(train_uri), str(cfg.uri), self.batches["train"], self.batches["heldout"],
                         env.storage)
        if not cfg.compare_train:
            del self.batches["train"], self.noise["train"]
        log.info("heldout: %s rows scored every %d steps at t = %s",
                 {k: len(b) for k, b in self.batches.items()}, cfg.every, cfg.timesteps)

    def _sample(self, uri: str | None, field: str, rows: int, env) -> dict[str, np.ndarray]:
        section = DataSection(uri=uri, tasks=self.cfg.tasks, categories=self.cfg.categories)
        try:
            return sample_rows(open_source(section, "shards", None, env.storage), rows, self.cfg.seed,
                               env.storage)
        except (ValueError, FileNotFoundError) as exc:
            raise type(exc)(str(exc).replace("data.uri", field, 1)) from None

    @torch.no_grad()
    def run(self, state, net) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, batch in self.batches.items():
            per_task = self._losses(state, net, batch, self.noise[name])
            total = sum(s for s, _ in per_task.values()) / max(1, sum(c for _, c in per_task.values()))
            if name == "heldout":
                out["heldout_loss"] = total
                out.update({f"heldout_loss_{task}": s / c for task, (s, c) in per_task.items()})
            else:
                out["train_fixed_loss"] = total
        if "train_fixed_loss" in out:
            out["heldout_ratio"] = out["heldout_loss"] / max(out["train_fixed_loss"], 1e-12)
        return out

    def _losses(self, state, net, batch: ShardBatch, noise: torch.Tensor) -> dict[str, tuple[float, int]]:
        """Per task: (sum of per-row losses over rows and timesteps, row-timestep count)."""
        x = batch.latents.float()
        sums: dict[str, tuple[float, int]] = {}
        for task in ("t2i", "edit"):
            index = [i for i, name in enumerate(batch.tasks) if name == task]
            for start in range(0, len(index), self.cfg.batch_size):
                sel = torch.tensor(index[start:start + self.cfg.batch_size], device=x.device)
                cond = PromptEmbeds(state.cast(batch.prompt_embeds[sel]), batch.prompt_mask[sel]).trimmed()
                source = state.cast(batch.source_latents[sel]) if task == "edit" else None
                velocity = self._velocity(state, net, cond, source)
                for k, t_value in enumerate(self.cfg.timesteps):
                    t = torch.full((len(sel),), t_value, device=x.device)
                    mean = flow_matching_loss(velocity, x[sel], t, noise[k][sel])
                    total, count = sums.get(task, (0.0, 0))
                    sums[task] = (total + float(mean) * len(sel), count + len(sel))
        return sums

    def _velocity(self, state, net, cond: PromptEmbeds, source: torch.Tensor | None):
        def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with state.autocast():
                return self.adapter.predict_velocity(net, state.cast(z), state.cast(t), cond,
                                                     source_latents=source)
        return velocity
