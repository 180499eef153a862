"""One adapter over a Qwen-Image style pipeline directory: what every stage needs from the model.

It reproduces diffusers' ``QwenImagePipeline`` / ``QwenImageEditPipeline`` step by step (prompt
templates and drop index, 2x2 latent packing, ``img_shapes``, latent normalisation, source-latent
tokens appended after the noisy tokens, true CFG with norm rescale, Euler flow steps), so a tiny
random pipeline and a real Qwen-Image checkpoint go through exactly the same code.

Flow convention: ``z_t = (1 - t) x + t eps`` with ``t`` in [0, 1] (diffusers' sigma); the
transformer predicts the velocity ``eps - x``. The transformer is passed explicitly to
``predict_velocity`` / ``sample`` so that students, fake-score models and teachers share one adapter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from fewstep.models.image_vae import use_single_frame_convs
from fewstep.models.pipeline_dir import (
    MODEL_COMPONENTS,
    NotAPipelineError,
    PipelineDir,
    publish_dir,
    staging_dir,
    write_components,
)
from fewstep.models.templates import EDIT_DROP, EDIT_TEMPLATE, T2I_DROP, T2I_TEMPLATE
from fewstep.models.tokens import PromptEmbeds, pack_latents, unpack_latents
from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)

__all__ = ["QwenImageAdapter", "PromptEmbeds", "NotAPipelineError", "pack_latents", "unpack_latents"]

MAX_SEQUENCE_LENGTH = 1024
REAL_CONDITION_IMAGE_SIZE = 384  # side of the VL encoder's condition image for real checkpoints


class QwenImageAdapter:
    """Loaded components of one pipeline directory plus the stage-facing operations."""

    def __init__(self, source: PipelineDir, modules: dict[str, Any], device, dtype,
                 condition_image_size: int | None = None):
        self.source = source
        self.device = torch.device(device)
        self.dtype = dtype
        self.transformer = modules.get("transformer")
        self.vae = modules.get("vae")
        if self.vae is not None:
            use_single_frame_convs(self.vae)  # stages encode and decode single images
        self.text_encoder = modules.get("text_encoder")
        self.tokenizer = modules.get("tokenizer")
        self.processor = modules.get("processor")
        self.scheduler_config: dict[str, Any] = source.read_json("scheduler/scheduler_config.json")
        self.vae_config: dict[str, Any] = source.read_json("vae/config.json")
        self.transformer_config: dict[str, Any] = source.read_json("transformer/config.json")
        self.meta = source.meta()
        self.latent_channels: int = int(self.vae_config["z_dim"])
        # As QwenImagePipeline: spatial factor 2 ** (number of down-sampling stages).
        self.vae_scale_factor: int = 2 ** len(self.vae_config["temperal_downsample"])
        self.condition_image_size: int = int(
            condition_image_size or self.meta.get("condition_image_size") or REAL_CONDITION_IMAGE_SIZE)
        self.resolution: int | None = self.meta.get("resolution")
        mean = torch.tensor(self.vae_config["latents_mean"], dtype=torch.float32)
        std = torch.tensor(self.vae_config["latents_std"], dtype=torch.float32)
        self._latents_mean, self._latents_std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path_or_uri: str | Path, components: Sequence[str] = ("text_encoder", "vae", "transformer"),
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             storage: StorageOptions | None = None, cache_dir: str | Path | None = None,
             condition_image_size: int | None = None) -> QwenImageAdapter:
        """Load only ``components`` (any of transformer, vae, text_encoder) from a local or s3:// dir.

        The tokenizer (and the processor, if the directory has one) come with the text encoder.
        """
        unknown = set(components) - set(MODEL_COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {list(MODEL_COMPONENTS)}")
        source = PipelineDir(str(path_or_uri), storage, cache_dir)
        modules: dict[str, Any] = {}
        if "transformer" in components:
            from diffusers import QwenImageTransformer2DModel

            modules["transformer"] = QwenImageTransformer2DModel.from_pretrained(
                str(source.component_path("transformer")), torch_dtype=dtype).to(device).eval()
        if "vae" in components:
            from diffusers import AutoencoderKLQwenImage

            modules["vae"] = AutoencoderKLQwenImage.from_pretrained(
                str(source.component_path("vae")), torch_dtype=dtype).to(device).eval()
        if "text_encoder" in components:
            from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

            modules["text_encoder"] = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                str(source.component_path("text_encoder")), dtype=dtype).to(device).eval()
            modules["tokenizer"] = Qwen2Tokenizer.from_pretrained(str(source.component_path("tokenizer")))
            if source.has("processor"):
                from fewstep.models.tokenizer import FewstepQwen2VLProcessor

                modules["processor"] = FewstepQwen2VLProcessor.from_pretrained(
                    str(source.component_path("processor")))
        return cls(source, modules, device, dtype, condition_image_size)

    def _need(self, name: str):
        module = getattr(self, name)
        if module is None:
            raise RuntimeError(f"{name} was not loaded; pass components=(..., {name!r}) to QwenImageAdapter.load")
        return module

    # ------------------------------------------------------------------ prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], images: Sequence[Image.Image] | None = None,
                       max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> PromptEmbeds:
        """Text (T2I template) or text + condition image (edit template) -> embeddings and mask."""
        text_encoder = self._need("text_encoder")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("encode_prompts needs at least one prompt")
        if images is None:
            drop = T2I_DROP
            inputs = self.tokenizer([T2I_TEMPLATE.format(p) for p in prompts], max_length=MAX_SEQUENCE_LENGTH + drop,
                                    padding=True, truncation=True, return_tensors="pt")
        else:
            if self.processor is None:
                raise RuntimeError(f"{self.source.uri} has no processor/: it cannot encode edit prompts")
            if len(images) != len(prompts):
                raise ValueError(f"got {len(images)} condition images for {len(prompts)} prompts")
            drop = EDIT_DROP
            inputs = self.processor(text=[EDIT_TEMPLATE.format(p) for p in prompts],
                                    images=[self.condition_image(im) for im in images],
                                    padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        out = text_encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                           pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                           output_hidden_states=True)
        hidden = out.hidden_states[-1]
        mask = inputs["attention_mask"].bool()
        rows = [h[m][drop:] for h, m in zip(hidden, mask)]
        length = max(max(r.shape[0] for r in rows), 1)
        embeds = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - r.shape[0])) for r in rows])
        valid = torch.stack([
            torch.nn.functional.pad(torch.ones(r.shape[0], dtype=torch.long, device=r.device), (0, length - r.shape[0]))
            for r in rows])
        return PromptEmbeds(embeds[:, :max_sequence_length], valid[:, :max_sequence_length])

    def condition_image(self, image: Image.Image) -> Image.Image:
        """The edit condition image as the VL encoder sees it: about ``condition_image_size``^2 pixels,
        aspect kept, sides multiples of 28 (vision patch 14 x merge 2). Sized by us, not the pipeline."""
        image = image.convert("RGB")
        area = self.condition_image_size ** 2
        ratio = image.width / image.height
        width = max(28, round(math.sqrt(area * ratio) / 28) * 28)
        height = max(28, round(math.sqrt(area / ratio) / 28) * 28)
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BICUBIC)
        return image

    # ------------------------------------------------------------------ images <-> latents
    def images_to_tensor(self, images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
        """PIL images -> [B, 3, H, W] in [-1, 1]; ``size`` (height, width) resizes (Lanczos) first."""
        arrays = []
        for im in images:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.LANCZOS)
            arrays.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        if len({a.shape for a in arrays}) > 1:
            raise ValueError("images in a batch must have one size; pass size=(height, width)")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image] | torch.Tensor,
                      size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images -> normalised latents [B, C, H/f, W/f] (distribution mode, as the edit pipeline)."""
        vae = self._need("vae")
        x = images if isinstance(images, torch.Tensor) else self.images_to_tensor(images, size)
        multiple = self.vae_scale_factor * 2
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % multiple or x.shape[3] % multiple:
            raise ValueError(f"images must be [B, 3, H, W] with H and W multiples of {multiple}; got {tuple(x.shape)}")
        x = x.to(self.device, vae.dtype)
        latents = vae.encode(x[:, :, None]).latent_dist.mode()[:, :, 0]
        mean, std = self._latents_mean.to(latents), self._latents_std.to(latents)
        return (latents - mean) / std

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, h, w] -> images [B, 3, H, W] in [-1, 1]."""
        vae = self._need("vae")
        z = latents.to(self.device, vae.dtype)
        z = z * self._latents_std.to(z) + self._latents_mean.to(z)
        return vae.decode(z[:, :, None], return_dict=False)[0][:, :, 0].clamp(-1, 1)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        """[B, 3, H, W] in [-1, 1] -> PIL images (rounded like diffusers' postprocess)."""
        arr = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255)
        return [Image.fromarray(a) for a in arr.round().astype("uint8")]

    # ------------------------------------------------------------------ the flow model
    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        multiple = self.vae_scale_factor * 2
        return 2 * (height // multiple), 2 * (width // multiple)

    def _velocity_tokens(self, transformer, latents, t, embeds: PromptEmbeds, source_latents=None):
        """Packed velocity tokens [B, N, 4C] for the noisy latents only."""
        b, _, h, w = latents.shape
        if getattr(transformer.config, "guidance_embeds", False):
            raise NotImplementedError("guidance-distilled transformers (guidance_embeds=True) are not supported")
        param = next(transformer.parameters())
        tokens = pack_latents(latents.to(param.dtype))
        shapes = [(1, h // 2, w // 2)]
        if source_latents is not None:
            if source_latents.shape[0] != b:
                raise ValueError(f"source_latents batch {source_latents.shape[0]} != latents batch {b}")
            sh, sw = source_latents.shape[2:]
            tokens = torch.cat([tokens, pack_latents(source_latents.to(tokens))], dim=1)
            shapes.append((1, sh // 2, sw // 2))
        t = torch.as_tensor(t, device=tokens.device, dtype=tokens.dtype)
        t = t.expand(b) if t.ndim == 0 else t.to(tokens.dtype)
        if embeds.embeds.shape[0] != b:
            raise ValueError(f"prompt embeddings batch {embeds.embeds.shape[0]} != latents batch {b}")
        mask = embeds.mask.to(tokens.device)
        out = transformer(
            hidden_states=tokens,
            timestep=t,
            encoder_hidden_states=embeds.embeds.to(tokens.device, tokens.dtype),
            # The pipelines drop an all-ones mask; doing the same keeps results identical.
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return out[:, : (h // 2) * (w // 2)]

    def predict_velocity(self, transformer, latents: torch.Tensor, t: torch.Tensor, embeds: PromptEmbeds,
                         source_latents: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity ``eps - x`` at ``z_t`` = ``latents`` [B, C, h, w], ``t`` [B] (or scalar) in [0, 1]."""
        h, w = latents.shape[2:]
        return unpack_latents(self._velocity_tokens(transformer, latents, t, embeds, source_latents), h, w)

    def guided_velocity(self, transformer, latents, t, cond: PromptEmbeds, uncond: PromptEmbeds | None,
                        scale: float, source_latents=None) -> torch.Tensor:
        """Qwen true CFG: ``u + s (c - u)`` rescaled per token to the norm of ``c``."""
        h, w = latents.shape[2:]
        c = self._velocity_tokens(transformer, latents, t, cond, source_latents)
        if uncond is None or scale <= 1.0:
            return unpack_latents(c, h, w)
        u = self._velocity_tokens(transformer, latents, t, uncond, source_latents)
        comb = u + scale * (c - u)
        comb = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return unpack_latents(comb, h, w)

    @staticmethod
    def sigmas(num_steps: int, shift: float) -> torch.Tensor:
        """Shifted schedule 1 -> 0 (``num_steps + 1`` values), computed as FlowMatchEulerDiscreteScheduler
        with ``use_dynamic_shifting=False`` does (same float32 arithmetic)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        s = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
        s = shift * s / (1 + (shift - 1) * s)
        return torch.cat([torch.from_numpy(s).to(torch.float32), torch.zeros(1)])

    @torch.no_grad()
    def sample(self, transformer, cond: PromptEmbeds, uncond: PromptEmbeds | None = None, *, num_steps: int,
               guidance_scale: float = 1.0, shift: float = 1.0, height: int | None = None, width: int | None = None,
               generator: torch.Generator | None = None, seed: int | None = None,
               source_latents: torch.Tensor | None = None, init_noise: torch.Tensor | None = None,
               progress: bool = False) -> torch.Tensor:
        """Euler flow sampling with N steps, shift and true CFG -> normalised latents [B, C, h, w].

        Same noise and arithmetic as ``QwenImagePipeline`` with a scheduler of ``shift`` (float32).
        """
        b = len(cond)
        if init_noise is None:
            size = height or self.resolution
            if size is None or (width or size) is None:
                raise ValueError("sample needs height and width (or init_noise)")
            h, w = self.latent_hw(height or size, width or size)
            if generator is None:
                generator = torch.Generator("cpu").manual_seed(0 if seed is None else seed)
            # Shape [B, 1, C, h, w] as the pipeline draws it, so the same seed gives the same noise.
            noise = torch.randn((b, 1, self.latent_channels, h, w), generator=generator,
                                device=generator.device, dtype=cond.embeds.dtype)
            x = noise[:, 0].to(self.device, torch.float32)
        else:
            x = init_noise.to(self.device, torch.float32)
        sig = self.sigmas(num_steps, shift).to(x.device)
        steps = range(num_steps)
        if progress:
            from tqdm import tqdm

            steps = tqdm(steps, desc="sampling", leave=False)
        for i in steps:
            # The pipeline passes (1000 * sigma) / 1000 in float32; do the same for identical t.
            t = (sig[i] * 1000).expand(b) / 1000
            v = self.guided_velocity(transformer, x, t, cond, uncond, guidance_scale, source_latents)
            x = x + (sig[i + 1] - sig[i]) * v.float()
        return x

    # ------------------------------------------------------------------ export
    def save_pipeline(self, out_dir: str, transformer=None, scheduler_shift: float | None = None,
                      num_steps_hint: int | None = None, fp16: bool = False,
                      storage: StorageOptions | None = None, extra_meta: dict | None = None) -> str:
        """Write a full pipeline directory (local or s3://) that diffusers' pipelines load.

        ``transformer`` replaces the loaded one (e.g. a distilled student); other components are the
        loaded objects or copied from the source directory. The scheduler gets ``use_dynamic_shifting=False``
        and ``shift=scheduler_shift`` so that diffusers' sampling matches :meth:`sample`.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        config = dict(self.scheduler_config)
        if scheduler_shift is not None:
            # Everything that would make diffusers' schedule differ from `sigmas()` is switched off.
            config.update(shift=float(scheduler_shift), use_dynamic_shifting=False, shift_terminal=None,
                          use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                          invert_sigmas=False, stochastic_sampling=False)
        parts: dict[str, Any] = {"scheduler": FlowMatchEulerDiscreteScheduler.from_config(config)}
        loaded = {"transformer": transformer or self.transformer, "vae": self.vae, "text_encoder": self.text_encoder,
                  "tokenizer": self.tokenizer if self.text_encoder is not None else None,
                  "processor": self.processor if self.text_encoder is not None else None}
        for name, obj in loaded.items():
            if obj is not None:
                parts[name] = obj
            elif self.source.has(name):
                parts[name] = self.source.component_path(name)
        meta = dict(self.meta)
        meta.update({k: v for k, v in {"scheduler_shift": scheduler_shift, "num_steps_hint": num_steps_hint}.items()
                     if v is not None})
        meta.update(extra_meta or {})
        meta.setdefault("condition_image_size", self.condition_image_size)
        tmp = staging_dir(out_dir)
        try:
            write_components(tmp, parts, meta=meta, dtype=torch.float16 if fp16 else None)
            return publish_dir(tmp, out_dir, storage)
        finally:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
