"""``configs/eval/*.yaml``: which models sample which benches, how, and where results go."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fewstep import storage
from fewstep.config import StrictModel

BENCH_NAMES = ("t2i-bench-mini", "editing-bench-mini")  # the reported (test) benches, the default
BenchName = Literal["t2i-bench-mini", "editing-bench-mini", "t2i-bench-val", "editing-bench-val"]


class ModelEntry(StrictModel):
    """One model to evaluate. ``nfe`` is the number of sampling steps; with ``guidance_scale``
    above 1 every step costs two network calls (true CFG), which ``network_calls`` reports."""

    name: str = Field(..., description="Label in tables and file names (letters, digits, - _ .).")
    path: str = Field(..., description="Pipeline directory (local or s3://).")
    role: Literal["teacher", "student"] | None = Field(
        None, description="Default: the directory's own (an exported student is a student, anything "
        "else a teacher).")
    nfe: int | None = Field(None, ge=1, description="Sampling steps (default: teacher 80, a student "
                            "its exported step count).")
    guidance_scale: float | None = Field(None, ge=1.0, description="True CFG scale (default: teacher "
                                         "4.0, student 1.0).")
    shift: float | None = Field(None, gt=0, description="Schedule shift (default: the directory's scheduler).")

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", value) or set(value) == {"."}:
            raise ValueError("use letters, digits, '-', '_' or '.' only, not only dots (it names files)")
        return value

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return storage.normalize(value)


class EvalConfig(StrictModel):
    models: list[ModelEntry] = Field(..., min_length=1)
    benches: list[BenchName] = Field(
        default_factory=lambda: list(BENCH_NAMES), min_length=1,
        description="Benches to sample: the mini benches are the reported ones; the *-bench-val "
        "benches (same shape, no case in common) are for choosing recipes and checkpoints.")
    cases_per_category: int | None = Field(None, ge=1, description="First N cases of each category "
                                           "(null: the whole bench).")
    teacher_cases_per_category: int | None = Field(
        None, ge=1, description="Cap for models with nfe > 8 (80-NFE teachers are slow on a CPU): "
        "such models score the first N cases of each category, never more than cases_per_category; "
        "null: same as cases_per_category.")
    judge: str = Field("offline", description="Bench judge (fewstep.bench.judges).")
    resolution: int | None = Field(None, ge=16, multiple_of=16, description="Sampling size, a "
                                   "multiple of 16 (the VAE factor 8 x 2x2 latent packing; default: "
                                   "each model's).")
    batch_size: int = Field(16, ge=1, description="Cases sampled together by one actor call.")
    actors: int = Field(1, ge=1, description="Ray Data actors sampling in parallel (1 keeps the "
                        "per-image timings free of contention on a small machine).")
    cpus_per_actor: float = Field(1.0, gt=0)
    threads_per_actor: int | None = Field(None, ge=1, description="torch threads in each actor "
                                          "(default: all cores / actors).")
    grid_cases: int = Field(8, ge=1, description="Cases per category shown in the sample grids.")
    seeds_per_case: int = Field(
        1, ge=1, description="Draws per case, each from its own noise (draw 0 uses the case's seed). "
        "Paired comparisons average a case's draws first, so their sign test still counts cases; "
        "more draws make a small difference between two models measurable.")

    @field_validator("judge")
    @classmethod
    def _judge_loads(cls, value: str) -> str:
        from trainer.evaluate.judging import check_judge

        return check_judge(value)

    @model_validator(mode="after")
    def _unique(self) -> EvalConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"models: names must be unique, got {names}")
        if len(set(self.benches)) != len(self.benches):
            raise ValueError(f"benches: each bench once, got {self.benches} (more draws: seeds_per_case)")
        return self
