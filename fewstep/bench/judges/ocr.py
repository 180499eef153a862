"""OCR for the text category: rapidocr (ONNX models that ship in the wheel).

Generated images are small (64 px by default) and often blurry. rapidocr's detector reads
rendered words at 64 px, but not always at every scale, so we read the image at a few fixed
upscales (bicubic) and keep the reading closest to the expected word: deterministic, and it
never invents text that is in none of the readings. Measured numbers are in docs/bench.md.
"""

from __future__ import annotations

import logging
import threading
import unicodedata

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_SCALES = (128, 64, 256)


def normalise_text(text: str) -> str:
    """Case-fold, strip accents-insensitive noise and whitespace; the unit exact matches compare."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if not ch.isspace())


def levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def char_accuracy(read: str, expected: str) -> float:
    """1 - edit distance / max(len): 1.0 exact, 0.0 nothing in common (normalised texts)."""
    read, expected = normalise_text(read), normalise_text(expected)
    if not read and not expected:
        return 1.0
    return max(0.0, 1.0 - levenshtein(read, expected) / max(len(read), len(expected)))


class OCRReader:
    """Thread-safe lazy wrapper around ``rapidocr_onnxruntime.RapidOCR``."""

    def __init__(self, scales: tuple[int, ...] = DEFAULT_SCALES) -> None:
        self.scales = scales
        self._engine = None
        self._lock = threading.Lock()

    def _load(self):
        if self._engine is None:
            from rapidocr_onnxruntime import RapidOCR

            self._engine = RapidOCR()
        return self._engine

    def read(self, image: Image.Image, scale: int | None = None) -> tuple[str, float]:
        """All text rapidocr finds (left-to-right, top-to-bottom joined by spaces) and its mean confidence."""
        image = image.convert("RGB")
        if scale is not None and max(image.size) != scale:
            factor = scale / max(image.size)
            size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
            image = image.resize(size, Image.Resampling.BICUBIC)
        with self._lock:
            result, _ = self._load()(np.asarray(image))
        if not result:
            return "", 0.0
        # Each item: [box (4 points), text, confidence]; order by the box's top then left.
        items = sorted(result, key=lambda item: (round(item[0][0][1] / 8), item[0][0][0]))
        text = " ".join(str(item[1]) for item in items)
        return text, float(np.mean([float(item[2]) for item in items]))

    def best_match(self, image: Image.Image, expected: str) -> dict:
        """Read at each scale; keep the reading with the highest char accuracy against ``expected``.

        Stops early on an exact match. Returns ``{"text", "confidence", "scale", "exact",
        "char_accuracy", "readings"}``.
        """
        best: dict | None = None
        readings = {}
        for scale in self.scales:
            text, confidence = self.read(image, scale)
            readings[str(scale)] = text
            accuracy = char_accuracy(text, expected)
            exact = normalise_text(text) == normalise_text(expected)
            candidate = {"text": text, "confidence": round(confidence, 4), "scale": scale,
                         "exact": exact, "char_accuracy": round(accuracy, 4)}
            if best is None or accuracy > best["char_accuracy"]:
                best = candidate
            if exact:
                break
        assert best is not None
        best["readings"] = readings
        return best
