"""Task mixture: serve T2I and edit samples at a configured ratio within a fixed budget.

A batch holds one task (edit samples carry source latents that T2I samples lack, so a
mixed batch would need two forward passes anyway). The plan decides, batch by batch, which
task comes next so that the cumulative sample counts track the ratio as closely as whole
batches allow (a Bresenham schedule: after every batch the edit share is the closest
achievable to the target). Over a budget of ``N`` batches the achieved counts differ from
the exact ratio by less than one batch.

:class:`MixtureSampler` draws the batches from per-task row iterators (restarting a source
when it runs out, i.e. a new epoch of that task) and reports what it served.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pydantic import Field, field_validator

from fewstep.config import StrictModel


class MixtureError(ValueError):
    """A mixture that cannot be served (bad ratio, a task with no data)."""


class MixtureConfig(StrictModel):
    """T2I:edit ratio, e.g. ``{t2i: 7, edit: 3}``; a task with weight 0 is never served."""

    ratio: dict[str, float] = Field(default_factory=lambda: {"t2i": 1.0, "edit": 0.0})

    @field_validator("ratio")
    @classmethod
    def _check(cls, ratio: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(ratio) - {"t2i", "edit"})
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}: use t2i and edit")
        if any(v < 0 or not math.isfinite(v) for v in ratio.values()):
            raise ValueError(f"weights must be finite and >= 0, got {ratio}")
        if sum(ratio.values()) <= 0:
            raise ValueError("at least one task needs a positive weight, e.g. {t2i: 9, edit: 1}")
        return ratio

    def fractions(self) -> dict[str, float]:
        total = sum(self.ratio.values())
        return {task: w / total for task, w in self.ratio.items() if w > 0}


class MixturePlan:
    """Which task each batch serves, for ``num_batches`` batches of ``batch_size`` samples."""

    def __init__(self, fractions: dict[str, float], num_batches: int, batch_size: int):
        if num_batches < 1 or batch_size < 1:
            raise MixtureError(f"budget must be >= 1 batch of >= 1 sample, got {num_batches}x{batch_size}")
        self.fractions = {t: f for t, f in fractions.items() if f > 0}
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.tasks = self._schedule()

    def _schedule(self) -> list[str]:
        served = dict.fromkeys(self.fractions, 0)
        order = sorted(self.fractions)  # deterministic tie-break
        tasks = []
        for i in range(1, self.num_batches + 1):
            # Largest deficit against the target after i batches goes next.
            task = max(order, key=lambda t: (self.fractions[t] * i - served[t], self.fractions[t]))
            served[task] += 1
            tasks.append(task)
        return tasks

    def counts(self, upto: int | None = None) -> dict[str, int]:
        """Samples per task over the first ``upto`` batches (all by default)."""
        upto = self.num_batches if upto is None else upto
        counts = dict.fromkeys(self.fractions, 0)
        for task in self.tasks[:upto]:
            counts[task] += self.batch_size
        return counts

    def task_at(self, step: int) -> str:
        return self.tasks[step]


def achieved_ratio(counts: dict[str, int]) -> dict[str, float]:
    """Share of samples per task, e.g. ``{'t2i': 0.7, 'edit': 0.3}``."""
    total = sum(counts.values())
    return {t: (c / total if total else 0.0) for t, c in counts.items()}


def format_ratio(counts: dict[str, int]) -> str:
    """``'t2i:edit = 7.0:3.0 (70/30 samples)'`` style, in tenths."""
    shares = achieved_ratio(counts)
    tasks = [t for t in ("t2i", "edit") if t in counts] + [t for t in counts if t not in ("t2i", "edit")]
    ratio = ":".join(f"{10 * shares[t]:.1f}" for t in tasks)
    return f"{':'.join(tasks)} = {ratio} ({'/'.join(str(counts[t]) for t in tasks)} samples)"


class MixtureSampler:
    """Draw whole-task batches from per-task sources following a :class:`MixturePlan`.

    ``sources`` maps a task to a zero-argument callable that returns a fresh iterator of
    rows (called again when the previous one is exhausted: a new epoch of that task).
    ``collate`` turns a list of rows into a batch. ``start`` resumes a plan mid-way (after a
    restart from a checkpoint), so the served ratio does not drift across restarts.
    """

    def __init__(
        self,
        plan: MixturePlan,
        sources: dict[str, Callable[[], Iterable[Any]]],
        collate: Callable[[list[Any]], Any] = list,
        start: int = 0,
    ):
        missing = sorted(set(plan.fractions) - set(sources))
        if missing:
            raise MixtureError(
                f"the mixture serves {missing} but the dataset has no rows of that task; "
                f"set its weight to 0 in mixture.ratio or add such data"
            )
        self.plan = plan
        self.sources = sources
        self.collate = collate
        self.step = start
        self.served = plan.counts(upto=start)
        self.epochs = dict.fromkeys(plan.fractions, 0)
        self._iters: dict[str, Iterator[Any]] = {}

    def _take(self, task: str, n: int) -> list[Any]:
        rows: list[Any] = []
        empty_restarts = 0
        while len(rows) < n:
            it = self._iters.get(task)
            if it is None:
                it = self._iters[task] = iter(self.sources[task]())
                self.epochs[task] += 1
            chunk = list(itertools.islice(it, n - len(rows)))
            if len(chunk) < n - len(rows):
                self._iters.pop(task)  # exhausted: next call restarts the source
                if not chunk and not rows:
                    empty_restarts += 1
                    if empty_restarts > 1:
                        raise MixtureError(f"task {task!r}: the source yields no rows")
            rows.extend(chunk)
        return rows

    def __iter__(self) -> MixtureSampler:
        return self

    def __next__(self) -> tuple[str, Any]:
        if self.step >= self.plan.num_batches:
            raise StopIteration
        task = self.plan.task_at(self.step)
        rows = self._take(task, self.plan.batch_size)
        self.step += 1
        self.served[task] += len(rows)
        return task, self.collate(rows)

    def report(self) -> dict[str, Any]:
        """What was served so far: counts, achieved shares, target shares, epochs per task."""
        return {
            "served": dict(self.served),
            "achieved": achieved_ratio(self.served),
            "target": dict(self.plan.fractions),
            "epochs": dict(self.epochs),
            "text": format_ratio(self.served),
        }
