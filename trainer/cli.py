"""``fewstep train-teacher``, ``distill``, ``eval``, ``demo``: wiring only."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from trainer.cli_distill import register as register_distill
    from trainer.cli_teacher import register as register_teacher

    register_teacher(app)
    register_distill(app)
