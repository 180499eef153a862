"""Judge verdicts in the paper's JSON forms, plus the diagnostics an offline judge measured.

The paper's judges return strict JSON:

- T2I: ``{"score": 1-5, "reasoning": "<one sentence>"}``
- Editing: ``{"overall_score": 1-5, "sub_scores": {<criterion>: 1-5, ...}, "reasoning": "...",
  "failure_modes": ["...", ...]}``

``paper_json()`` returns exactly those keys; ``details`` keeps what the offline judge measured
(recogniser probabilities, OCR text, noise level, ...) so a score can be audited, and is left out
of the paper form.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class T2IVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: int = Field(ge=1, le=5, description="Holistic 1-5 score.")
    reasoning: str = Field(min_length=1, description="One sentence explaining the score.")
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)

    def paper_json(self) -> dict[str, Any]:
        return {"score": self.score, "reasoning": self.reasoning}


class EditVerdict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    overall_score: int = Field(ge=1, le=5)
    sub_scores: dict[str, int]
    reasoning: str = Field(min_length=1)
    failure_modes: list[str] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @field_validator("sub_scores")
    @classmethod
    def _in_range(cls, value: dict[str, int]) -> dict[str, int]:
        for key, score in value.items():
            if not 1 <= int(score) <= 5:
                raise ValueError(f"sub_scores.{key}={score} is outside 1-5")
        return value

    def paper_json(self) -> dict[str, Any]:
        return {
            "overall_score": self.overall_score,
            "sub_scores": dict(self.sub_scores),
            "reasoning": self.reasoning,
            "failure_modes": list(self.failure_modes),
        }
