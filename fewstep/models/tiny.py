"""Write a tiny random Qwen-Image style pipeline directory from a YAML preset.

The directory has the diffusers layout of a real Qwen-Image(-Edit) checkpoint, so that
``QwenImagePipeline.from_pretrained`` and ``QwenImageAdapter.load`` read it with the same code
as a real one: the classes are the real ones, only the sizes are small. The tokenizer is trained
locally (see ``tokenizer.py``); nothing is downloaded.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from pydantic import Field, model_validator

from fewstep import storage
from fewstep.config import StrictModel, load_config
from fewstep.models.pipeline_dir import publish_dir, staging_dir, write_components
from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)

class TransformerSpec(StrictModel):
    """QwenImageTransformer2DModel sizes (patch 2 is fixed by the pipelines' 2x2 latent packing)."""

    num_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    attention_head_dim: int = Field(16, ge=4)
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6)

    @model_validator(mode="after")
    def _rope_fits(self):
        if sum(self.axes_dims_rope) != self.attention_head_dim or any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must be even numbers summing to "
                f"attention_head_dim={self.attention_head_dim}"
            )
        return self


class VaeSpec(StrictModel):
    """AutoencoderKLQwenImage sizes; spatial downsampling = 2 ** len(temperal_downsample)."""

    z_dim: int = Field(4, ge=1)
    base_dim: int = Field(16, ge=4)
    dim_mult: list[int] = [1, 2, 4]
    num_res_blocks: int = Field(1, ge=1)
    temperal_downsample: list[bool] = [False, True]
    latents_mean: list[float] | None = None  # None -> zeros
    latents_std: list[float] | None = None  # None -> ones

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample needs len(dim_mult) - 1 = {len(self.dim_mult) - 1} entries, "
                f"got {len(self.temperal_downsample)}"
            )
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            if value is not None and len(value) != self.z_dim:
                raise ValueError(f"{name} needs z_dim={self.z_dim} entries, got {len(value)}")
        return self


