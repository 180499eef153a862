"""Offline judge parts on real world renders: pixel rules, noise, features, OCR, recogniser, formula."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fewstep.bench.benches import load_bench
from fewstep.bench.judges import formula, measure
from fewstep.bench.judges.features import FeatureExtractor, kernel_inception_distance
from fewstep.bench.judges.noise import residual_noise
from fewstep.bench.judges.ocr import OCRReader, char_accuracy
from fewstep.bench.judges.recognizers import shared_recognizer
from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict


@pytest.fixture(scope="module")
def t2i_cases():
    return load_bench("t2i-bench-mini")


def _noisy(image: Image.Image, sigma: float, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    array = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def test_pixel_rules_read_every_real_render(t2i_cases):
    """Background, text colour, position, size and count are measured right on all 60 bench renders."""
    wrong = []
    for case in t2i_cases:
        image, meta = case.reference_image(), case.meta
        lay = measure.layout(image, meta)
        found = {"background": measure.background(image)["name"], "position": lay["position"],
                 "size": lay["size"], "count": lay["count"]}
        expected = {k: meta[k] for k in found}
        if case.category == "text":
            found["text_color"], expected["text_color"] = measure.text_colour(image)["name"], meta["text_color"]
        if found != expected:
            wrong.append((case.id, found, expected))
    assert not wrong


def test_pixel_rules_any_size(t2i_cases):
    case = t2i_cases[0]
    big = case.reference_image(160)
    assert measure.background(big)["name"] == case.meta["background"]
    lay = measure.layout(big, case.meta)
    assert (lay["position"], lay["size"], lay["count"]) == (case.meta["position"], case.meta["size"],
                                                            case.meta["count"])


def test_residual_noise_measures_sigma_on_flat_regions(t2i_cases):
    clean = t2i_cases[0].reference_image()
    assert residual_noise(clean) < 1.0
    for sigma in (5, 10, 20):
        noisy = _noisy(clean, sigma)
        # The noise actually added (clipping at 0/255 removes part of it on saturated colours).
        added = float(np.std(np.asarray(noisy, dtype=np.float64) - np.asarray(clean, dtype=np.float64)))
        assert added * 0.8 < residual_noise(noisy) < added * 1.15
    assert residual_noise(Image.new("RGB", (4, 4))) == 0.0  # too small: defined, not a crash


def test_feature_distance_separates_real_from_noisy(t2i_cases):
    extractor = FeatureExtractor()
    real = [c.reference_image() for c in t2i_cases if c.category == "portrait"]
    feats_a, feats_b = extractor(real[:10]), extractor(real[10:])
    noisy = extractor([_noisy(im, 25) for im in real[10:]])
    assert feats_a.shape == (10, 1024)
    assert np.allclose(extractor(real[:2]), feats_a[:2])  # deterministic
    assert kernel_inception_distance(feats_a, noisy) > 5 * max(kernel_inception_distance(feats_a, feats_b), 0.02)


def test_ocr_reads_real_64px_words(t2i_cases):
    reader = OCRReader()
    texts = [c for c in t2i_cases if c.category == "text"][:8]
    readings = [reader.best_match(c.reference_image(), c.meta["text"]) for c in texts]
    assert sum(r["exact"] for r in readings) >= 6, readings
    assert char_accuracy("HELL0", "HELLO") == pytest.approx(0.8)
    blank = reader.best_match(Image.new("RGB", (64, 64), (20, 20, 20)), "SUN")
    assert blank["text"] == "" and not blank["exact"] and blank["char_accuracy"] == 0.0


def test_recogniser_on_real_bench_renders_and_under_blur(t2i_cases):
    rec = shared_recognizer()
    emoji = [c for c in t2i_cases if c.category != "text"]
    for transform in (lambda im: im, lambda im: _noisy(im.filter(ImageFilter.GaussianBlur(1)), 8)):
        preds = rec.predict([transform(c.reference_image()) for c in emoji])
        right = sum(max(p["subject"], key=p["subject"].get) == c.meta["subject"] for p, c in zip(preds, emoji))
        assert right / len(emoji) >= 0.85
    assert rec.card["heldout"]["clean"]["subject_unstyled"] >= 0.9


def test_formula_caps_and_rounds():
    assert [formula.to_score(x) for x in (0.2, 1.49, 1.5, 2.5, 4.49, 4.5, 9)] == [1, 1, 2, 3, 4, 5, 5]
    good_quality = {"noise_sigma": 0.0, "feature_ratio": 1.0}
    checks = {"background": {"passed": True, "found": "red", "expected": "red"}}
    perfect = {"core": {"kind": "subject", "passed": True, "strength": 0.99, "expected": "cat", "found": "cat"},
               "checks": checks, "quality": good_quality}
    assert formula.t2i_verdict(perfect).score == 5
    wrong = {**perfect, "core": {**perfect["core"], "passed": False, "strength": 0.4, "found": "cow"}}
    verdict = formula.t2i_verdict(wrong)
    assert verdict.score == 2 and "caps the score" in verdict.reasoning
    noisy = {**perfect, "quality": {"noise_sigma": 30.0, "feature_ratio": 3.0}}
    assert formula.t2i_verdict(noisy).score <= 2


def test_verdicts_serialise_to_the_paper_forms():
    t = T2IVerdict(score=3, reasoning="r", details={"x": 1})
    assert t.paper_json() == {"score": 3, "reasoning": "r"} and "details" not in t.model_dump()
    e = EditVerdict(overall_score=2, sub_scores={"a": 2}, reasoning="r", failure_modes=["edit_not_applied"])
    assert set(e.paper_json()) == {"overall_score", "sub_scores", "reasoning", "failure_modes"}
    with pytest.raises(ValueError):
        EditVerdict(overall_score=2, sub_scores={"a": 6}, reasoning="r")
    with pytest.raises(ValueError):
        T2IVerdict(score=0, reasoning="r")
