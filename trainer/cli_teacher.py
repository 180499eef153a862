"""``fewstep train-teacher``: flow-matching (or VAE) training of a teacher pipeline."""

from __future__ import annotations

import typer

TEACHER_HELP = """Train a teacher: its VAE, or its transformer with flow matching.

The config (configs/teacher/*.yaml) names the objective (vae | flow_matching), where the run starts (init: from tiny-config, a fresh random pipeline of a preset, or from a pretrained pipeline directory), the data (curated images for the VAE, precomputed shards for the transformer), the launcher (ray: Ray Train workers running DeepSpeed ZeRO 0-3; local: one process without Ray, device cpu or cuda, DeepSpeed optional) and the loop (max_steps, batch_size, checkpoint_every, ...).

The run folder <runs_dir>/<run.name>/ gets config.yaml, metrics.jsonl, checkpoints/ and final/ (a diffusers pipeline directory). Launching the same run name again resumes from its latest checkpoint, also after a crash.

The tiny teachers, in order (after fewstep corpus build and fewstep curate into runs/curated/standard):

  1. fewstep train-teacher --config configs/teacher/vae.yaml

  2. fewstep precompute --teacher runs/teacher-vae/final --input runs/curated/standard --output runs/shards/teacher-standard

  3. fewstep train-teacher --config configs/teacher/base.yaml

  4. fewstep train-teacher --config configs/teacher/text-specialist.yaml

On a GPU box without Ray: --set launcher=local --set device=cuda --set deepspeed.enabled=false --set train.precision=bf16
"""


def register(app: typer.Typer) -> None:
    """Add ``train-teacher`` to the main app."""

    @app.command("train-teacher", help=TEACHER_HELP)
    def train_teacher(
        config: str = typer.Option(..., "--config", "-c", help="Run config YAML (configs/teacher/*.yaml)."),
        set_: list[str] = typer.Option(
            [], "--set", help="Override a config key, KEY=VALUE (YAML value); repeatable, "
                              "e.g. --set train.max_steps=100 --set launcher=local."),
        dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved config only."),
    ) -> None:
        run_training(config, set_, dry_run)


def run_training(config_path: str, overrides: list[str], dry_run: bool) -> None:
    """Shared by the training commands: load, validate, launch, summarise."""
    import yaml
    from rich.console import Console

    from fewstep.config import ConfigError, parse_overrides
    from fewstep.settings import get_settings
    from trainer.runtime.config import load_train_config

    console = Console(stderr=True)
    try:
        config = load_train_config(config_path, parse_overrides(overrides))
    except ConfigError as exc:
        console.print(f"[red]config error[/red]\n{exc}")
        raise typer.Exit(2) from None
    from trainer.runtime.launch import check_inputs, launch, resolve_paths

    settings = get_settings()
    try:
        resolved = resolve_paths(config)
    except ConfigError as exc:
        console.print(f"[red]config error[/red]\n{exc}")
        raise typer.Exit(2) from None
    if dry_run:
        shown = resolved.model_dump(mode="json")
        if resolved.testing == type(resolved.testing)():  # fault injection unused: not worth a line
            shown.pop("testing", None)
        typer.echo(yaml.safe_dump(shown, sort_keys=False))
        typer.echo(f"# run folder: {config.run_uri(settings.runs_dir)}")
    try:  # the inputs, before anything runs (a dry run too: it answers "would this start?")
        check_inputs(resolved, resolved.run_uri(settings.runs_dir), settings.storage_options())
    except (ValueError, OSError) as exc:  # ConfigError, a missing dataset or model, a store
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    if dry_run:
        typer.echo("# inputs: found")
        return
    from trainer.runtime.launch import RunFailedError

    try:
        result = launch(config, settings)
    except (ValueError, OSError, RunFailedError) as exc:  # OSError: missing or unreachable stores
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    metrics = result.metrics
    console.print(f"[green]done[/green]: {metrics.get('step')} steps, run folder {result.run_uri}")
    shown = {k: v for k, v in metrics.items() if k.startswith("loss") or k in ("psnr", "samples_per_s")}
    for key, value in shown.items():
        console.print(f"  {key}: {value:.5g}" if isinstance(value, float) else f"  {key}: {value}")
    if result.final_uri:
        console.print(f"  pipeline: {result.final_uri}")
