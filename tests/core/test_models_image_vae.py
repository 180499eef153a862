"""The single-image VAE fast path computes what diffusers' causal Conv3d computes."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from fewstep.models.image_vae import use_single_frame_convs
from fewstep.models.tiny import build_components, load_tiny_config

REPO_ROOT = Path(__file__).resolve().parents[2]


def _vaes():
    cfg = load_tiny_config(REPO_ROOT / "configs" / "models" / "teacher.yaml")
    reference = build_components(cfg, seed=0)["vae"].eval()
    fast = copy.deepcopy(reference)
    assert use_single_frame_convs(fast) > 0
    return reference, fast


def test_single_image_encode_decode_and_gradients_match_diffusers():
    reference, fast = _vaes()
    images = torch.rand(3, 3, 1, 64, 64) * 2 - 1
    outputs, grads = [], []
    for vae in (reference, fast):
        vae.zero_grad()
        latents = vae.encode(images).latent_dist.mean
        decoded = vae.decode(latents).sample
        decoded.square().mean().backward()
        outputs.append((latents.detach(), decoded.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in vae.parameters() if p.grad is not None]))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    assert fast.state_dict().keys() == reference.state_dict().keys()


def test_video_input_still_matches():
    # The VAE encodes a video's first frame alone (fast path), then cached chunks (original path).
    reference, fast = _vaes()
    video = torch.rand(1, 3, 5, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = reference.encode(video).latent_dist.mean
        got = fast.encode(video).latent_dist.mean
    assert got.shape == expected.shape and got.shape[2] > 1
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
