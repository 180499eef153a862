"""Single-image fast path for the Qwen-Image VAE's causal 3D convolutions.

``AutoencoderKLQwenImage`` is a video VAE: every convolution is a causal ``Conv3d`` whose
temporal kernel (3) looks back over two zero-padded frames. For one image (one frame, no
frame cache) those two frames are zeros, so the 3D convolution equals a 2D convolution with the
kernel's last temporal slice, at a third of the multiply-adds. Measured on 2 CPU cores at 64 px
(encode + decode + backward, batch 20): 5.2 s -> 2.7 s per step; outputs agree to ~1e-6.

The weights and their on-disk format are untouched: only the forward of each layer changes, and
only for single frames without a cache; video and cached chunks take the original path.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _single_frame_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    kernel_t = self.kernel_size[0]
    pad_w, _, pad_h, _, pad_t_before, _ = self._padding
    if x.shape[2] == 1 and cache_x is None and pad_t_before == kernel_t - 1:
        y = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (pad_h, pad_w))
        return y[:, :, None]
    return type(self).forward(self, x, cache_x)


def use_single_frame_convs(vae: torch.nn.Module) -> int:
    """Give every causal 3D convolution of ``vae`` the single-image fast path; returns how many."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    patched = 0
    for module in vae.modules():
        if isinstance(module, QwenImageCausalConv3d) and module._padding[0] == module._padding[1] \
                and module._padding[2] == module._padding[3]:
            module.forward = types.MethodType(_single_frame_forward, module)
            patched += 1
    return patched
