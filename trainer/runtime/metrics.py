"""Metrics of a run: ``<run>/metrics.jsonl`` (one JSON object per logged step) and progress.

Only rank 0 writes. On a local run folder lines are appended as they come; on S3 the file is
kept in the worker's scratch folder and uploaded at each checkpoint and at the end. After a
resume, lines past the restored step are dropped, so every step appears at most once.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from fewstep import storage
from fewstep.storage import StorageOptions

METRICS_NAME = "metrics.jsonl"
DEFAULT_PROGRESS_KEYS = ("loss", "samples_per_s")  # beside the bar, unless an objective names others


class MetricsLog:
    def __init__(self, run_uri: str, options: StorageOptions | None, work_dir: Path,
                 resume_step: int) -> None:
        self.uri = storage.join(run_uri, METRICS_NAME)
        self.options = options
        self.remote = storage.is_s3(self.uri)
        self.path = work_dir / METRICS_NAME if self.remote else Path(self.uri)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        previous: list[str] = []
        if self.remote and storage.exists(self.uri, options):
            previous = storage.read_bytes(self.uri, options).decode("utf-8").splitlines()
        elif not self.remote and self.path.exists():
            previous = self.path.read_text().splitlines()
        # A run restarting from scratch (no checkpoint) logs its step-0 record again: keep nothing.
        kept = [line for line in previous if line.strip() and resume_step > 0 and _step_of(line) <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self._handle = self.path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True, default=_jsonable) + "\n")

    def flush(self) -> None:
        self._handle.flush()
        if self.remote:
            storage.upload_file_atomic(self.path, self.uri, self.options)

    def close(self) -> None:
        self.flush()
        self._handle.close()


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # unreadable line: drop it


def _jsonable(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def read_metrics(uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """All records of a run's ``metrics.jsonl`` (``uri``: the run folder)."""
    target = storage.join(uri, METRICS_NAME)
    text = storage.read_bytes(target, options).decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Progress:
    """A tqdm bar on rank 0 showing the step, the loss and samples/s; silent elsewhere."""

    def __init__(self, enabled: bool, total: int, initial: int, description: str,
                 keys: tuple[str, ...] = DEFAULT_PROGRESS_KEYS) -> None:
        self.bar = None
        self.keys = keys
        self._latest: dict[str, Any] = {}  # metrics logged only some steps stay shown
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=description, file=sys.stderr,
                            mininterval=2.0, dynamic_ncols=True, unit="step")
        self._last = time.monotonic()

    def update(self, steps: int, metrics: dict[str, Any] | None = None) -> None:
        if self.bar is None:
            return
        self.bar.update(steps)
        if metrics:
            self._latest.update(metrics)
            shown = {k: f"{self._latest[k]:.4g}" for k in self.keys
                     if isinstance(self._latest.get(k), float) and math.isfinite(self._latest[k])}
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsFollower:
    """Driver-side progress for the Ray launcher: follows ``<run>/metrics.jsonl`` in a thread.

    Ray workers' output does not reach the driver's terminal, so the driver shows the bar
    from what rank 0 writes (each logged step on a local run folder; each checkpoint on S3).
    ``keys`` are the metrics shown beside the bar, each at its latest logged value (a DMD run's
    ``val_score`` is logged only on validation steps and stays shown between them).
    """

    def __init__(self, run_uri: str, options: StorageOptions | None, total: int, description: str,
                 interval_s: float = 2.0, keys: tuple[str, ...] = DEFAULT_PROGRESS_KEYS) -> None:
        import threading

        self.uri = storage.join(run_uri, METRICS_NAME)
        self.options = options
        self.interval_s = interval_s
        self.progress = Progress(True, total, 0, description, keys)
        self._shown = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="metrics-follower", daemon=True)

    def __enter__(self) -> MetricsFollower:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._poll()
        self.progress.close()

    def _poll(self) -> None:
        try:
            if not storage.exists(self.uri, self.options):
                return
            lines = storage.read_bytes(self.uri, self.options).decode("utf-8").splitlines()
        except (OSError, ValueError):
            return  # a file being replaced; the next poll reads it
        records = [json.loads(line) for line in lines[-50:] if line.strip().startswith("{")]
        if not records:
            return
        step = int(records[-1].get("step", 0))
        if step > self._shown:
            # Every record since the last poll, oldest first: Progress keeps each key's latest value.
            merged: dict[str, Any] = {}
            for record in records:
                if int(record.get("step", 0)) > self._shown:
                    merged.update(record)
            self.progress.update(step - self._shown, merged)
            self._shown = step

    def _follow(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()
