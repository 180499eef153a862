"""``fewstep curate`` and ``fewstep precompute``: wiring only."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from pipelines.curate.cli import register as register_curate
    from pipelines.precompute.cli import register as register_precompute

    register_curate(app)
    register_precompute(app)
