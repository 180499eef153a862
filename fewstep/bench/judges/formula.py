"""The documented score formula: measurements -> 1-5 verdicts (docs/bench.md explains it).

T2I:
    K  core compliance in [0, 1]: 1 if the subject is recognised (or the word read exactly), else
       the recogniser's probability of the right subject (or the OCR character accuracy);
    A  attribute compliance: the share of the other stated attributes that hold (background,
       position, size, count, skin tone; for text: text colour, background, position, size);
    Q  quality in [0, 1]: min(noise ramp, feature-distance ramp), see ``quality``;
    C  = 0.6 K + 0.4 A
    core passed: raw = 1 + 4 C (0.25 + 0.75 Q)   (quality scales compliance; it cannot replace it)
    core failed: raw = 1 + max(kind, min(1, A / 0.25)) Q
                 (the rubric's 2, "mostly fails although parts are right", needs a usable image
                 with something right: the right kind of subject (another subject of the prompt's
                 category, or some legible text for the text category) or at least one stated
                 attribute; else 1)
    score = round half up (raw), so a failed core instruction (wrong subject / wrong word) caps at 2.

Editing (the sub-scores, in the category's keys, are round(1 + 4 x) of I, P and Q):
    I  instruction in [0, 1]: 0.5 * attribute + 0.5 * toward_target, where attribute is 1 when the
       target attribute is present (background colour, OCR word, skin tone, subject, style; for
       object and enhancement edits: the edited region reached the target) else its graded strength,
       and toward_target = d(out, source) / (d(out, source) + d(out, target)) in the edited region
       (the whole image for global edits): 1 = the output is the target, 0 = still the source;
    P  preservation of what must not change (category-specific, see ``preservation``);
    Q  quality as for T2I, against real edit targets of the same category;
    C  = 0.6 I + 0.4 P
    edit done:     raw = 1 + 4 C (0.25 + 0.75 Q)
    edit not done: raw = 1 + P Q   (attribute absent, or toward_target <= 0.5: at most 2, and 2 only
                   for a clean image that kept the source)

Every constant is here, named, and versioned by ``FORMULA_VERSION``.
"""

from __future__ import annotations

import math
from typing import Any

from fewstep.bench.judges.rubrics import EDIT_CRITERIA
from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict

FORMULA_VERSION = "1"

# Residual noise sigma (0-255 levels) on flat regions: invisible below NOISE_OK, heavy at NOISE_BAD.
NOISE_OK, NOISE_BAD = 2.0, 12.0
# kNN feature distance over the real-to-real median: real images sit near 1. Full marks up to the
# larger of FEATURE_OK and the reference set's own 95th percentile (text renders spread more than
# emoji renders); zero at that plus FEATURE_SPAN.
FEATURE_OK, FEATURE_SPAN = 1.3, 0.7
# Weights of the compliance terms and the quality floor.
CORE_WEIGHT, ATTRIBUTE_WEIGHT = 0.6, 0.4
INSTRUCTION_WEIGHT, PRESERVATION_WEIGHT = 0.6, 0.4
QUALITY_FLOOR = 0.25
# With a failed core instruction, this share of the stated attributes right counts as "parts right".
PARTS_RIGHT = 0.25
# Mean absolute difference (0-255) at which preservation reaches 0.
OUTSIDE_MAE_SCALE = 30.0
STYLE_MAE_SCALE = 50.0
TOWARD_TARGET_PASS = 0.5


def ramp(value: float, good: float, bad: float) -> float:
    """1 at or below ``good``, 0 at or above ``bad``, linear between."""
    if value <= good:
        return 1.0
    if value >= bad:
        return 0.0
    return (bad - value) / (bad - good)


def mae_score(mae: float, scale: float) -> float:
    return round(max(0.0, 1.0 - mae / scale), 4)


def quality(q: dict[str, float]) -> dict[str, float]:
    noise = ramp(q["noise_sigma"], NOISE_OK, NOISE_BAD)
    ok = max(FEATURE_OK, float(q.get("feature_ratio_real_p95", FEATURE_OK)))
    feature = ramp(q["feature_ratio"], ok, ok + FEATURE_SPAN)
    return {"noise": round(noise, 4), "feature": round(feature, 4), "Q": round(min(noise, feature), 4)}


def to_score(raw: float) -> int:
    """Round half up into 1-5 (Python's round() rounds 2.5 to 2)."""
    return int(min(5, max(1, math.floor(raw + 0.5))))


def sub(x: float) -> int:
    return to_score(1 + 4 * max(0.0, min(1.0, x)))


# ---------------------------------------------------------------------------------------------
# T2I
# ---------------------------------------------------------------------------------------------


def t2i_parts(m: dict[str, Any]) -> dict[str, float]:
    core = m["core"]
    k = 1.0 if core["passed"] else float(core["strength"])
    checks = m["checks"]
    a = sum(bool(c["passed"]) for c in checks.values()) / len(checks) if checks else 1.0
    qd = quality(m["quality"])
    c = CORE_WEIGHT * k + ATTRIBUTE_WEIGHT * a
    if core["passed"]:
        raw = 1 + 4 * c * (QUALITY_FLOOR + (1 - QUALITY_FLOOR) * qd["Q"])
    else:
        parts = max(float(bool(core.get("kind_right"))), min(1.0, a / PARTS_RIGHT))
        raw = 1 + parts * qd["Q"]
    return {"K": round(k, 4), "A": round(a, 4), "C": round(c, 4), "Q": qd["Q"], "noise_q": qd["noise"],
            "feature_q": qd["feature"], "raw": round(raw, 4)}


