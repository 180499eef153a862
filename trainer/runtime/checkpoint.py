"""Checkpoints: what goes into one, and the two stores (Ray Train's, and a plain folder store).

A checkpoint directory holds, per rank (Ray Train merges the ranks' directories)::

    models/<name>/...            DeepSpeed engine files (each rank its partitions) or torch_state.pt
    objective.pt                 the objective's state_dict (rank 0)
    objective-rank<r>.pt         the objective's own state of that rank, if any (e.g. buffered rows)
    position-rank<r>.json        step, epoch, batch within the epoch, samples seen
    rng-rank<r>.pt               the step generator and torch's RNG of that rank
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fewstep import storage
from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"  # written last by the folder store; a checkpoint without it is ignored


@dataclass
class Position:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of ``epoch`` already consumed
    samples: int = 0  # rows seen by this rank


def write_checkpoint(directory: Path, *, rank: int, handles: dict, objective_state: dict[str, Any],
                     position: Position, generator: torch.Generator,
                     rank_state: dict[str, Any] | None = None) -> None:
    """Fill ``directory`` with this rank's part of a checkpoint (collective: all ranks call it)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, handle in handles.items():
        if not handle.trainable:
            continue
        if getattr(handle, "replicated", False) and rank != 0:
            continue  # DDP replicas are identical; rank 0's copy is the checkpoint
        handle.save(directory / "models" / name)
    if rank == 0:
        torch.save(objective_state, directory / "objective.pt")
    if rank_state:
        torch.save(rank_state, directory / f"objective-rank{rank}.pt")
    (directory / f"position-rank{rank}.json").write_text(json.dumps(asdict(position)))
    torch.save({"generator": generator.get_state(), "torch": torch.get_rng_state()},
               directory / f"rng-rank{rank}.pt")


def read_checkpoint(directory: Path, *, rank: int, handles: dict,
                    generator: torch.Generator) -> tuple[Position, dict[str, Any], dict[str, Any]]:
    """Restore models and RNG from ``directory``; returns the position, the objective state and
    this rank's own objective state (empty when the run had another world size)."""
    for name, handle in handles.items():
        if handle.trainable:
            handle.load(directory / "models" / name)
    position_file = directory / f"position-rank{rank}.json"
    if not position_file.exists():
        # A different world size than the one that wrote it: fall back to rank 0's position.
        position_file = directory / "position-rank0.json"
    position = Position(**json.loads(position_file.read_text()))
    rng_file = directory / f"rng-rank{rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=False)
        generator.set_state(rng["generator"])
        torch.set_rng_state(rng["torch"])
    objective_file = directory / "objective.pt"
    objective_state = torch.load(objective_file, weights_only=False) if objective_file.exists() else {}
    rank_file = directory / f"objective-rank{rank}.pt"
    same_world = (directory / f"position-rank{rank}.json").exists()
    rank_state = torch.load(rank_file, weights_only=False) if rank_file.exists() and same_world else {}
    return position, objective_state, rank_state


class RayStore:
    """Ray Train persists checkpoints under ``RunConfig.storage_path`` and hands back the latest."""

    def __init__(self) -> None:
        import ray.train

        self.train = ray.train

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        checkpoint = self.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as directory:
            yield Path(directory)

    def report(self, metrics: dict[str, Any], directory: Path | None, step: int) -> None:
        checkpoint = None
        if directory is not None:
            checkpoint = self.train.Checkpoint.from_directory(str(directory))
        self.train.report(metrics, checkpoint=checkpoint,
                          checkpoint_dir_name=f"step-{step:08d}" if checkpoint else None)


class FolderStore:
    """The local launcher's store: ``<run>/checkpoints/step-XXXXXXXX/`` (local or s3://)."""

    def __init__(self, root_uri: str, options: StorageOptions | None, keep: int, work_dir: Path):
        self.root = root_uri
        self.options = options
        self.keep = keep
        self.work_dir = work_dir

    def _complete_steps(self) -> list[int]:
        steps = []
        for uri in storage.list_files(self.root, COMPLETE, self.options):
            match = re.search(r"step-(\d+)[/\\]" + COMPLETE + "$", uri)
            if match:
                steps.append(int(match.group(1)))
        return sorted(steps)

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        steps = self._complete_steps()
        if not steps:
            yield None
            return
        uri = storage.join(self.root, f"step-{steps[-1]:08d}")
        if not storage.is_s3(uri):
            yield Path(uri)
            return
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            yield storage.download_dir(uri, Path(tmp) / "ckpt", self.options)

    def report(self, metrics: dict[str, Any], directory: Path | None, step: int) -> None:
        if directory is None:
            return
        uri = storage.join(self.root, f"step-{step:08d}")
        if storage.is_s3(uri):
            fs, path = storage.resolve(uri, self.options)
            fs.put(str(directory).rstrip("/") + "/", path, recursive=True)
        else:
            target = Path(uri)
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(directory, target)
        storage.write_bytes_atomic(storage.join(uri, COMPLETE), b"%d\n" % step, self.options)
        log.info("checkpoint step %d -> %s", step, uri)
        for old in self._complete_steps()[:-self.keep]:
            storage.delete(storage.join(self.root, f"step-{old:08d}"), self.options, recursive=True)
