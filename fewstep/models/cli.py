"""``fewstep models ...``: create and inspect model directories."""

from __future__ import annotations

import typer

app = typer.Typer(help="Create and inspect Qwen-Image style model directories.", no_args_is_help=True)
