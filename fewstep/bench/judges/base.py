"""The one interface every judge implements (offline measurements or a VLM endpoint)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from PIL import Image

from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict


class JudgeError(RuntimeError):
    """A judge could not produce a valid verdict (endpoint down, output never valid, bad input)."""


class Judge(ABC):
    """Scores one generated image (T2I) or one edited image against its bench case.

    ``case`` is a bench case from ``fewstep.bench.benches`` (it carries the prompt or instruction,
    the category and the structured ``meta`` ground truth). Judges are deterministic for a given
    input where the backend allows it (the offline judge always; a VLM at temperature 0 mostly).
    """

    name: str = "judge"

    @abstractmethod
    def judge_t2i(self, case: Any, image: Image.Image) -> T2IVerdict: ...

    @abstractmethod
    def judge_edit(self, case: Any, source: Image.Image, output: Image.Image) -> EditVerdict: ...

    def prepare(self, items: list[tuple[Any, Image.Image]]) -> None:
        """Optional batch hint before judging ``(case, image)`` pairs one by one (no-op by default)."""
        return None

    def set_summary(self, category: str, images: list[Image.Image]) -> dict[str, float]:
        """Per-set metrics for one category (e.g. FID/KID); judges without any return {}."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What produced the verdicts (written next to the scores)."""
        return {"judge": self.name}
