"""Reference sets of real images per category, for the feature-distance quality measure.

A category's reference set is ``n`` world renders drawn with a fixed seed by the corpus sampler
(``fewstep.bench.corpus.sample``), skipping every combination reserved for the benches, so a
bench case's own reference image is never in it (a real held-out image is judged against other
real images, as a generated one is). T2I categories use the scene itself; edit categories use
the edit *targets* (so a style-transfer output is compared with other styled images, not with
plain renders).

Per image we report the ratio of its mean distance to the ``k`` nearest reference features over
the median leave-one-out distance inside the reference set: about 1 for a real image, larger the
further the image is from anything real. Per set we report KID and FID against the reference.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from PIL import Image

from fewstep.bench import world
from fewstep.bench.judges.features import (
    FeatureExtractor,
    frechet_distance,
    kernel_inception_distance,
    knn_distance,
)

REFERENCE_SEED = 424242
DEFAULT_SIZE = 96
K = 3


def reference_images(category: str, n: int = DEFAULT_SIZE, resolution: int = 64) -> list[Image.Image]:
    """``n`` real renders of ``category`` (a T2I category, or ``edit:<category>`` for edit targets)."""
    from fewstep.bench.corpus import sample

    edit = category.startswith("edit:")
    name = category.split(":", 1)[1] if edit else category
    if name not in (world.EDIT_CATEGORIES if edit else world.T2I_CATEGORIES):
        raise ValueError(f"reference category {category!r} is unknown")
    rng = np.random.default_rng([REFERENCE_SEED, hash_category(category)])
    images: list[Image.Image] = []
    tries = 0
    while len(images) < n:
        tries += 1
        if tries > 50 * n:
            raise RuntimeError(f"could not draw {n} non-reserved renders for {category}")
        if edit:
            meta = sample.sample_edit(name, rng, resolution)
            if world.is_reserved(world.edit_key(meta)):
                continue
            images.append(world.render_t2i(meta["target"], resolution))
        else:
            attrs = sample.sample_scene(name, rng)
            if world.is_reserved(world.combo_key(attrs)):
                continue
            images.append(world.render_t2i(attrs, resolution))
    return images


def hash_category(category: str) -> int:
    return sum((i + 1) * ord(ch) for i, ch in enumerate(category))


@dataclass
class ReferenceSet:
    category: str
    features: np.ndarray
    loo_median: float  # median leave-one-out kNN distance inside the set

    def distance_ratio(self, feats: np.ndarray) -> np.ndarray:
        return knn_distance(feats, self.features, k=K) / self.loo_median

    def set_distances(self, feats: np.ndarray) -> dict[str, float]:
        if len(feats) < 2:
            return {}
        return {"kid": round(kernel_inception_distance(feats, self.features), 5),
                "fid": round(frechet_distance(feats, self.features), 3),
                "n": int(len(feats)), "n_reference": int(len(self.features))}


class ReferenceBank:
    """Lazily computed, cached reference sets (one per category and resolution)."""

    def __init__(self, extractor: FeatureExtractor, size: int = DEFAULT_SIZE) -> None:
        self.extractor = extractor
        self.size = size
        self._sets: dict[tuple[str, int], ReferenceSet] = {}
        self._lock = threading.Lock()

    def get(self, category: str, resolution: int = 64) -> ReferenceSet:
        key = (category, resolution)
        with self._lock:
            if key not in self._sets:
                feats = self.extractor(reference_images(category, self.size, resolution))
                loo = knn_distance(feats, feats, k=K, exclude_self=True)
                self._sets[key] = ReferenceSet(category, feats, float(np.median(loo)))
            return self._sets[key]
