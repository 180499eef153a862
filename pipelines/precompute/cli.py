"""``fewstep precompute``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `precompute` command to the main app."""
