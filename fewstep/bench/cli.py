"""``fewstep corpus ...`` and ``fewstep bench ...``: wiring only."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from fewstep.bench.bench_cli import bench_app
    from fewstep.bench.corpus_cli import corpus_app

    app.add_typer(corpus_app, name="corpus")
    app.add_typer(bench_app, name="bench")
