"""Structured captions from the bench world's recognisers: read the pixels, name what is there.

Uses the judges' parts (``fewstep.bench.judges``): rapidocr for text, the small CNN
recogniser for subject / skin tone / style, and the pixel rules for background colour and
text colour. Position and size come from the foreground mask's bounding box. Only what was
recognised is written; the caption reuses the corpus's phrasing so captioned prompts read
like the corpus's own.

An image with a confident OCR reading is a text image (``"a poster with the text "BOOK" in
white lettering, in the center, on purple"``); otherwise it is a subject (``"a small man
cook with dark skin on a teal background, on the left"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.curate.captioning import Caption

OCR_MIN_CONFIDENCE = 0.6
OCR_SCALE = 128
SUBJECT_MIN_PROBABILITY = 0.2
SUBJECT_CONFIDENT = 0.9
_POS = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top",
        "bottom": "at the bottom"}


@dataclass
class Recognizers:
    recognizer: Any  # fewstep.bench.judges.recognizers.Recognizer
    ocr: Any  # fewstep.bench.judges.ocr.OCRReader


def load_recognizers(threads: int = 1) -> Recognizers:
    """Load the shipped recogniser weights and the OCR engine (raises if the weights are missing)."""
    import torch

    from fewstep.bench.judges.ocr import OCRReader
    from fewstep.bench.judges.recognizers import Recognizer

    torch.set_num_threads(threads)
    return Recognizers(recognizer=Recognizer(), ocr=OCRReader())


def _layout(image: Image.Image) -> dict[str, Any]:
    """Position and size of the foreground (pixels far from the border colour)."""
    from fewstep.bench.judges.measure import foreground_mask

    mask = foreground_mask(image)
    if not mask.any():
        return {"position": None, "size": None}
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
    extent = max((xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h)
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return {"position": position, "size": "large" if extent >= 0.5 else "small"}


def _clean_word(text: str) -> str:
    return "".join(ch for ch in text if ch.isalnum() or ch in " -'").strip()


def structured_caption(recs: Recognizers, image: Image.Image) -> Caption:
    from fewstep.bench import world
    from fewstep.bench.judges.measure import background, text_colour

    image = image.convert("RGB")
    bg = background(image)["name"]
    layout = _layout(image)
    probs = recs.recognizer.predict([image])[0]
    subject, p_subject = max(probs["subject"].items(), key=lambda kv: kv[1])
    text, confidence = recs.ocr.read(image, OCR_SCALE)
    word = _clean_word(text)
    fields: dict[str, Any] = {"background": bg, **layout, "ocr_text": text or None,
                              "ocr_confidence": round(confidence, 3)}
    where = _POS.get(layout["position"] or "", "")
    # OCR sometimes reads two emoji as letters ("JJ"): a short reading only wins over a confident subject.
    letters = len(word.replace(" ", ""))
    if confidence >= OCR_MIN_CONFIDENCE and (letters >= 3 or (letters == 2 and p_subject < SUBJECT_CONFIDENT)):
        colour = text_colour(image)["name"]
        fields.update(kind="text", text=word, text_color=colour)
        size = f"{layout['size']} " if layout["size"] else ""
        ink = f"{colour} " if colour else ""
        caption = f'a poster with the text "{word}" in {size}{ink}lettering' + (f", {where}" if where else "")
        return Caption(f"{caption}, on {bg}", fields)
    tone = max(probs["tone"].items(), key=lambda kv: kv[1])[0]
    style = max(probs["style"].items(), key=lambda kv: kv[1])[0]
    fields.update(kind="subject", subject=subject, subject_probability=round(p_subject, 3),
                  skin_tone=None if tone == "none" else tone, style=None if style == "none" else style)
    if p_subject < SUBJECT_MIN_PROBABILITY:
        return Caption("", fields)  # nothing recognised: the row becomes no_usable_prompt
    name = world.subject(subject).name
    if fields["skin_tone"]:
        name += f" with {fields['skin_tone']} skin"
    if layout["size"]:
        name = f"{layout['size']} {name}"
    article = "an" if name[:1] in "aeiou" else "a"
    caption = f"{article} {name} on {'an' if bg[:1] in 'aeiou' else 'a'} {bg} background"
    if where:
        caption += f", {where}"
    if fields["style"]:
        caption += f", {fields['style']} style"
    return Caption(caption, fields)
