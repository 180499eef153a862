"""Image checks and normalisation: header first (size, aspect, bombs), then decode, then RGB PNG.

Order matters: width and height come from the header (``Image.open`` reads only that), so a
decompression bomb is rejected before a single pixel is decoded. Accepted images are normalised,
not rejected, when merely odd: EXIF rotation applied, CMYK / palette / 16-bit / alpha converted to
RGB (alpha composited on white), first frame of animations, re-encoded as PNG. Exact duplicates
are keyed by the decoded pixels (so a re-encoded copy still matches), near duplicates by a 64-bit
DCT perceptual hash.
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipelines.curate.config import ImageFilterConfig

STAGE = "image"


@dataclass
class Decoded:
    png: bytes
    sha: str
    phash: int
    thumb: bytes
    size: tuple[int, int]


class ImageReject(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-f]+>")


def _message(exc: Exception) -> str:
    """Exception text without object addresses, so the same bytes give the same detail."""
    return f"{type(exc).__name__}: {_OBJECT_REPR.sub('<bytes>', str(exc))}"


def looks_truncated(data: bytes) -> bool:
    """Structural end-of-data checks for the common formats (used only once decoding failed)."""
    if data.startswith(b"\x89PNG"):
        return not data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    if data.startswith(b"\xff\xd8"):
        return b"\xff\xd9" not in data[-64:]
    if data.startswith(b"RIFF") and len(data) >= 8:
        return struct.unpack("<I", data[4:8])[0] + 8 > len(data)
    return False


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(img)
        if img.mode.startswith("I;16"):
            array = (array.astype(np.uint32) >> 8).astype(np.uint8)
        else:
            # 32-bit int / float: stretch the used range to 8 bits.
            array = array.astype(np.float64)
            low, high = float(array.min()), float(array.max())
            scale = 255.0 / (high - low) if high > low else 0.0
            array = ((array - low) * scale).round().astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if img.mode != "RGB":
        img = img.convert("RGB")  # CMYK (Adobe inversion handled by the JPEG decoder), L, 1, YCbCr, ...
    return img


_DCT = None


def _dct_matrix(n: int = 32) -> np.ndarray:
    global _DCT
    if _DCT is None:
        k = np.arange(n)[:, None]
        x = np.arange(n)[None, :]
        _DCT = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
        _DCT[0] /= np.sqrt(2.0)
    return _DCT


def phash(img: Image.Image) -> int:
    """64-bit DCT perceptual hash (signed int64 so it fits an Arrow int64 column)."""
    gray = np.asarray(img.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    dct = _dct_matrix()
    low = (dct @ gray @ dct.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return int.from_bytes(value.to_bytes(8, "big"), "big", signed=True)


def hamming(a: int, b: int) -> int:
    return ((a ^ b) & 0xFFFFFFFFFFFFFFFF).bit_count()


THUMB_SIDE = 8


def thumbnail(img: Image.Image) -> bytes:
    """8x8 RGB box-filtered thumbnail (192 bytes).

    The DCT hash is grayscale and coarse: two small subjects at the same place on flat
    backgrounds of similar luminance hash alike. A near duplicate must also match this
    colour thumbnail cell by cell (see ``thumb_distance``).
    """
    return np.asarray(img.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.uint8).tobytes()


def thumb_distance(a: bytes, b: bytes) -> int:
    """Largest per-cell, per-channel difference of two thumbnails (0..255)."""
    return int(np.abs(np.frombuffer(a, np.uint8).astype(np.int16) - np.frombuffer(b, np.uint8)).max())


def decode_image(data: bytes | None, limits: ImageFilterConfig) -> Decoded:
    """Check and normalise one encoded image; raises ImageReject with the contract reason."""
    if data is None or len(data) == 0:
        raise ImageReject("image_empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageReject("too_many_pixels", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        reason = "image_truncated" if looks_truncated(data) else "image_undecodable"
        raise ImageReject(reason, _message(exc)) from None
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageReject("too_many_pixels", f"{width}x{height} = {width * height} px > {limits.max_pixels}")
    if width <= 0 or height <= 0:
        raise ImageReject("image_undecodable", f"header says {width}x{height}")
    if min(width, height) < limits.min_side:
        raise ImageReject("image_too_small", f"{width}x{height}, shorter side < {limits.min_side}")
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageReject("aspect_ratio", f"{width}x{height}, ratio {ratio:.2f} > {limits.max_aspect_ratio}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            rgb = to_rgb(img)
    except Image.DecompressionBombError as exc:
        raise ImageReject("too_many_pixels", str(exc)) from None
    except (OSError, ValueError, SyntaxError, struct.error, EOFError) as exc:
        truncated = "truncat" in str(exc).lower() or looks_truncated(data)
        raise ImageReject("image_truncated" if truncated else "image_undecodable", _message(exc)) from None
    pixels = np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))
    sha = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + pixels.tobytes()).hexdigest()
    out = io.BytesIO()
    rgb.save(out, format="PNG", compress_level=3)
    return Decoded(png=out.getvalue(), sha=sha, phash=phash(rgb), thumb=thumbnail(rgb), size=rgb.size)


def check_images(row: dict, limits: ImageFilterConfig, identical_pair: bool) -> dict:
    """The image operator on one working row (kept rows only)."""
    from pipelines.curate.records import reject

    try:
        if row["task"] == "edit":
            source = decode_image(row["source_image"], limits)
            row["source_image"], row["source_sha"] = source.png, source.sha
            row["source_phash"], row["source_thumb"] = source.phash, source.thumb
        if row["image"] is not None:
            target = decode_image(row["image"], limits)
            row["image"], row["image_sha"] = target.png, target.sha
            row["image_phash"], row["image_thumb"] = target.phash, target.thumb
    except ImageReject as exc:
        which = "source_image" if row["task"] == "edit" and row["source_sha"] is None else "image"
        return reject(row, STAGE, exc.reason, f"{which}: {exc.detail}")
    if identical_pair and row["task"] == "edit" and row["image_sha"] is not None \
            and row["image_sha"] == row["source_sha"]:
        return reject(row, STAGE, "edit_identical_pair", "source and target decode to the same pixels")
    return row