def _t2i_reasoning(m: dict[str, Any], parts: dict[str, float], score: int) -> str:
    core = m["core"]
    what = "subject" if core["kind"] == "subject" else "word"
    if core["passed"]:
        head = f"The {what} {core['expected']!r} is there"
    else:
        head = f"The {what} is wrong (expected {core['expected']!r}, found {core['found']!r}), which caps the score"
    failed = [f"{k} (found {c['found']!r}, expected {c['expected']!r})" for k, c in m["checks"].items()
              if not c["passed"]]
    attrs = "all stated attributes hold" if not failed else "wrong " + ", ".join(failed)
    q = m["quality"]
    return (f"{head}; {attrs}; residual noise {q['noise_sigma']:.1f}/255 and feature distance "
            f"{q['feature_ratio']:.2f}x real give quality {parts['Q']:.2f}, so {score}/5.")


def t2i_verdict(m: dict[str, Any]) -> T2IVerdict:
    parts = t2i_parts(m)
    score = to_score(parts["raw"])
    return T2IVerdict(score=score, reasoning=_t2i_reasoning(m, parts, score),
                      details={"formula_version": FORMULA_VERSION, "parts": parts, "measurements": m})


# ---------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------


def instruction(m: dict[str, Any]) -> tuple[float, bool]:
    attr = m["attribute"]
    toward = float(m["toward_target"])
    present = 1.0 if attr["passed"] else float(attr.get("strength", 0.0))
    done = bool(attr["passed"]) and toward > TOWARD_TARGET_PASS
    return 0.5 * present + 0.5 * toward, done


def preservation(m: dict[str, Any]) -> float:
    p = m["preservation"]
    kind = p["kind"]
    if kind == "outside_region":
        return float(p["score"])
    if kind == "subject_and_layout":
        subject = 1.0 if p["passed"] else float(p["strength"])
        return 0.5 * subject + 0.5 * min(1.0, float(p["layout_iou"]) / 0.7)
    if kind in ("same_subject", "same_skin_tone"):
        kept = 1.0 if p["passed"] else float(p["strength"])
        return 0.5 * kept + 0.5 * float(p["outside_score"])
    if kind == "content_vs_target":
        return float(p["score"])
    raise ValueError(f"unknown preservation kind {kind!r}")


def edit_parts(m: dict[str, Any]) -> dict[str, Any]:
    i, done = instruction(m)
    p = preservation(m)
    qd = quality(m["quality"])
    c = INSTRUCTION_WEIGHT * i + PRESERVATION_WEIGHT * p
    if done:
        raw = 1 + 4 * c * (QUALITY_FLOOR + (1 - QUALITY_FLOOR) * qd["Q"])
    else:
        raw = 1 + p * qd["Q"]
    return {"I": round(i, 4), "P": round(p, 4), "C": round(c, 4), "Q": qd["Q"], "noise_q": qd["noise"], "feature_q": qd["feature"],
            "done": done, "raw": round(raw, 4)}


def _failure_modes(m: dict[str, Any], parts: dict[str, Any]) -> list[str]:
    modes = []
    attr = m["attribute"]
    if m["toward_target"] <= TOWARD_TARGET_PASS:
        modes.append("edit_not_applied")
    if not attr["passed"]:
        modes.append(f"wrong_{attr['kind']}")
    if parts["P"] < 0.5:
        modes.append("source_not_preserved")
    if parts["noise_q"] < 0.5:
        modes.append("residual_noise")
    if parts["feature_q"] < 0.5:
        modes.append("unrealistic_image")
    return modes


def edit_verdict(m: dict[str, Any]) -> EditVerdict:
    parts = edit_parts(m)
    criteria = EDIT_CRITERIA[m["category"]]
    overall = to_score(parts["raw"])
    sub_scores = {criteria.instruction: sub(parts["I"]), criteria.preservation: sub(parts["P"]),
                  criteria.quality: sub(parts["Q"])}
    attr = m["attribute"]
    head = ("The edit was carried out" if parts["done"] else
            f"The edit was not carried out (expected {attr['expected']!r}, found {attr['found']!r}; "
            f"{m['toward_target']:.2f} of the way to the target), which caps the score")
    reasoning = (f"{head}; preservation {parts['P']:.2f}, quality {parts['Q']:.2f} (noise "
                 f"{m['quality']['noise_sigma']:.1f}/255, feature distance {m['quality']['feature_ratio']:.2f}x "
                 f"real), so {overall}/5.")
    return EditVerdict(overall_score=overall, sub_scores=sub_scores, reasoning=reasoning,
                       failure_modes=_failure_modes(m, parts),
                       details={"formula_version": FORMULA_VERSION, "parts": parts, "measurements": m})
