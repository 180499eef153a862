"""``fewstep bench ...``."""

from __future__ import annotations

import typer

bench_app = typer.Typer(help="Mini benches and offline judges.", no_args_is_help=True)
