"""``fewstep corpus ...``."""

from __future__ import annotations

import typer

corpus_app = typer.Typer(help="Build raw T2I and edit corpora from real data on this machine.",
                         no_args_is_help=True)
