"""Sample bench cases with any model: inputs, per-case noise, counted network calls, grids.

Shared by ``fewstep eval``, the DMD objective's periodic validation and
``benchmarks/sampling.py`` so that all three draw the same noise for a case (its ``seed``,
drawn as ``QwenImagePipeline`` draws it) and count network calls the same way: every
forward pass of the transformer counts once per sample in its batch, so a teacher with true
CFG costs 2 calls per step and a student without CFG 1.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image, ImageDraw

from fewstep.models.adapter import QwenImageAdapter
from fewstep.models.tokens import PromptEmbeds


@dataclass
class CaseInputs:
    """Everything a sampler needs for a list of bench cases at one resolution."""

    cases: list[Any]
    task: str
    resolution: int
    cond: PromptEmbeds
    uncond: PromptEmbeds | None  # None when prepared for sampling without CFG
    noise: torch.Tensor  # [B, C, h, w]
    source_latents: torch.Tensor | None = None
    sources: list[Image.Image] | None = None
    encode_s: float = 0.0

    def __len__(self) -> int:
        return len(self.cases)

    def select(self, index: slice) -> CaseInputs:
        return CaseInputs(
            self.cases[index], self.task, self.resolution, self.cond[index],
            None if self.uncond is None else self.uncond[index],
            self.noise[index], None if self.source_latents is None else self.source_latents[index],
            None if self.sources is None else self.sources[index], self.encode_s)


SEED_STRIDE = 1_000_003  # a prime far above the spacing of nearby case seeds


def draw_seed(case_seed: int, draw: int) -> int:
    """The sampling seed of a case's ``draw``-th draw; draw 0 is the case's own seed."""
    return int(case_seed) + int(draw) * SEED_STRIDE


def case_noise(seed: int, channels: int, h: int, w: int) -> torch.Tensor:
    """The initial noise of one case, drawn like ``QwenImagePipeline`` with ``generator=seed``."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, 1, channels, h, w), generator=generator)[:, 0]


def prepare_cases(adapter: QwenImageAdapter, cases: Sequence[Any], resolution: int,
                  negative_prompt: str = "", with_uncond: bool = True) -> CaseInputs:
    """Encode prompts (and edit sources) of one task's cases with the adapter's text encoder/VAE.

    ``with_uncond=False`` skips the negative prompt, which only true CFG uses (a student's
    measured time should not include an encoding it never needs)."""
    cases = list(cases)
    if not cases:
        raise ValueError("prepare_cases needs at least one case")
    tasks = {c.task for c in cases}
    if len(tasks) != 1:
        raise ValueError(f"cases of one call must share a task, got {sorted(tasks)}")
    task = tasks.pop()
    start = time.perf_counter()
    h, w = adapter.latent_hw(resolution, resolution)
    noise = torch.cat([case_noise(c.seed, adapter.latent_channels, h, w) for c in cases])
    prompts = [c.prompt for c in cases]
    if task == "edit":
        sources = [c.source_image(resolution) for c in cases]
        cond = adapter.encode_prompts(prompts, images=sources)
        uncond = adapter.encode_prompts([negative_prompt] * len(cases), images=sources) if with_uncond else None
        source_latents = adapter.encode_images(sources, size=(resolution, resolution)).float()
    else:
        sources, source_latents = None, None
        cond = adapter.encode_prompts(prompts)
        uncond = adapter.encode_prompts([negative_prompt] * len(cases)) if with_uncond else None
    return CaseInputs(cases, task, resolution, cond.to(dtype=torch.float32),
                      None if uncond is None else uncond.to(dtype=torch.float32),
                      noise, source_latents, sources, time.perf_counter() - start)


@dataclass
class CallCount:
    calls: int = 0  # forward passes
    sample_evals: int = 0  # forward passes x samples in each


