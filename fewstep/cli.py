"""The ``fewstep`` command. Each area registers its own commands; this file only wires them."""

from __future__ import annotations

import logging

import typer

from fewstep import __version__

app = typer.Typer(
    name="fewstep",
    help=(
        "Few-step distillation of text-to-image and image-editing diffusion models.\n\n"
        "The main path, stage by stage:\n\n"
        "  fewstep corpus build     build raw T2I + edit corpora from data on this machine\n\n"
        "  fewstep curate           filter, tag and rebalance corpora to a composition (Ray Data)\n\n"
        "  fewstep precompute       teacher text embeddings + VAE latents into Parquet shards\n\n"
        "  fewstep train-teacher    flow-matching training (Ray Train + DeepSpeed)\n\n"
        "  fewstep distill          DMD distillation of a 4-step student\n\n"
        "  fewstep eval             sample and judge models on the mini benches\n\n"
        "  fewstep eval-compare     two evaluated models case by case (wins, sign test)\n\n"
        "  fewstep demo             all of the above, end to end, on this machine\n\n"
        "Every stage takes --config configs/<stage>/<name>.yaml; see configs/ for examples. "
        "Storage arguments are URIs (local path, file://, s3://). Environment settings use the "
        "FEWSTEP_ prefix (FEWSTEP_RAY_ADDRESS, FEWSTEP_S3_ENDPOINT_URL, ...) or a .env file."
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fewstep {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _register() -> None:
    from fewstep.bench import cli as bench_cli
    from fewstep.models import cli as models_cli
    from pipelines import cli as pipelines_cli
    from trainer import cli as trainer_cli

    app.add_typer(models_cli.app, name="models")
    bench_cli.register(app)
    pipelines_cli.register(app)
    trainer_cli.register(app)


_register()

if __name__ == "__main__":
    app()
