"""Rebalance kept rows to the composition spec: targets per task and category, then a seeded sample.

Targets: a task gets its ``count``, or a ``weight`` share of ``total`` minus the counted tasks
(largest-remainder rounding, so shares add up exactly); a task whose categories all have counts
gets their sum. Inside a task, categories get their counts, then weight shares of the rest.
Without ``total``, the largest total whose split the data can fill is used.

Sampling: per (task, category), rows in input order, a numpy generator seeded by
(seed, task, category). Enough rows: a sample without replacement. Too few: all of them, plus,
with ``replace``, repeats drawn uniformly to reach the target (repeats get ids ``<id>#rep<k>``;
``origin_id`` keeps the raw id); without it the category falls short and is reported.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np

from pipelines.curate.config import CompositionConfig, Share


class CompositionError(ValueError):
    """A composition spec that cannot be met by construction (not by the data)."""


def largest_remainder(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` by ``weights`` into integers that sum to ``total`` (ties: name order)."""
    positive = {k: w for k, w in weights.items() if w > 0}
    out = dict.fromkeys(weights, 0)
    if total <= 0 or not positive:
        return out
    scale = sum(positive.values())
    exact = {k: total * w / scale for k, w in positive.items()}
    for k, v in exact.items():
        out[k] = int(np.floor(v + 1e-9))
    left = total - sum(out.values())
    for k in sorted(positive, key=lambda k: (-(exact[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def _split(total: int, shares: dict[str, Share], where: str) -> dict[str, int]:
    counts = {k: s.count for k, s in shares.items() if s.count is not None}
    weights = {k: s.weight for k, s in shares.items() if s.weight is not None}
    rest = total - sum(counts.values())
    if rest < 0:
        raise CompositionError(f"{where}: counts {counts} add up to more than {total}: lower them or raise the total")
    if rest > 0 and not any(w > 0 for w in weights.values()):
        raise CompositionError(f"{where}: counts {counts} add up to {sum(counts.values())}, not {total}: "
                               "add a weighted entry or make the counts match")
    return {**counts, **largest_remainder(rest, weights)}


def category_shares(spec: CompositionConfig, task: str, known: dict[str, list[str]]) -> dict[str, Share]:
    task_spec = spec.tasks[task]
    if task_spec.categories:
        return dict(task_spec.categories)
    return {name: Share(weight=1.0) for name in known.get(task, [])}


def plan_targets(spec: CompositionConfig, available: dict[str, dict[str, int]],
                 known: dict[str, list[str]]) -> dict[str, dict[str, int]]:
    """Target row counts per task and category."""
    shares = {task: category_shares(spec, task, known) for task in spec.tasks}
    fixed: dict[str, int] = {}
    weighted: dict[str, float] = {}
    for task, task_spec in spec.tasks.items():
        cats = shares[task]
        if task_spec.count is not None:
            fixed[task] = task_spec.count
        elif cats and all(s.count is not None for s in cats.values()):
            fixed[task] = sum(s.count for s in cats.values()) if task_spec.weight else 0
        else:
            weighted[task] = task_spec.weight or 0.0

    def targets_for(total: int) -> dict[str, dict[str, int]]:
        task_totals = {**fixed, **largest_remainder(total - sum(fixed.values()), weighted)}
        return {task: _split(n, shares[task], f"composition.tasks.{task}.categories")
                for task, n in task_totals.items()}

    if spec.total is not None:
        if spec.total < sum(fixed.values()):
            raise CompositionError(f"composition.total={spec.total} is below the task counts {fixed}")
        return targets_for(spec.total)
    # No total: the largest one whose weighted split fits the available rows.
    def fits(total: int) -> bool:
        targets = targets_for(total)
        return all(n <= available.get(task, {}).get(cat, 0)
                   for task in weighted for cat, n in targets[task].items())

    low, high = sum(fixed.values()), sum(fixed.values()) + sum(sum(c.values()) for c in available.values())
    if not any(w > 0 for w in weighted.values()):
        return targets_for(low)
    while low < high:  # binary search: fits() is monotone in the total for the weighted part
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return targets_for(low)


@dataclass
class Selection:
    copies: dict[int, int] = field(default_factory=dict)  # order -> copies written (1 = no repeat)
    targets: dict[str, dict[str, int]] = field(default_factory=dict)
    available: dict[str, dict[str, int]] = field(default_factory=dict)
    achieved: dict[str, dict[str, int]] = field(default_factory=dict)
    shortfalls: list[dict] = field(default_factory=list)


def _rng(seed: int, task: str, category: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(category.encode())])


def select(rows: list[dict], spec: CompositionConfig | None, known: dict[str, list[str]]) -> Selection:
    """``rows``: kept rows with order, task, category. Returns which rows are written and how often.

    ``spec=None`` keeps every row (targets = what is available).
    """
    groups: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["category"]), []).append(row["order"])
    available: dict[str, dict[str, int]] = {}
    for (task, cat), orders in groups.items():
        orders.sort()
        available.setdefault(task, {})[cat] = len(orders)
    if spec is None:
        targets = {task: dict(cats) for task, cats in available.items()}
        spec = CompositionConfig(tasks={}, seed=0)
    else:
        targets = plan_targets(spec, available, known)
    result = Selection(targets=targets, available=available)
    for task in sorted(set(targets) | set(available)):
        for cat in sorted(set(targets.get(task, {})) | set(available.get(task, {}))):
            target = targets.get(task, {}).get(cat, 0)
            orders = groups.get((task, cat), [])
            rng = _rng(spec.seed, task, cat)
            n = len(orders)
            if target <= n:
                picked = np.sort(rng.permutation(n)[:target])
                for i in picked:
                    result.copies[orders[i]] = 1
                achieved = target
            else:
                for order in orders:
                    result.copies[order] = 1
                achieved = n
                if spec.replace and n > 0:
                    extra = rng.integers(0, n, size=target - n)
                    for i in extra:
                        result.copies[orders[i]] += 1
                    achieved = target
                else:
                    result.shortfalls.append({"task": task, "category": cat, "target": target, "available": n,
                                              "achieved": n, "missing": target - n})
            if target or n:
                result.achieved.setdefault(task, {})[cat] = achieved
    return result
