"""``fewstep precompute``."""

from __future__ import annotations

from pathlib import Path

import typer

_HELP = (
    "Encode a curated set with the teacher: prompt embeddings + VAE latents -> Parquet shards.\n\n"
    "Reads INPUT, a finished `fewstep curate` output (manifest.json + curated/part-*.parquet). Writes "
    "OUTPUT/shards/part-*.parquet (the shard schema), OUTPUT/empty_prompt.parquet (the unconditional "
    "embedding for T2I CFG), OUTPUT/rejects/ (rows that could not be encoded, with a reason), "
    "OUTPUT/stats/ (Ray Data per-operator stats) and OUTPUT/manifest.json, last.\n\n"
    "The text encoder and the VAE run as Ray Data actor pools; size them in the config "
    "(text_encoder.pool_size, batch_size, num_cpus, num_gpus; the same for vae).\n\n"
    "Rerunning the same command after a crash or a kill resumes: finished shards are kept, the rest "
    "are made again, and the result is byte-identical to an uninterrupted run (resume with the same "
    "torch_threads: CPU results depend on them in the last bits; the run warns if they changed). A "
    "finished output is left as it is.\n\n"
    "A row with a null or blank id, task, category or prompt, or an image that cannot be encoded, is "
    "a reject with its reason and curated part; a curated set with columns of the wrong type, parts "
    "changed since curate wrote them, or an unusable teacher or output is refused before any work.\n\n"
    "Example: fewstep precompute --config configs/precompute/default.yaml --teacher assets/teachers/base "
    "--input runs/curated --output runs/shards --set rows_per_shard=128"
)


_REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "precompute"


def _config_path(value: str) -> Path:
    """A YAML path, or a preset name ("default", "gpu") from the repository's configs/precompute/."""
    path = Path(value)
    if path.exists():
        return path
    for candidate in (_REPO_CONFIGS / f"{value}.yaml", _REPO_CONFIGS / path.name):
        if candidate.exists():
            return candidate
    presets = ", ".join(sorted(p.stem for p in _REPO_CONFIGS.glob("*.yaml")))
    raise typer.BadParameter(f"{value}: no such config file, nor a preset ({presets})", param_hint="--config")


def _parse_sets(values: list[str]) -> dict:
    from fewstep.config import parse_overrides

    return parse_overrides(values)


def register(app: typer.Typer) -> None:
    """Add the `precompute` command to the main app."""

    @app.command("precompute", help=_HELP)
    def precompute_cmd(
        teacher: str = typer.Option(..., "--teacher", help="Teacher pipeline directory (local or s3://)."),
        input: str = typer.Option(..., "--input", help="Curate output folder (local or s3://)."),
        output: str = typer.Option(..., "--output", help="Output folder for the shards (local or s3://)."),
        config: str = typer.Option("configs/precompute/default.yaml", "--config",
                                   help="Precompute YAML config, or a preset name (default, gpu)."),
        sets: list[str] = typer.Option([], "--set", help="Override a config key: KEY=VALUE (dotted keys, "
                                       "YAML values), repeatable."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Delete precompute output of a different "
                                       "plan (config/teacher/input) found in --output, instead of failing."),
        ray_address: str = typer.Option(None, "--ray-address", help="Ray cluster to join (default: "
                                        "FEWSTEP_RAY_ADDRESS, else an embedded local cluster)."),
        quiet: bool = typer.Option(False, "--quiet", help="No progress bars or summary table."),
    ) -> None:
        from fewstep.config import ConfigError
        from fewstep.contract import ContractError
        from fewstep.settings import get_settings
        from fewstep.storage import StorageError
        from pipelines.precompute.config import load_precompute_config
        from pipelines.precompute.plan import PrecomputeError
        from pipelines.precompute.run import run_precompute

        settings = get_settings()
        try:
            cfg = load_precompute_config(_config_path(config), _parse_sets(sets))
            manifest = run_precompute(cfg, teacher, input, output, storage=settings.storage_options(),
                                      ray_address=ray_address or settings.ray_address,
                                      ray_num_cpus=settings.ray_num_cpus, overwrite=overwrite,
                                      show_progress=not quiet)
        except (ConfigError, ContractError, PrecomputeError, StorageError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"wrote {len(manifest['shards'])} shards, {manifest['totals']['rows']} rows "
                   f"to {output} (plan {manifest['plan_id']})")
