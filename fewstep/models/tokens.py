"""Conditioning and latent layout shared by every stage: prompt embeddings with their mask,
and the pipelines' 2x2 packing of latents into transformer tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PromptEmbeds", "pack_latents", "unpack_latents"]


@dataclass
class PromptEmbeds:
    """Text-encoder hidden states after the template tokens; ``mask`` is 1 on valid tokens."""

    embeds: torch.Tensor  # [B, L, D]
    mask: torch.Tensor  # [B, L] long

    def __len__(self) -> int:
        return int(self.embeds.shape[0])

    def to(self, device=None, dtype=None) -> PromptEmbeds:
        return PromptEmbeds(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device))

    def __getitem__(self, index) -> PromptEmbeds:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return PromptEmbeds(self.embeds[index], self.mask[index])

    def trimmed(self) -> PromptEmbeds:
        """Drop padding columns no row uses (shorter sequences, same result)."""
        length = max(int(self.mask.sum(dim=1).max()), 1)
        return PromptEmbeds(self.embeds[:, :length], self.mask[:, :length])

    def repeat(self, n: int) -> PromptEmbeds:
        """Each row ``n`` times in a row (like the pipelines' ``num_images_per_prompt``)."""
        return PromptEmbeds(self.embeds.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    @staticmethod
    def cat(items: Sequence[PromptEmbeds]) -> PromptEmbeds:
        """Concatenate along the batch, zero-padding to the longest sequence."""
        length = max(int(p.embeds.shape[1]) for p in items)
        embeds, masks = [], []
        for p in items:
            pad = length - p.embeds.shape[1]
            embeds.append(torch.nn.functional.pad(p.embeds, (0, 0, 0, pad)))
            masks.append(torch.nn.functional.pad(p.mask, (0, pad)))
        return PromptEmbeds(torch.cat(embeds), torch.cat(masks))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C] tokens of 2x2 latent patches (the pipelines' packing)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even to pack 2x2 patches, got {h}x{w}")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent grid of ``h`` x ``w``."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, h, w)
