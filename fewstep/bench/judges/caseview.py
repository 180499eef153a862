"""What a judge reads from a bench case (``fewstep.bench.benches.BenchCase``), in one place."""

from __future__ import annotations

from typing import Any


def case_category(case: Any) -> str:
    return str(case.category)


def case_text(case: Any) -> str:
    """The T2I prompt or the edit instruction."""
    return str(case.prompt)


def case_task(case: Any) -> str:
    return str(case.task)


def case_meta(case: Any) -> dict[str, Any]:
    return dict(case.meta)


def case_id(case: Any) -> str:
    return str(case.id)
