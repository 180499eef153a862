"""Resolve a bench judge by name and score one case with it (T2I or edit, same call)."""

from __future__ import annotations

import importlib
from typing import Any

from PIL import Image


def load_judge(name: str) -> Any:
    """A :class:`fewstep.bench.judges.base.Judge` by name (``offline`` needs no network).

    ``package.module:Class`` also works, for a judge outside fewstep.
    """
    if ":" in name:
        module_name, _, attr = name.partition(":")
        return getattr(importlib.import_module(module_name), attr)()
    judges = importlib.import_module("fewstep.bench.judges")
    factory = getattr(judges, "load_judge", None) or getattr(judges, "get_judge", None)
    if factory is not None:
        return factory(name)
    if name == "offline":
        from fewstep.bench.judges.offline import OfflineJudge

        return OfflineJudge()
    raise ValueError(f"judge: unknown judge {name!r}; use 'offline' or 'package.module:Class'")


def check_judge(name: str) -> str:
    """``name`` if :func:`load_judge` can load it (``offline``, or an importable
    ``package.module:Class``); a ValueError naming the fix otherwise. Nothing heavy is built."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cannot import {module_name!r} ({exc}); use 'offline' or an importable "
                             "'package.module:Class'") from None
        if not hasattr(module, attr):
            raise ValueError(f"{module_name!r} has no {attr!r}; use 'offline' or 'package.module:Class'")
        return name
    if name != "offline":
        raise ValueError(f"unknown judge {name!r}; use 'offline' or 'package.module:Class'")
    return name


def judge_case(judge: Any, case: Any, image: Image.Image, source: Image.Image | None = None) -> dict[str, Any]:
    """``{"score": 1-5, "verdict": <paper JSON>, "details": {...}}`` for one generated image."""
    if case.task == "edit":
        if source is None:
            source = case.source_image(image.width)
        verdict = judge.judge_edit(case, source, image)
        score = verdict.overall_score
    else:
        verdict = judge.judge_t2i(case, image)
        score = verdict.score
    return {"score": float(score), "verdict": verdict.paper_json(), "details": _plain(verdict.details)}


def _plain(value: Any) -> Any:
    """JSON-safe copy of a verdict's diagnostics (numpy scalars, tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
