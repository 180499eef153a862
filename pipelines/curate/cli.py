"""``fewstep curate``."""

from __future__ import annotations

from pathlib import Path

import typer

HELP = "\n\n".join([
    "Filter, caption, tag and rebalance raw T2I and edit corpora into a curated dataset (Ray Data).",
    "Inputs are Parquet, JSONL/JSON or WebDataset tars (files or directories, local or s3://); each record is "
    "T2I or edit by its columns. A curate output directory is an input too (its manifest's parts): curate it "
    "again to rebalance it to another composition. Every dropped record is written to <output>/rejects/ with "
    "its stage and reason.",
    "Outputs: <output>/curated/part-*.parquet, rejects/, composition.json (target vs achieved counts), "
    "stats/ (Ray Data per-operator stats), manifest.json (written last).",
    "Presets in configs/curate/: default (keep all), landscape, portrait, text, landscape+portrait, mixed, "
    "ratio-9-1, ratio-7-3, ratio-5-5.",
    "Examples:",
    "  fewstep corpus build --out runs/corpus --preset small",
    "  fewstep curate --config configs/curate/ratio-7-3.yaml --input runs/corpus --output runs/curated",
    "  fewstep curate -c configs/curate/mixed.yaml -i runs/corpus/t2i -o s3://bucket/curated "
    "--set composition.tasks.t2i.categories.portrait.count=50",
])


def _parse_sets(values: list[str]) -> dict:
    from fewstep.config import parse_overrides

    return parse_overrides(values)


_PRESETS = Path(__file__).resolve().parents[2] / "configs" / "curate"


def _config_path(value: str) -> str:
    """A YAML path, or a preset name from configs/curate/ (``mixed``, ``ratio-7-3``)."""
    if Path(value).exists() or not (_PRESETS / f"{value}.yaml").exists():
        return value  # an existing file, or a missing one that the loader names
    return str(_PRESETS / f"{value}.yaml")


def register(app: typer.Typer) -> None:
    """Add the `curate` command to the main app."""

    @app.command("curate", help=HELP, no_args_is_help=True)
    def curate(
        config: str = typer.Option(..., "--config", "-c", help="Curate config YAML, or a preset name from configs/curate/ (mixed, ratio-7-3, ...)."),
        inputs: list[str] = typer.Option(
            None, "--input", "-i", help="Corpus file or directory URI; repeat for several. Default: config inputs."),
        output: str = typer.Option(None, "--output", "-o", help="Output URI (path or s3://). Default: config output."),
        sets: list[str] = typer.Option(None, "--set", help="Override a config key: --set composition.total=300."),
    ) -> None:
        from rich.console import Console

        from fewstep.config import ConfigError
        from fewstep.settings import get_settings
        from pipelines.curate.read import InputError
        from pipelines.curate.rebalance import CompositionError
        from pipelines.curate.report import print_summary
        from pipelines.curate.run import run_curate

        settings = get_settings()
        console = Console(stderr=True)
        try:
            report = run_curate(_config_path(config), list(inputs or []), output, settings.storage_options(),
                                settings.ray_address, overrides=_parse_sets(list(sets or [])))
        except (ConfigError, InputError, CompositionError) as exc:
            console.print(f"[red]curate: {exc}[/red]")
            raise typer.Exit(2) from None
        print_summary(report, Console())