@contextlib.contextmanager
def count_calls(module: torch.nn.Module) -> Iterator[CallCount]:
    """Count forward passes of ``module`` (and the samples they carried) inside the block."""
    counter = CallCount()

    def hook(_module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        counter.calls += 1
        counter.sample_evals += int(hidden.shape[0]) if hidden is not None else 1

    target = getattr(module, "module", module)  # a DeepSpeed engine wraps the model
    handle = target.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


@dataclass
class SampleResult:
    latents: torch.Tensor
    images: list[Image.Image]
    sample_s: float
    decode_s: float
    network_calls: int  # sample evaluations of the transformer (per-sample forward passes)
    forward_passes: int
    extra: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def sample_cases(adapter: QwenImageAdapter, transformer, inputs: CaseInputs, *, num_steps: int,
                 guidance_scale: float, shift: float, batch_size: int = 16,
                 decode: bool = True) -> SampleResult:
    """Sample ``inputs`` in batches with ``num_steps`` Euler steps (true CFG if scale > 1)."""
    if guidance_scale > 1 and inputs.uncond is None:
        raise ValueError("true CFG needs the negative prompt: prepare_cases(..., with_uncond=True)")
    latents, images = [], []
    sample_s = decode_s = 0.0
    with count_calls(transformer) as counter:
        for start in range(0, len(inputs), batch_size):
            part = inputs.select(slice(start, start + batch_size))
            t0 = time.perf_counter()
            x = adapter.sample(transformer, part.cond, part.uncond if guidance_scale > 1 else None,
                               num_steps=num_steps, guidance_scale=guidance_scale, shift=shift,
                               init_noise=part.noise, source_latents=part.source_latents)
            sample_s += time.perf_counter() - t0
            latents.append(x.float().cpu())
            if decode:
                t0 = time.perf_counter()
                images.extend(adapter.to_pil(adapter.decode_latents(x)))
                decode_s += time.perf_counter() - t0
    return SampleResult(torch.cat(latents), images, sample_s, decode_s, counter.sample_evals,
                        counter.calls)


def image_stats(images: Sequence[Image.Image]) -> dict[str, float]:
    """Collapse indicators, on [0, 1] pixels: mean per-image pixel std (flat colour -> 0), mean
    pairwise distance between images of different prompts (mode collapse -> 0), and the share of
    images whose border colour falls in the most common coarse colour bin (one background for
    every prompt -> 1; prompts asking for varied backgrounds keep it low)."""
    import numpy as np

    arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    pixel_std = float(arrays.std(axis=(1, 2)).mean())  # spatial std per channel: flat colour -> 0
    edge = max(1, arrays.shape[1] // 16)
    border = np.concatenate([arrays[:, :edge].reshape(len(arrays), -1, 3),
                             arrays[:, -edge:].reshape(len(arrays), -1, 3),
                             arrays[:, :, :edge].reshape(len(arrays), -1, 3),
                             arrays[:, :, -edge:].reshape(len(arrays), -1, 3)], axis=1).mean(axis=1)
    bins = np.minimum((border * 4).astype(int), 3)  # 4 levels per channel: 64 colour bins
    _, counts = np.unique(bins, axis=0, return_counts=True)
    border_mode_share = float(counts.max() / len(arrays))
    if len(arrays) < 2:
        return {"pixel_std": pixel_std, "diversity": 0.0, "border_mode_share": border_mode_share}
    flat = arrays.reshape(len(arrays), -1)
    dists = [float(np.sqrt(((flat[i] - flat[j]) ** 2).mean()))
             for i in range(len(flat)) for j in range(i + 1, len(flat))]
    return {"pixel_std": pixel_std, "diversity": float(np.mean(dists)), "border_mode_share": border_mode_share}


def make_grid(images: Sequence[Image.Image], labels: Sequence[str] | None = None, columns: int = 8,
              cell: int = 96) -> Image.Image:
    """Images in a grid of ``columns`` (each scaled to ``cell`` px), optional one-line labels."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (columns * cell, rows * (cell + label_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % columns) * cell, (i // columns) * (cell + label_h)
        grid.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y + label_h))
        if labels:
            draw.text((x + 2, y), str(labels[i])[: cell // 6], fill=(0, 0, 0))
    return grid
