"""``fewstep train-teacher``, ``fewstep distill``, ``fewstep eval``, ``fewstep demo``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this package's commands to the main app."""