class TextEncoderSpec(StrictModel):
    """A tiny Qwen2.5-VL (text model + vision tower)."""

    hidden_size: int = Field(32, ge=8)
    intermediate_size: int = Field(64, ge=8)
    num_hidden_layers: int = Field(2, ge=1)
    num_attention_heads: int = Field(2, ge=1)
    num_key_value_heads: int = Field(2, ge=1)
    mrope_section: list[int] = [2, 3, 3]  # sums to head_dim / 2
    vision_depth: int = Field(1, ge=1)
    vision_hidden_size: int = Field(32, ge=8)
    vision_intermediate_size: int = Field(64, ge=8)
    vision_num_heads: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _heads(self):
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if sum(self.mrope_section) * 2 != head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to head_dim / 2 = {head_dim // 2}")
        if self.vision_hidden_size % self.vision_num_heads:
            raise ValueError("vision_hidden_size must be divisible by vision_num_heads")
        return self


class TinyPipelineConfig(StrictModel):
    """``configs/models/*.yaml``: one random pipeline's architecture."""

    name: str = "tiny"
    resolution: int = Field(32, ge=8)  # default image side the model is meant for
    condition_image_size: int = Field(56, ge=28)  # edit: side of the image the VL encoder sees
    vocab_size: int = Field(2048, ge=320)
    scheduler_shift: float = Field(1.0, gt=0)
    transformer: TransformerSpec = TransformerSpec()
    vae: VaeSpec = VaeSpec()
    text_encoder: TextEncoderSpec = TextEncoderSpec()

    @model_validator(mode="after")
    def _resolution(self):
        multiple = 2 ** len(self.vae.temperal_downsample) * 2
        if self.resolution % multiple:
            raise ValueError(f"resolution={self.resolution} must be a multiple of vae scale x 2 = {multiple}")
        if self.condition_image_size % 28:
            raise ValueError("condition_image_size must be a multiple of 28 (vision patch 14 x merge 2)")
        return self


def load_tiny_config(path: str | Path) -> TinyPipelineConfig:
    return load_config(TinyPipelineConfig, path)


def build_components(cfg: TinyPipelineConfig, seed: int = 0) -> dict:
    """Random components with the real classes; same (cfg, seed) -> same weights."""
    import torch
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fewstep.models.tokenizer import build_tokenizer, make_processor, special_token_ids

    tokenizer = build_tokenizer(vocab_size=cfg.vocab_size)
    ids = special_token_ids(tokenizer)
    vocab = len(tokenizer)
    side = cfg.condition_image_size
    processor = make_processor(
        tokenizer, {"min_pixels": side * side, "max_pixels": side * side}
    )

    t, v, te = cfg.transformer, cfg.vae, cfg.text_encoder
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=v.z_dim * 4,
        out_channels=v.z_dim,
        num_layers=t.num_layers,
        attention_head_dim=t.attention_head_dim,
        num_attention_heads=t.num_attention_heads,
        joint_attention_dim=te.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=tuple(t.axes_dims_rope),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=v.base_dim,
        z_dim=v.z_dim,
        dim_mult=list(v.dim_mult),
        num_res_blocks=v.num_res_blocks,
        temperal_downsample=list(v.temperal_downsample),
        latents_mean=list(v.latents_mean) if v.latents_mean else [0.0] * v.z_dim,
        latents_std=list(v.latents_std) if v.latents_std else [1.0] * v.z_dim,
    )
    torch.manual_seed(seed + 2)
    te_config = Qwen2_5_VLConfig(
        text_config={
            "hidden_size": te.hidden_size,
            "intermediate_size": te.intermediate_size,
            "num_hidden_layers": te.num_hidden_layers,
            "num_attention_heads": te.num_attention_heads,
            "num_key_value_heads": te.num_key_value_heads,
            "rope_scaling": {"mrope_section": list(te.mrope_section), "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
            "vocab_size": vocab,
            "max_position_embeddings": 4096,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": te.vision_depth,
            "hidden_size": te.vision_hidden_size,
            "intermediate_size": te.vision_intermediate_size,
            "num_heads": te.vision_num_heads,
            "out_hidden_size": te.hidden_size,
            "fullatt_block_indexes": list(range(te.vision_depth)),
        },
        hidden_size=te.hidden_size,
        vocab_size=vocab,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=cfg.scheduler_shift, use_dynamic_shifting=False
    )
    return {
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": processor,
        "scheduler": scheduler,
    }


def fewstep_meta(cfg: TinyPipelineConfig, seed: int) -> dict:
    return {
        "format": "fewstep-qwenimage/1",
        "name": cfg.name,
        "seed": seed,
        "resolution": cfg.resolution,
        "condition_image_size": cfg.condition_image_size,
        "config": cfg.model_dump(mode="json"),
    }


def init_tiny(
    out_uri: str | Path,
    cfg: TinyPipelineConfig,
    seed: int = 0,
    overwrite: bool = False,
    storage_options: StorageOptions | None = None,
) -> str:
    """Write a random pipeline directory at ``out_uri`` (local path or s3://). Returns the URI."""
    out_uri = storage.normalize(out_uri)
    if storage.exists(storage.join(out_uri, "model_index.json"), storage_options) or (
        not storage.is_s3(out_uri) and Path(out_uri).exists() and any(Path(out_uri).iterdir())
    ):
        if not overwrite:
            raise FileExistsError(f"{out_uri} exists and is not empty; pass --overwrite or choose another --out")
        storage.delete(out_uri, storage_options, recursive=True)
    components = build_components(cfg, seed)
    # Build in a temporary directory and publish at once: no half-written pipeline is ever seen.
    tmp = staging_dir(out_uri)
    try:
        write_components(tmp, components, meta=fewstep_meta(cfg, seed))
        publish_dir(tmp, out_uri, storage_options)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote tiny pipeline %r to %s", cfg.name, out_uri)
    return out_uri
