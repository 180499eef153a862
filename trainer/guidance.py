"""Step-wise multi-teacher guidance: the lambda table over student step k and category c.

The real score of DMD is a weighted sum of frozen teachers (PAPER.md, factor 2):

    s_real^(k)(x_t, t, c) = sum_m lambda[k, m](c) * CFG(teacher_m)(x_t, t, c)

For each student step ``k`` and category ``c`` the weights over teachers ``m`` lie in
[0, 1] and sum to 1. The paper publishes no values, so they are configuration: either a
preset built from the teacher list (``base``, ``specialist``, ``stepwise``) or an explicit
table per category. :class:`LambdaTable` is the validated, tensor form the DMD objective
indexes per sample.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator, model_validator

from fewstep import storage
from fewstep.config import StrictModel

PRESETS = ("base", "specialist", "stepwise")
DEFAULT_KEY = "default"
_TOL = 1e-6


class GuidanceError(ValueError):
    """A lambda table or teacher list that cannot be used; the message names the entry and the fix."""


Scale = Annotated[float, Field(ge=1.0)]
# One CFG scale for both tasks, or one per task ({t2i: 2.0, edit: 4.0}): a teacher's best scale
# for prompts alone need not be its best for edits, and one loaded copy serves both.
TaskScales = Scale | dict[Literal["t2i", "edit"], Scale]


def scale_for(task: str, *choices: TaskScales | None) -> float:
    """The first of ``choices`` that gives a scale for ``task`` (a number applies to every task)."""
    for choice in choices:
        if isinstance(choice, dict):
            if task in choice:
                return float(choice[task])
        elif choice is not None:
            return float(choice)
    raise GuidanceError(f"no CFG scale for task {task!r}: give guidance_scale a number or a "
                        f"{task!r} entry")


class TeacherSpec(StrictModel):
    """One frozen teacher of the real score."""

    name: str = Field(..., min_length=1, description="Column name in the lambda table.")
    path: str = Field(..., min_length=1, description="Pipeline directory or URI of the teacher.")
    specialises: list[str] = Field(
        default_factory=list,
        description="Categories this teacher is specialised for (empty: a base/general teacher); "
        "'t2i:text' names one task's category only, 'text' both tasks'.",
    )
    guidance_scale: TaskScales | None = Field(
        None, description="CFG scale for this teacher, one number or per task ({t2i: 2.0, edit: 4.0}; "
        "a task left out uses the objective's); None: the objective's."
    )

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        # Workers may run elsewhere: local paths become absolute on the driver.
        return storage.normalize(value)


class GuidanceConfig(StrictModel):
    """Teachers and how their scores are mixed per student step and category."""

    teachers: list[TeacherSpec] = Field(..., min_length=1)
    preset: Literal["base", "specialist", "stepwise"] | None = Field(
        "base", description="Built-in table; set to null and give `lambdas` for a custom one."
    )
    anchor_steps: int | None = Field(
        None, ge=1, description="stepwise: how many early student steps the base teacher anchors "
        "alone (default: half the steps, rounded up).")
    specialist_weight: float = Field(
        1.0, ge=0.0, le=1.0,
        description="stepwise: the specialist's weight on the later steps of its categories.")
    lambdas: dict[str, list[list[float]]] | None = Field(
        None,
        description="Custom table: category (or 'default') -> one row per student step, one "
        "weight per teacher in `teachers` order.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> GuidanceConfig:
        names = [t.name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teachers: names must be unique, got {names}")
        if self.preset is None and self.lambdas is None:
            raise ValueError("give either `preset` (base|specialist|stepwise) or `lambdas`")
        if self.preset is not None and self.lambdas is not None:
            raise ValueError("`preset` and `lambdas` both set: set `preset: null` to use `lambdas`")
        unused = [k for k, unset in (("anchor_steps", None), ("specialist_weight", 1.0)) if getattr(self, k) != unset]
        if self.preset != "stepwise" and unused:
            raise ValueError(f"{', '.join(unused)}: only the stepwise preset uses them (preset is "
                             f"{self.preset!r}); remove them or set preset: stepwise")
        return self

    def base_index(self) -> int:
        """The base teacher: the first one that specialises in nothing."""
        for index, teacher in enumerate(self.teachers):
            if not teacher.specialises:
                return index
        raise GuidanceError(
            "guidance.teachers: no base teacher (every teacher lists `specialises`); "
            "add a general teacher with an empty `specialises`"
        )

    def build_table(self, num_steps: int, categories: list[str]) -> LambdaTable:
        """Resolve the preset or custom table into a validated :class:`LambdaTable`."""
        names = [t.name for t in self.teachers]
        if self.lambdas is not None:
            # With a custom table `specialises` only marks the base teacher, but a misspelt
            # category there is still a mistake the user wants to hear about.
            unknown = sorted({c for t in self.teachers for c in t.specialises
                              if c.split(":", 1)[-1] not in categories})
            if unknown:
                raise GuidanceError(
                    f"guidance.teachers: specialises {unknown}, not in objective.categories "
                    f"{sorted(set(categories))}: fix the name or add it to objective.categories")
            return LambdaTable.from_mapping(self.lambdas, names, num_steps, categories)
        rows = preset_rows(self, num_steps, categories)
        return LambdaTable.from_mapping(rows, names, num_steps, categories)


def preset_rows(cfg: GuidanceConfig, num_steps: int, categories: list[str]) -> dict[str, list[list[float]]]:
    """The table of a preset as plain lists (category -> K rows of M weights).

    - ``base``: the base teacher alone, everywhere.
    - ``specialist``: for a category some teacher specialises in, that teacher alone at every
      step (the paper's unstable setting); the base teacher elsewhere.
    - ``stepwise``: the base teacher alone on the first ``anchor_steps`` steps; on the later
      steps of a specialised category the specialist takes ``specialist_weight`` and the base
      teacher the rest.
    """
    num_teachers = len(cfg.teachers)
    base = cfg.base_index()

    def one_hot(index: int) -> list[float]:
        return [1.0 if m == index else 0.0 for m in range(num_teachers)]

    specialist_of: dict[str, int] = {}
    for index, teacher in enumerate(cfg.teachers):
        for category in teacher.specialises:
            specialist_of.setdefault(category, index)
    table: dict[str, list[list[float]]] = {DEFAULT_KEY: [one_hot(base)] * num_steps}
    if cfg.preset == "base":
        return table
    anchor = cfg.anchor_steps if cfg.anchor_steps is not None else (num_steps + 1) // 2
    if cfg.preset == "stepwise" and anchor > num_steps:
        raise GuidanceError(
            f"guidance.anchor_steps: {anchor} is more than the student's {num_steps} steps; "
            f"use at most {num_steps}"
        )
    # One table per specialised key ("text" or "t2i:text"); other categories use the default.
    for category, spec in specialist_of.items():
        if cfg.preset == "specialist":
            table[category] = [one_hot(spec)] * num_steps
            continue
        late = [0.0] * num_teachers
        late[spec] += cfg.specialist_weight
        late[base] += 1.0 - cfg.specialist_weight
        table[category] = [one_hot(base)] * anchor + [late] * (num_steps - anchor)
    return table


class LambdaTable:
    """Validated weights ``[K steps, C categories, M teachers]`` with a category index."""

    def __init__(self, weights: torch.Tensor, teachers: list[str], categories: list[str]):
        self.weights = weights
        self.teachers = list(teachers)
        self.categories = list(categories)
        self._index = {c: i for i, c in enumerate(self.categories)}

    @property
    def num_steps(self) -> int:
        return int(self.weights.shape[0])

    @classmethod
    def from_mapping(
        cls,
        mapping: dict[str, list[list[float]]],
        teachers: list[str],
        num_steps: int,
        categories: list[str],
    ) -> LambdaTable:
        """Validate ``mapping`` (category or 'default' -> K x M rows) and expand it to a tensor.

        Every category in ``categories`` gets its own table or the ``default`` one. A table for
        a name outside ``categories`` is an error: no row would ever use it, so a misspelt
        category would silently turn a specialist run into a base-only one.
        """
        validate_lambdas(mapping, teachers, num_steps)
        unknown = [k for k in mapping if k != DEFAULT_KEY and k.split(":", 1)[-1] not in categories]
        if unknown:
            raise GuidanceError(
                f"guidance: tables for categories {unknown} that are not in objective.categories "
                f"{sorted(set(categories))}: fix the name (in lambdas or a teacher's specialises) "
                "or add it to objective.categories")
        known = list(dict.fromkeys([*categories, *[k for k in mapping if k != DEFAULT_KEY]]))
        missing = [c for c in known if c not in mapping and DEFAULT_KEY not in mapping]
        if missing:
            raise GuidanceError(
                f"guidance.lambdas: no table for categories {missing} and no '{DEFAULT_KEY}' table; "
                f"add a '{DEFAULT_KEY}' entry or one per category"
            )
        # The default table is kept as an extra last column so unseen categories resolve to it.
        keys = [*known, DEFAULT_KEY]
        rows = [mapping.get(c, mapping.get(DEFAULT_KEY)) for c in keys]
        weights = torch.tensor(rows, dtype=torch.float32).permute(1, 0, 2).contiguous()
        return cls(weights, teachers, keys)

    def category_index(self, categories: list[str]) -> torch.Tensor:
        """Table column per sample. A name ``task:category`` (``t2i:text``) uses its own table if
        there is one, else the plain category's (``text``), else ``default``."""
        default = self._index.get(DEFAULT_KEY)
        out = []
        for category in categories:
            index = self._index.get(category)
            if index is None and ":" in category:
                index = self._index.get(category.split(":", 1)[1])
            if index is None:
                index = default
            if index is None:
                raise GuidanceError(
                    f"category {category!r} has no lambda table and there is no '{DEFAULT_KEY}'"
                )
            out.append(index)
        return torch.tensor(out, dtype=torch.long)

    def for_samples(self, steps: torch.Tensor, categories: list[str]) -> torch.Tensor:
        """Weights ``[B, M]`` for per-sample student steps ``steps`` and categories."""
        steps = steps.to(torch.long).cpu()
        if steps.numel() and (int(steps.min()) < 0 or int(steps.max()) >= self.num_steps):
            raise GuidanceError(f"student step out of range 0..{self.num_steps - 1}: {steps.tolist()}")
        return self.weights[steps, self.category_index(categories)]

    def active_teachers(self) -> list[int]:
        """Teachers with a non-zero weight somewhere (the others need not be loaded)."""
        used = (self.weights > 0).any(dim=0).any(dim=0)
        return [m for m in range(len(self.teachers)) if bool(used[m])]

    def to_dict(self) -> dict:
        return {
            "teachers": self.teachers,
            "tables": {
                c: self.weights[:, i].tolist() for i, c in enumerate(self.categories)
            },
        }


def validate_lambdas(mapping: dict[str, list[list[float]]], teachers: list[str], num_steps: int) -> None:
    """Raise :class:`GuidanceError` unless every table is K rows of M weights in [0, 1] summing to 1."""
    if not mapping:
        raise GuidanceError("guidance.lambdas: empty; give a 'default' table or one per category")
    num_teachers = len(teachers)
    for category, rows in mapping.items():
        where = f"guidance.lambdas.{category}"
        if len(rows) != num_steps:
            raise GuidanceError(
                f"{where}: {len(rows)} rows but the student has {num_steps} steps; "
                f"give one row per student step"
            )
        for k, row in enumerate(rows):
            if len(row) != num_teachers:
                raise GuidanceError(
                    f"{where}[{k}]: {len(row)} weights but there are {num_teachers} teachers "
                    f"{teachers}; give one weight per teacher, in that order"
                )
            for m, value in enumerate(row):
                if not isinstance(value, (int, float)) or value != value:  # NaN check
                    raise GuidanceError(f"{where}[{k}][{m}] ({teachers[m]}): not a number: {value!r}")
                if value < -_TOL or value > 1 + _TOL:
                    raise GuidanceError(
                        f"{where}[{k}][{m}] ({teachers[m]}): weight {value} outside [0, 1]"
                    )
            total = float(sum(row))
            if abs(total - 1.0) > 1e-4:
                raise GuidanceError(
                    f"{where}[{k}]: weights {row} sum to {total:.6g}, not 1; rescale the row"
                )
