"""``fewstep models ...``: create and inspect model directories."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Create and inspect Qwen-Image style model directories.", no_args_is_help=True)

_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _config_path(value: str) -> Path:
    path = Path(value)
    if path.exists():
        return path
    # Accept a preset name ("teacher") or a repo-relative path from any working directory.
    for candidate in (_REPO_CONFIGS / f"{value}.yaml", _REPO_CONFIGS / path.name):
        if candidate.exists():
            return candidate
    raise typer.BadParameter(f"{value}: no such config file or preset in {_REPO_CONFIGS}")


def _storage_options():
    from fewstep.settings import get_settings

    return get_settings().storage_options()


@app.command("init-tiny")
def init_tiny_cmd(
    out: str = typer.Option(..., "--out", help="Directory URI to write (local path or s3://bucket/prefix)."),
    config: str = typer.Option("configs/models/tiny.yaml", "--config",
                               help="Architecture preset (YAML path, or a name: tiny, teacher)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random weights; same config + seed = same files."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing directory."),
) -> None:
    """Write a tiny random Qwen-Image pipeline directory (diffusers layout, local BPE tokenizer).

    The result loads with diffusers' QwenImagePipeline.from_pretrained(DIR) and with
    fewstep's QwenImageAdapter.load(DIR); nothing is downloaded.
    """
    from fewstep.config import ConfigError
    from fewstep.models.tiny import init_tiny, load_tiny_config

    try:
        cfg = load_tiny_config(_config_path(config))
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    try:
        uri = init_tiny(out, cfg, seed=seed, overwrite=overwrite, storage_options=_storage_options())
    except FileExistsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {cfg.name} pipeline to {uri}")
    _print_info(uri)


@app.command("info")
def info_cmd(
    path: str = typer.Argument(..., help="Pipeline directory URI (local path or s3://)."),
) -> None:
    """Show a pipeline directory's components, parameter counts and latent shape."""
    from fewstep.models.pipeline_dir import NotAPipelineError

    try:
        _print_info(path)
    except NotAPipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def _print_info(path: str) -> None:
    from rich.console import Console
    from rich.table import Table

    from fewstep.models.info import describe

    info = describe(path, _storage_options())
    table = Table(title=f"{info['uri']}")
    table.add_column("component")
    table.add_column("class")
    table.add_column("parameters", justify="right")
    table.add_column("MB on disk", justify="right")
    for row in info["components"]:
        params = f"{row['parameters']:,}" if row.get("parameters") is not None else ""
        table.add_row(row["name"], row["class"], params, f"{row['bytes'] / 1e6:.2f}")
    console = Console()
    console.print(table)
    for key in ("vae_scale_factor", "latent_channels", "resolution", "latent_shape", "image_tokens",
                "condition_image_size", "scheduler"):
        if info.get(key) is not None:
            console.print(f"{key}: {info[key]}")
