"""``fewstep corpus ...`` and ``fewstep bench ...``."""

from __future__ import annotations

import typer

corpus_app = typer.Typer(help="Build raw T2I and edit corpora from real data on this machine.",
                         no_args_is_help=True)
bench_app = typer.Typer(help="Mini benches and offline judges.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(corpus_app, name="corpus")
    app.add_typer(bench_app, name="bench")
