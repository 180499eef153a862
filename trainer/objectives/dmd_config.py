"""The ``objective`` section of a DMD run (``fewstep distill``): teachers and their lambda table,
the student's schedule, both optimisers, the task mixture and the periodic validation."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from fewstep import storage
from fewstep.bench.world import EDIT_CATEGORIES, T2I_CATEGORIES
from fewstep.config import StrictModel
from trainer.guidance import GuidanceConfig, LambdaTable, TaskScales
from trainer.mixture import MixtureConfig
from trainer.objectives.base import OptimizerConfig
from trainer.objectives.dmd_validation import ValidationConfig


class DMDConfig(StrictModel):
    """``objective:`` section of ``configs/distill/*.yaml`` (``name: dmd``)."""

    guidance: GuidanceConfig
    student_steps: int = Field(4, ge=1, le=64, description="Steps (NFE) of the student.")
    student_shift: float = Field(3.0, gt=0, description="Timestep shift of the student's schedule.")
    guidance_scale: TaskScales = Field(4.0, description="Teacher CFG scale of the real score: one "
                                       "number, or one per task ({t2i: 2.0, edit: 4.0}); per-teacher "
                                       "override in guidance.teachers[].guidance_scale.")
    fake_updates: int = Field(5, ge=1, description="Fake-score updates per student update.")
    student_optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=2e-6))
    fake_optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(lr=4e-6))
    renoise_t: tuple[float, float] = Field((0.02, 0.98), description="Range of the DMD re-noise t.")
    renoise_shift: float = Field(1.0, gt=0, description="Shift applied to the sampled re-noise t (and to "
                                 "the fake score's training t, so it learns where it is queried).")
    fake_t: tuple[float, float] = Field((0.02, 0.98), description="t range of the fake score's loss.")
    step_probs: list[float] | None = Field(None, description="Probability of each student step k "
                                           "(default uniform).")
    fm_first_step_weight: float = Field(0.0, ge=0.0, description="Weight of a flow-matching loss on "
                                        "the student's first step (DP-DMD variant; 0 disables).")
    mixture: MixtureConfig = Field(default_factory=MixtureConfig)
    buffer_batches: int = Field(8, ge=1, description="Rows kept per task waiting for the mixture, "
                                "in batches.")
    categories: list[str] = Field(default_factory=lambda: [*T2I_CATEGORIES, *EDIT_CATEGORIES],
                                  description="Categories the lambda table is expanded for.")
    resolution: int | None = Field(None, ge=8, description="Pixels of the student's samples (default: "
                                   "the rows' latents, else the teacher's resolution); the exported "
                                   "student and the periodic validation use it too.")
    init_from: str | None = Field(None, description="Initialise student and fake score from this "
                                  "pipeline (default: the base teacher).")
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    seed: int = Field(0, description="Seed of the student-step draws (shared by all ranks).")

    @field_validator("init_from")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        return None if value is None else storage.normalize(value)

    @model_validator(mode="after")
    def _check(self) -> DMDConfig:
        for name in ("renoise_t", "fake_t"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"{name}: need 0 <= low < high <= 1, got [{lo}, {hi}]")
        if self.step_probs is not None and (len(self.step_probs) != self.student_steps
                                            or min(self.step_probs) < 0 or sum(self.step_probs) <= 0):
            raise ValueError(f"step_probs: give {self.student_steps} non-negative weights with a positive sum "
                             f"(one per student step), got {self.step_probs}")
        if isinstance(self.guidance_scale, dict) and set(self.guidance_scale) != {"t2i", "edit"}:
            raise ValueError(f"guidance_scale: {self.guidance_scale} names only "
                             f"{sorted(self.guidance_scale)}; give both t2i and edit, or one number")
        self.table()  # validate the lambda table now (clear error at config load)
        return self

    def table(self) -> LambdaTable:
        return self.guidance.build_table(self.student_steps, self.categories)

    def base_uri(self) -> str:
        return self.init_from or self.guidance.teachers[self.guidance.base_index()].path
