"""Residual noise on flat regions: the typical artefact of a 4-step sampler.

A few-step student often leaves grain on areas that should be flat (sky, plain backgrounds).
We estimate the noise standard deviation with Immerkaer's operator (Fast Noise Variance
Estimation, CVIU 1996): the 3x3 kernel below cancels constant and linear image content, so on
a flat patch its response is noise only, and ``sigma = sqrt(pi / 2) / 6 * mean(|response|)``.

Edges also respond. To keep only flat regions we split the image into blocks, estimate sigma
per block and report a low percentile of the blocks (default 25th): an image whose flattest
quarter is still grainy is noisy; an image with clean flat areas scores near zero whatever its
edges do. Units: 0-255 intensity levels, averaged over RGB. Works at any size (blocks scale
with the image; images under 8 px on a side give 0 with ``flat_fraction`` 0).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def _response(channel: np.ndarray) -> np.ndarray:
    """|channel * kernel| on the interior (valid convolution), without scipy."""
    h, w = channel.shape
    out = np.zeros((h - 2, w - 2))
    for dy in range(3):
        for dx in range(3):
            out += _KERNEL[dy, dx] * channel[dy : dy + h - 2, dx : dx + w - 2]
    return np.abs(out)


def residual_noise(image: Image.Image, percentile: float = 25.0, blocks: int = 8) -> float:
    """Estimated noise sigma (0-255 levels) of the flattest blocks of ``image``."""
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    h, w = array.shape[:2]
    if min(h, w) < 8:
        return 0.0
    response = np.mean([_response(array[:, :, c]) for c in range(3)], axis=0)
    block = max(3, min(h, w) // blocks)
    rh, rw = response.shape
    estimates = []
    for y in range(0, rh - block + 1, block):
        for x in range(0, rw - block + 1, block):
            estimates.append(response[y : y + block, x : x + block].mean())
    scale = math.sqrt(math.pi / 2.0) / 6.0
    return float(np.percentile(np.asarray(estimates) * scale, percentile))
