"""Periodic check of the student on a small validation set with the bench judges.

Collapse to noise or flat colour is the failure practitioners of DMD report most, and it
happens during training. Every ``validation.every`` steps the student samples a few fixed
validation-bench cases (its own ``student_steps`` NFE, no CFG, the cases' own seeds), the bench judge
scores them, and the metrics (``val_score``, ``val_score_<category>``, ``val_pixel_std``,
``val_diversity``, ``val_border_mode_share``) go into the run's metrics next to the losses; rank 0 also writes a grid
to ``<run>/validation/step-<N>.png``.

Every rank samples its share of the cases (the same count on each rank, so ZeRO-3's
collective forward passes line up; a share is padded with repeats, which are never scored). The
ranks' scores are gathered, so every case counts once; the collapse indicators are per rank and
the runtime averages them.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from pydantic import Field, field_validator

from fewstep import storage
from fewstep.config import StrictModel
from trainer.evaluate.config import BenchName
from trainer.runtime.collectives import gather_objects

log = logging.getLogger(__name__)


class ValidationConfig(StrictModel):
    every: int = Field(0, ge=0, description="Validate every N steps (and at step 0 and the last, "
                       "also when train.max_minutes stops the run); "
                       "0 disables.")
    benches: list[BenchName] = Field(
        ["t2i-bench-val"], min_length=1,
        description="Benches the validation cases come from. The *-bench-val benches share no case "
        "with the reported mini benches, so a checkpoint chosen on them is not chosen on the test "
        "set; add editing-bench-val to watch the edit task too.")
    cases_per_category: int = Field(2, ge=1, description="First N cases of each category.")
    judge: str = Field("offline", description="Bench judge name (see fewstep.bench.judges).")
    resolution: int | None = Field(None, ge=8, description="Sampling size (default: the teacher's).")
    save_grids: bool = True

    @field_validator("judge")
    @classmethod
    def _judge_loads(cls, value: str) -> str:
        from trainer.evaluate.judging import check_judge

        return check_judge(value)


def pick_cases(bench: str, per_category: int, rank: int, world_size: int) -> list[Any]:
    """The first ``per_category`` cases of each category, this rank's equal share (padded by
    repeating cases so every rank samples the same number)."""
    return [case for case, _ in _rank_share(bench, per_category, rank, world_size)]


def _rank_share(bench: str, per_category: int, rank: int, world_size: int) -> list[tuple[Any, int | None]]:
    """This rank's cases, each with its position in the bench's chosen list, or None for a repeat
    that only pads the rank's share (sampled, so collective passes line up, but never scored)."""
    from fewstep.bench.benches import load_bench

    cases = load_bench(bench)
    chosen: list[Any] = []
    for category in dict.fromkeys(c.category for c in cases):
        chosen.extend([c for c in cases if c.category == category][:per_category])
    per_rank = -(-len(chosen) // world_size)
    slots = range(per_rank * world_size)
    share = [(chosen[i % len(chosen)], i if i < len(chosen) else None) for i in slots]
    return share[rank::world_size]


def merge_scored(parts: list[list[tuple[int, str, str, float]]]) -> dict[str, float]:
    """Exact validation scores from every rank's ``(order, task, key, score)`` records: each case
    once, whatever rank scored it (a mean of rank means would weight unevenly split cases twice)."""
    records = sorted((r for part in parts for r in part), key=lambda r: r[0])
    scores: dict[str, list[float]] = {}
    by_task: dict[str, list[float]] = {}
    for _, task, key, score in records:
        scores.setdefault(key, []).append(score)
        by_task.setdefault(task, []).append(score)
    out = {"val_score": float(np.mean([r[3] for r in records]))}
    if len(by_task) > 1:
        out.update({f"val_score_{task}": float(np.mean(v)) for task, v in by_task.items()})
    out.update({f"val_score_{c}": float(np.mean(v)) for c, v in scores.items()})
    return out


class Validator:
    def __init__(self, cfg: ValidationConfig, adapter, base_uri: str, env, num_steps: int, shift: float):
        from fewstep.models.adapter import QwenImageAdapter
        from trainer.evaluate.judging import load_judge
        from trainer.evaluate.sampling import prepare_cases

        self.cfg, self.env = cfg, env
        self.num_steps, self.shift = num_steps, shift
        # Encoders are needed once: prompts are encoded now, the text encoder is then freed.
        encoders = QwenImageAdapter.load(base_uri, components=("text_encoder", "vae"), storage=env.storage)
        resolution = cfg.resolution or encoders.resolution
        if resolution is None:
            raise ValueError("objective.validation.resolution: required (the teacher records no resolution)")
        # One group per bench (a sampling call holds one task); each rank the same count per bench.
        self.groups = []
        offset = 0
        for bench in dict.fromkeys(cfg.benches):
            share = _rank_share(bench, cfg.cases_per_category, env.rank, env.world_size)
            cases = [case for case, _ in share]
            # Global order over all benches (for exact merging and the grid); None marks a pad.
            order = [None if i is None else offset + i for _, i in share]
            offset += len(pick_cases(bench, cfg.cases_per_category, 0, 1))
            self.groups.append((cases, order, prepare_cases(encoders, cases, resolution, with_uncond=False)))
        self.cases = [case for cases, _, _ in self.groups for case in cases]
        encoders.text_encoder = None
        self.adapter = encoders
        self.judge = load_judge(cfg.judge)
        log.info("validation: %d cases of %s on rank %d every %d steps", len(self.cases),
                 ", ".join(cfg.benches), env.rank, cfg.every)

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.cfg.every == 0 or step == max_steps

    def run(self, state, handle, step: int) -> dict[str, float]:
        from trainer.evaluate.judging import judge_case
        from trainer.evaluate.sampling import image_stats, make_grid, sample_cases

        images, scored, thumbs = [], [], []
        for cases, order, inputs in self.groups:
            result = sample_cases(self.adapter, handle.net, inputs.select(slice(None)),
                                  num_steps=self.num_steps, guidance_scale=1.0, shift=self.shift,
                                  batch_size=len(inputs))
            for index, (case, position, image) in enumerate(zip(cases, order, result.images)):
                if position is None:  # a repeat that only pads this rank's share
                    continue
                source = inputs.sources[index] if inputs.sources else None
                score = judge_case(self.judge, case, image, source)["score"]
                # T2I keys stay val_score_<category>; edit categories (one is also "text") get a prefix.
                key = case.category if case.task == "t2i" else f"{case.task}_{case.category}"
                scored.append((position, case.task, key, float(score)))
                images.append(image)
                thumbs.append((position, case.category[:4], _thumbnail(image)))
        world = self.env.world_size
        out = merge_scored(gather_objects(scored, world))
        # Collapse indicators of this rank's images; the runtime averages them over the ranks.
        if images:
            out.update({f"val_{k}": v for k, v in image_stats(images).items()})
        all_thumbs = sorted((t for part in gather_objects(thumbs, world) for t in part), key=lambda t: t[0])
        if state.rank == 0 and self.cfg.save_grids:
            grid = make_grid([t[2] for t in all_thumbs], [t[1] for t in all_thumbs], columns=8)
            buffer = io.BytesIO()
            grid.save(buffer, format="PNG")
            uri = storage.join(self.env.run_uri, "validation", f"step-{step:06d}.png")
            storage.write_bytes_atomic(uri, buffer.getvalue(), self.env.storage)
        log.info("validation at step %d: score %.2f (%d cases)", step, out["val_score"], len(all_thumbs))
        return out


def _thumbnail(image):
    """A grid-sized copy: every rank's images travel to rank 0 for one grid of all the cases."""
    copy = image.convert("RGB")
    copy.thumbnail((96, 96))
    return copy
