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
from typing import Any, Literal

from pydantic import Field, field_validator

from fewstep.config import StrictModel, parse_ratio


class MixtureError(ValueError):
    """A mixture that cannot be served (bad ratio, a task with no data)."""


class MixtureConfig(StrictModel):
    """T2I:edit ratio, ``'7:3'`` or ``{t2i: 7, edit: 3}``; a task with weight 0 is never served."""

    ratio: dict[str, float] = Field(default_factory=lambda: {"t2i": 1.0, "edit": 0.0})
    counts_from: Literal["run", "resume"] = Field(
        "run", description="'run': the served counts carry over a resume, so the ratio holds over "
        "the whole run (a resumed run with a new ratio steers the cumulative counts towards it); "
        "'resume': a resumed run counts afresh, so a phase with a new ratio serves it from its first step.")

    @field_validator("ratio", mode="before")
    @classmethod
    def _parse(cls, ratio: Any) -> Any:
        return parse_ratio(ratio)

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


def next_tasks(fractions: dict[str, float], served: dict[str, int], slots: int) -> list[str]:
    """Tasks of the next ``slots`` batches: each goes to the task furthest below its target share
    (the rule :class:`MixturePlan` applies one batch at a time)."""
    counts = {t: served.get(t, 0) for t in fractions}
    total = sum(counts.values())
    order = sorted(fractions)
    out = []
    for i in range(1, slots + 1):
        task = max(order, key=lambda t: (fractions[t] * (total + i) - counts[t], fractions[t]))
        counts[task] += 1
        out.append(task)
    return out


class MixtureScheduler:
    """The mixture across ranks: every step serves one whole-task batch per rank (``slots``).

    ``assign`` is given, per rank, the tasks that rank has a full batch of, and returns one task
    per rank so that the global batch counts follow the ratio exactly when the ranks' data allow
    it (``strict``); otherwise (a rank whose data stream holds only one task, e.g. a dataset
    sorted by task and split by position) the closest assignment the data allows, which the
    served counts then report. Every rank computes the same answer from the same inputs.
    """

    def __init__(self, fractions: dict[str, float], slots: int, served: dict[str, int] | None = None):
        self.fractions = {t: f for t, f in fractions.items() if f > 0}
        if not self.fractions:
            raise MixtureError("the mixture serves no task; give one a positive weight")
        self.slots = slots
        self.served = {t: int((served or {}).get(t, 0)) for t in self.fractions}
        self.off_target_steps = 0

    def assign(self, ready: list[set[str]], strict: bool = True) -> list[str] | None:
        if len(ready) != self.slots:
            raise MixtureError(f"got readiness of {len(ready)} ranks for {self.slots} slots")
        ready = [r & set(self.fractions) for r in ready]
        need: dict[str, int] = {}
        for task in next_tasks(self.fractions, self.served, self.slots):
            need[task] = need.get(task, 0) + 1
        out: list[str | None] = [None] * self.slots
        # Ranks with fewer options choose first; each takes the needed task it can serve.
        for rank in sorted(range(self.slots), key=lambda r: (len(ready[r]), r)):
            options = sorted(ready[rank], key=lambda t: (-need.get(t, 0), t))
            if options and need.get(options[0], 0) > 0:
                out[rank] = options[0]
                need[options[0]] -= 1
        if all(t is not None for t in out):
            return out  # type: ignore[return-value]
        if strict or any(not r for r in ready):
            return None
        for rank in range(self.slots):  # relaxed: any task the rank has, most-behind first
            if out[rank] is None:
                deficit = {t: self.fractions[t] * (sum(self.served.values()) + 1) - self.served[t]
                           for t in ready[rank]}
                out[rank] = max(sorted(deficit), key=lambda t: deficit[t])
        return out  # type: ignore[return-value]

    def commit(self, tasks: list[str], on_target: bool = True) -> None:
        for task in tasks:
            self.served[task] += 1
        if not on_target:
            self.off_target_steps += 1

    def shares(self) -> dict[str, float]:
        return achieved_ratio(self.served)


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
