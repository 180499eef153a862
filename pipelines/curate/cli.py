"""``fewstep curate``."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `curate` command to the main app."""
