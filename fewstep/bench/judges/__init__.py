"""Judges for the mini benches: one interface, an offline judge and a VLM judge.

    from fewstep.bench.judges import OfflineJudge, VLMJudge, VLMJudgeConfig
    verdict = OfflineJudge().judge_t2i(case, image)        # T2IVerdict(score, reasoning)
    verdict = OfflineJudge().judge_edit(case, source, out)  # EditVerdict(overall_score, sub_scores, ...)
    verdict.paper_json()                                    # the paper's JSON form

Heavy modules (onnxruntime, torch) load on first use, not on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fewstep.bench.judges.base import Judge, JudgeError
from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict

if TYPE_CHECKING:
    from fewstep.bench.judges.offline import OfflineJudge, OfflineJudgeConfig
    from fewstep.bench.judges.vlm import VLMJudge, VLMJudgeConfig

__all__ = ["Judge", "JudgeError", "T2IVerdict", "EditVerdict", "OfflineJudge", "OfflineJudgeConfig",
           "VLMJudge", "VLMJudgeConfig"]


def __getattr__(name: str):
    if name in ("OfflineJudge", "OfflineJudgeConfig"):
        from fewstep.bench.judges import offline

        return getattr(offline, name)
    if name in ("VLMJudge", "VLMJudgeConfig"):
        from fewstep.bench.judges import vlm

        return getattr(vlm, name)
    raise AttributeError(name)
