"""Calibration on real data: held-out real renders score high; wrong-prompt, degraded and noise
images score clearly lower, in that order (means over real bench cases, with margins).

Real images are the benches' own held-out renders (``case.reference_image()``), never stand-ins.

- T2I "wrong prompt": the real render of the next case of the same category.
- Edit "wrong instruction": the source edited as another instruction of the same category would
  have it (a real world render: another background colour, word, skin tone, companion or style);
  enhancement has no such alternative on the same source, so there it is the real target of the
  next enhancement case.
- "degraded": the real image blurred (Gaussian radius 2.5 px) plus Gaussian noise (sigma 32/255)
  at 64 px: heavy enough to be an unusable image. Milder degradation scores *above* a wrong
  prompt, as the rubric intends (right content with visible artefacts is a 2-3); docs/bench.md
  has the curve.
- "noise": uniform random pixels.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fewstep.bench import world
from fewstep.bench.benches import load_bench
from fewstep.bench.judges.offline import OfflineJudge

PER_CATEGORY_T2I = 6
PER_CATEGORY_EDIT = 3
BLUR_RADIUS, NOISE_SIGMA = 2.5, 32.0
MARGIN = 0.25


def degrade(image: Image.Image, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=np.float64)
    noisy = blurred + rng.normal(0, NOISE_SIGMA, blurred.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def pure_noise(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))


def _subset(cases, per_category):
    out = []
    for category in dict.fromkeys(c.category for c in cases):
        out += [c for c in cases if c.category == category][:per_category]
    return out


def _next_case(cases, case):
    same = [c for c in cases if c.category == case.category]
    return same[(same.index(case) + 1) % len(same)]


def _first_other(options, *taken):
    return next(o for o in options if o not in taken)


def wrong_instruction_output(cases, case) -> Image.Image:
    """A real render of the source edited the wrong way (see the module docstring)."""
    meta, cat = case.meta, case.category
    src, tgt = meta["source"], dict(meta["target"])
    if cat == "scene":
        bg = _first_other(world.BACKGROUNDS, src["background"], tgt["background"])
        tgt.update(background=bg, background_rgb=list(world.COLORS[bg]))
    elif cat == "text":
        tgt["text"] = _first_other(world.WORDS, src["text"], tgt["text"])
    elif cat == "identity":
        # skin tone: another tone than asked; gender: the tone changed instead of the gender.
        base = tgt if meta["operation"] == "skin_tone" else dict(src)
        tone = _first_other((None, *world.SKIN_TONES), src["skin_tone"], tgt["skin_tone"])
        tgt = {**base, "skin_tone": tone, "emoji": world.emoji_of(base["subject"], tone)}
    elif cat == "style":
        tgt["style"] = _first_other(world.STYLES, tgt["style"])
    elif cat == "object":
        comp = tgt.get("companion") or src["companion"]
        taken = [c["subject"] for c in (src.get("companion"), tgt.get("companion")) if c]
        key = _first_other([c.key for c in world.COMPANIONS], *taken)
        tgt["companion"] = {**comp, "subject": key, "subject_name": world.subject(key).name,
                            "emoji": world.emoji_of(key)}
    else:
        return _next_case(cases, case).reference_image()
    return world.render_t2i(tgt, case.resolution)


def _groups(cases, subset):
    """(case, {group: image}) for the calibration groups."""
    for case in subset:
        real = case.reference_image()
        seed = int(case.seed) % 2**31
        wrong = (_next_case(cases, case).reference_image() if case.task == "t2i"
                 else wrong_instruction_output(cases, case))
        yield case, {"real": real, "wrong": wrong, "degraded": degrade(real, seed),
                     "noise": pure_noise(real.width, seed)}


@pytest.fixture(scope="module")
def judge():
    return OfflineJudge()


def _means(values: dict[str, list[float]]) -> dict[str, float]:
    return {g: round(statistics.fmean(v), 3) for g, v in values.items()}


def _assert_order(scores: dict[str, list[float]], raws: dict[str, list[float]]) -> None:
    """Integer 1-5 scores (what tables show) and the unrounded formula value, both in order."""
    means, raw = _means(scores), _means(raws)
    assert means["real"] >= 4.5, means
    assert means["real"] - means["wrong"] >= 1.5, means
    for a, b in (("wrong", "degraded"), ("degraded", "noise")):
        assert means[a] - means[b] >= MARGIN, (a, b, means)
        assert raw[a] - raw[b] >= MARGIN, (a, b, raw)


def test_t2i_calibration_real_wrong_degraded_noise(judge):
    cases = load_bench("t2i-bench-mini")
    scores: dict[str, list[int]] = {}
    raws: dict[str, list[float]] = {}
    per_category: dict[str, list[int]] = {}
    items = list(_groups(cases, _subset(cases, PER_CATEGORY_T2I)))
    judge.prepare([(case, im) for case, images in items for im in images.values()])
    for case, images in items:
        for group, image in images.items():
            verdict = judge.judge_t2i(case, image)
            scores.setdefault(group, []).append(verdict.score)
            raws.setdefault(group, []).append(verdict.details["parts"]["raw"])
            per_category.setdefault(f"{case.category}/{group}", []).append(verdict.score)
    print("\nT2I means", _means(scores), "raw", _means(raws), "\nper category", _means(per_category))
    _assert_order(scores, raws)
    assert max(scores["noise"]) == 1
    # Every category on its own: real clearly above every corrupted group.
    for category in ("portrait", "landscape", "text"):
        real = statistics.fmean(per_category[f"{category}/real"])
        worst_other = max(statistics.fmean(per_category[f"{category}/{g}"]) for g in ("wrong", "degraded", "noise"))
        assert real - worst_other >= 2.0, (category, _means(per_category))


def test_edit_calibration_real_noop_wrong_degraded_noise(judge):
    cases = load_bench("editing-bench-mini")
    scores: dict[str, list[int]] = {}
    raws: dict[str, list[float]] = {}
    items = list(_groups(cases, _subset(cases, PER_CATEGORY_EDIT)))
    for case, images in items:
        images["no_edit"] = case.source_image()
    judge.prepare([(case, im) for case, images in items for im in images.values()])
    for case, images in items:
        for group, image in images.items():
            verdict = judge.judge_edit(case, case.source_image(), image)
            scores.setdefault(group, []).append(verdict.overall_score)
            raws.setdefault(group, []).append(verdict.details["parts"]["raw"])
            if group == "no_edit":
                assert verdict.overall_score <= 2 and "edit_not_applied" in verdict.failure_modes, case.id
            if group == "real":
                assert verdict.overall_score >= 4 and not verdict.failure_modes, (case.id, verdict)
    print("\nedit means", _means(scores), "raw", _means(raws))
    _assert_order(scores, raws)
    assert _means(scores)["real"] - _means(scores)["no_edit"] >= 2.0
