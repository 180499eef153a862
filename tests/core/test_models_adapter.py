"""QwenImageAdapter on a tiny random pipeline: shapes, determinism, and equality with diffusers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"
PROMPTS = ["a red cat", "a blue dog on the left of a green tree"]  # different lengths -> padding + mask


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    from fewstep.models.tiny import init_tiny, load_tiny_config

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny", load_tiny_config(CONFIGS / "tiny.yaml"), seed=0)


@pytest.fixture(scope="module")
def ad(tiny_dir):
    from fewstep.models.adapter import QwenImageAdapter

    torch.manual_seed(0)
    return QwenImageAdapter.load(tiny_dir)


def _images(n: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _small_edit_pipeline(monkeypatch, tiny_dir, side: int):
    """Stock QwenImageEditPipeline whose only change is the condition-image size.

    The stock pipeline sizes the condition image to ~1024x1024 whatever the output (16k source
    tokens; minutes on 2 CPUs for a tiny model). fewstep sizes it itself; patching the one sizing
    function makes the stock loop comparable at our size. Everything else is diffusers' code.
    """
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
    from diffusers import QwenImageEditPipeline

    from fewstep.models.tokenizer import FewstepQwen2VLProcessor

    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: (side, side, None))
    # The stock Qwen2VLProcessor also loads a video processor, which needs torchvision (broken here).
    processor = FewstepQwen2VLProcessor.from_pretrained(str(Path(tiny_dir) / "processor"))
    return QwenImageEditPipeline.from_pretrained(tiny_dir, processor=processor)


def test_properties(ad):
    assert ad.latent_channels == 4
    assert ad.vae_scale_factor == 4  # 2 ** len(temperal_downsample)
    assert ad.condition_image_size == 56
    assert ad.resolution == 32


def test_encode_prompts_match_pipeline_t2i(ad, tiny_dir):
    from diffusers import QwenImagePipeline

    pe = ad.encode_prompts(PROMPTS)
    pipe = QwenImagePipeline.from_pretrained(tiny_dir)
    ref, ref_mask = pipe.encode_prompt(PROMPTS)
    assert pe.embeds.shape == ref.shape and pe.embeds.shape[2] == 32
    assert torch.equal(pe.embeds, ref)
    assert torch.equal(pe.mask, ref_mask)
    # The template prefix is dropped exactly: "a red cat" + "<|im_end|>\n<|im_start|>assistant\n".
    assert pe.mask[0].sum() < pe.mask[1].sum() == pe.embeds.shape[1]


def test_encode_decode_shapes(ad):
    latents = ad.encode_images(_images(2))
    assert latents.shape == (2, 4, 8, 8)
    images = ad.decode_latents(latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert [im.size for im in ad.to_pil(images)] == [(32, 32), (32, 32)]
    # Tensors in [-1, 1] and resizing on the way in.
    tensor = ad.images_to_tensor(_images(1, size=40), size=(48, 64))
    assert tensor.shape == (1, 3, 48, 64) and tensor.min() >= -1 and tensor.max() <= 1
    assert ad.encode_images(tensor).shape == (1, 4, 12, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        ad.encode_images(_images(1, size=36))


def test_sample_deterministic_with_seed(ad):
    cond, uncond = ad.encode_prompts(PROMPTS), ad.encode_prompts(["", ""])
    kwargs = dict(num_steps=2, guidance_scale=3.0, shift=2.0, height=32, width=32)
    a = ad.sample(ad.transformer, cond, uncond, seed=5, **kwargs)
    b = ad.sample(ad.transformer, cond, uncond, generator=torch.Generator().manual_seed(5), **kwargs)
    c = ad.sample(ad.transformer, cond, uncond, seed=6, **kwargs)
    assert a.shape == (2, 4, 8, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize(("shift", "cfg"), [(1.0, 1.0), (3.0, 4.0)])
def test_sample_equals_diffusers_t2i(ad, tiny_dir, shift, cfg):
    from diffusers import QwenImagePipeline

    from fewstep.models.tokens import pack_latents

    pipe = QwenImagePipeline.from_pretrained(tiny_dir)
    pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, shift=shift)
    ref = pipe(PROMPTS, negative_prompt=["", ""], true_cfg_scale=cfg, height=32, width=32, num_inference_steps=3,
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    ours = ad.sample(ad.transformer, ad.encode_prompts(PROMPTS), ad.encode_prompts(["", ""]), num_steps=3,
                     guidance_scale=cfg, shift=shift, height=32, width=32, seed=7)
    # Same noise, same float32 arithmetic: equal to the last bit on CPU.
    assert torch.equal(pack_latents(ours), ref)


def test_edit_path_equals_diffusers_edit_pipeline(ad, tiny_dir, monkeypatch):
    from fewstep.models.tokens import pack_latents

    pipe = _small_edit_pipeline(monkeypatch, tiny_dir, side=32)
    image = _images(1, seed=3)[0]
    cond = ad.encode_prompts(["make it blue"], images=[image])
    ref_embeds, _ = pipe.encode_prompt(prompt=["make it blue"], image=[image])
    assert torch.equal(cond.embeds, ref_embeds)
    # 4 image tokens (56x56 condition, patch 14, merge 2) stay in the edit embeddings.
    ids = ad.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[ad.condition_image(image)],
                       return_tensors="pt")["input_ids"][0]
    assert int((ids == ad.processor.image_token_id).sum()) == 4

    ref = pipe(image=image, prompt="make it blue", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32,
               num_inference_steps=2, generator=torch.Generator().manual_seed(3), output_type="latent").images
    ours = ad.sample(ad.transformer, cond, ad.encode_prompts([" "], images=[image]), num_steps=2,
                     guidance_scale=4.0, shift=1.0, height=32, width=32, seed=3,
                     source_latents=ad.encode_images([image]))
    # The pipeline scales pixels as x/255*2-1, we as x/127.5-1: float32 rounding apart only.
    torch.testing.assert_close(pack_latents(ours), ref, rtol=1e-4, atol=1e-5)
    out = pipe(image=image, prompt="make it blue", height=32, width=32, num_inference_steps=2,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(out, Image.Image) and out.size == (32, 32)


def test_predict_velocity_shapes_t2i_and_edit(ad):
    cond = ad.encode_prompts(PROMPTS)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([0.3, 0.9])
    v = ad.predict_velocity(ad.transformer, x, t, cond)
    assert v.shape == x.shape
    # Edit: source latents of another size (48x48 image -> 12x12) are appended as extra tokens.
    source = ad.encode_images(_images(2, size=48))
    edit_cond = ad.encode_prompts(["make it blue", "add a hat"], images=_images(2, size=48))
    ve = ad.predict_velocity(ad.transformer, x, t, edit_cond, source_latents=source)
    assert ve.shape == x.shape
    ve2 = ad.predict_velocity(ad.transformer, x, t, edit_cond, source_latents=source.flip(0))
    assert not torch.allclose(ve, ve2)  # the source really conditions the prediction
    with pytest.raises(ValueError, match="batch"):
        ad.predict_velocity(ad.transformer, x, t, cond[0])


def test_predict_velocity_has_gradients(ad):
    cond = ad.encode_prompts(PROMPTS[:1])
    x = torch.randn(1, 4, 8, 8, requires_grad=True)
    v = ad.predict_velocity(ad.transformer, x, torch.tensor([0.5]), cond)
    v.square().mean().backward()
    assert x.grad is not None and ad.transformer.img_in.weight.grad is not None
    ad.transformer.zero_grad(set_to_none=True)


def test_guided_velocity_cfg_and_norm_rescale(ad):
    from fewstep.models.tokens import pack_latents

    cond, uncond = ad.encode_prompts(PROMPTS), ad.encode_prompts(["", ""])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.5, 0.5])
    c = ad.predict_velocity(ad.transformer, x, t, cond)
    assert torch.equal(ad.guided_velocity(ad.transformer, x, t, cond, uncond, 1.0), c)
    assert torch.equal(ad.guided_velocity(ad.transformer, x, t, cond, None, 4.0), c)
    g = ad.guided_velocity(ad.transformer, x, t, cond, uncond, 4.0)
    assert not torch.allclose(g, c)
    # Per 2x2-patch token, the guided velocity keeps the conditional velocity's norm.
    torch.testing.assert_close(pack_latents(g).norm(dim=-1), pack_latents(c).norm(dim=-1))


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sigmas_match_scheduler(ad, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    sig = ad.sigmas(4, shift)
    assert torch.equal(sig, scheduler.sigmas)
    assert sig[0] == 1 and sig[-1] == 0 and bool((sig[1:] < sig[:-1]).all())
    with pytest.raises(ValueError):
        ad.sigmas(0, shift)


def test_prompt_embeds_helpers(ad):
    from fewstep.models.tokens import PromptEmbeds

    a, b = ad.encode_prompts(PROMPTS[:1]), ad.encode_prompts(PROMPTS[1:])
    both = PromptEmbeds.cat([a, b])
    full = ad.encode_prompts(PROMPTS)
    # Batched encoding pads inside the text encoder: equal up to float32 rounding.
    torch.testing.assert_close(both.embeds, full.embeds, rtol=1e-4, atol=1e-5)
    assert torch.equal(both.mask, full.mask)
    assert torch.equal(both[0].trimmed().embeds, a.embeds)
    assert len(both.repeat(3)) == 6
