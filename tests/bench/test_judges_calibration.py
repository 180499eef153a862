"""Calibration on real data: held-out real renders score high; wrong-prompt, degraded and noise
images score clearly lower, in that order (means over real bench cases, with margins).

Real images are the benches' own held-out renders (``case.reference_image()``), never stand-ins.
"Wrong prompt" is the real render of another case of the same category; "degraded" is the real
render blurred (Gaussian radius 1.5 px) with Gaussian noise (sigma 20/255) added at 64 px.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fewstep.bench.benches import load_bench
from fewstep.bench.judges.offline import OfflineJudge

PER_CATEGORY_T2I = 6
PER_CATEGORY_EDIT = 3
BLUR_RADIUS, NOISE_SIGMA = 1.5, 20.0


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


def _groups(cases, subset):
    """(case, {group: image}) with 'wrong' = the next case of the same category in the bench."""
    for case in subset:
        same = [c for c in cases if c.category == case.category]
        other = same[(same.index(case) + 1) % len(same)]
        real = case.reference_image()
        seed = int(case.seed) % 2**31
        yield case, {"real": real, "wrong": other.reference_image(), "degraded": degrade(real, seed),
                     "noise": pure_noise(real.width, seed)}


@pytest.fixture(scope="module")
def judge():
    return OfflineJudge()


def _assert_order(means: dict[str, float], margin: float) -> None:
    assert means["real"] >= 4.5, means
    assert means["real"] - means["wrong"] >= 1.5, means
    assert means["wrong"] - means["degraded"] >= margin, means
    assert means["degraded"] - means["noise"] >= margin, means


def test_t2i_calibration_real_wrong_degraded_noise(judge):
    cases = load_bench("t2i-bench-mini")
    scores: dict[str, list[int]] = {}
    per_category: dict[tuple[str, str], list[int]] = {}
    for case, images in _groups(cases, _subset(cases, PER_CATEGORY_T2I)):
        for group, image in images.items():
            score = judge.judge_t2i(case, image).score
            scores.setdefault(group, []).append(score)
            per_category.setdefault((case.category, group), []).append(score)
    means = {g: statistics.fmean(s) for g, s in scores.items()}
    print("T2I means", means, {k: statistics.fmean(v) for k, v in per_category.items()})
    _assert_order(means, margin=0.3)
    assert max(scores["noise"]) == 1
    # Every category on its own: real clearly above every corrupted group.
    for category in ("portrait", "landscape", "text"):
        real = statistics.fmean(per_category[(category, "real")])
        worst_other = max(statistics.fmean(per_category[(category, g)]) for g in ("wrong", "degraded", "noise"))
        assert real - worst_other >= 1.5, (category, per_category)


def test_edit_calibration_real_noop_wrong_degraded_noise(judge):
    cases = load_bench("editing-bench-mini")
    scores: dict[str, list[int]] = {}
    for case, images in _groups(cases, _subset(cases, PER_CATEGORY_EDIT)):
        images["no_edit"] = case.source_image()
        for group, image in images.items():
            verdict = judge.judge_edit(case, case.source_image(), image)
            scores.setdefault(group, []).append(verdict.overall_score)
            if group == "no_edit":
                assert verdict.overall_score <= 2 and "edit_not_applied" in verdict.failure_modes, case.id
    means = {g: statistics.fmean(s) for g, s in scores.items()}
    print("edit means", means)
    _assert_order(means, margin=0.3)
    assert means["real"] - means["no_edit"] >= 1.5, means
