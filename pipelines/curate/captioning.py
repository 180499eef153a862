"""Captioners: give prompts to T2I images that arrive without one (or recaption them all).

One interface, two real implementations:

- :class:`VLMCaptioner`: a transformers vision-language model loaded from a local directory
  (Qwen2.5-VL and friends via ``AutoModelForImageTextToText``), greedy decoding. Real
  deployments point it at a real checkpoint; tests use a tiny random one.
- :class:`BenchRecognizerCaptioner`: the bench world's own recognisers plus OCR, which read the
  subject, its attributes and any text from the pixels and write a structured caption.

Captions land in ``prompt`` with ``caption_origin = "captioned"``; structured fields go into
``meta["caption"]`` so later stages (and people) can see where a prompt came from.
"""

from __future__ import annotations

import io
import json
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from PIL import Image

from pipelines.curate.config import CaptionConfig
from pipelines.curate.records import from_rows, is_kept, to_rows


@dataclass
class Caption:
    text: str
    structured: dict[str, Any] = field(default_factory=dict)


class Captioner(ABC):
    name: str = "captioner"

    @abstractmethod
    def caption(self, images: list[Image.Image]) -> list[Caption]:
        """One caption per image (an empty text when nothing usable was produced)."""


class VLMCaptioner(Captioner):
    """A transformers vision-language model from a local directory."""

    name = "vlm"

    def __init__(self, model_path: str, prompt: str = "Describe this image in one sentence.",
                 max_new_tokens: int = 32, threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForImageTextToText

        torch.set_num_threads(threads)
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.processor = _load_processor(model_path)
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, dtype=torch.float32).eval()

    def _text(self) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        # Qwen-VL's own template, for processors saved without a chat template.
        return (f"<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{self.prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")

    def caption(self, images: list[Image.Image]) -> list[Caption]:
        import torch

        if not images:
            return []
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # decoder-only generation pads on the left
        inputs = self.processor(text=[self._text()] * len(images), images=[im.convert("RGB") for im in images],
                                return_tensors="pt", padding=True)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [Caption(" ".join(t.split()), {"captioner": "vlm"}) for t in texts]


def _load_processor(model_path: str):
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_path)
    except (ImportError, OSError, ValueError, TypeError):
        # Without torchvision the stock Qwen2-VL processor cannot build its video processor:
        # fall back to the image-only subclass (see fewstep.models.tokenizer).
        from fewstep.models.tokenizer import FewstepQwen2VLProcessor

        return FewstepQwen2VLProcessor.from_pretrained(model_path)


class BenchRecognizerCaptioner(Captioner):
    """Structured captions from the bench world's recognisers (subject, attributes) and OCR."""

    name = "bench"

    def __init__(self, threads: int = 1):
        from pipelines.curate.bench_captioner import load_recognizers

        self.recognizers = load_recognizers(threads)

    def caption(self, images: list[Image.Image]) -> list[Caption]:
        from pipelines.curate.bench_captioner import structured_caption

        return [structured_caption(self.recognizers, image) for image in images]


def make_captioner(cfg: CaptionConfig, threads: int = 1) -> Captioner | None:
    if cfg.captioner == "vlm":
        return VLMCaptioner(cfg.model_path, cfg.prompt, cfg.max_new_tokens, threads)
    if cfg.captioner == "bench":
        return BenchRecognizerCaptioner(threads)
    return None


class CaptionRows:
    """``map_batches`` actor: captions the kept rows marked ``needs_caption``."""

    def __init__(self, cfg: CaptionConfig, threads: int = 1):
        self.cfg = cfg
        self.captioner = make_captioner(cfg, threads)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = to_rows(table)
        todo = [i for i, row in enumerate(rows) if is_kept(row) and row["needs_caption"] and row["image"]]
        for start in range(0, len(todo), self.cfg.batch_size):
            chunk = todo[start:start + self.cfg.batch_size]
            images = [Image.open(io.BytesIO(rows[i]["image"])) for i in chunk]
            for index, caption in zip(chunk, self.captioner.caption(images)):
                apply_caption(rows[index], caption, self.captioner.name)
        return from_rows(rows)


def apply_caption(row: dict, caption: Caption, captioner: str) -> None:
    meta = json.loads(row["meta"]) if row["meta"] else {}
    if not isinstance(meta, dict):
        meta = {"raw_meta": meta}
    meta["caption"] = {"captioner": captioner, "original_prompt": row["prompt"], **caption.structured}
    row["meta"] = json.dumps(meta, sort_keys=True)
    row["prompt"] = caption.text
    row["caption_origin"] = "captioned"
