"""``fewstep corpus ...``: build raw corpora and bench references from data on this machine."""

from __future__ import annotations

import os

import typer

corpus_app = typer.Typer(help="Build raw T2I and edit corpora from real data on this machine.",
                         no_args_is_help=True)


@corpus_app.command("build")
def build(
    out: str = typer.Option(..., "--out", help="Output URI (local path, file://, s3://bucket/prefix)."),
    preset: str = typer.Option("small", "--preset",
                               help="small: 300 T2I + 300 edit records, for tests (seconds). standard: "
                                    "6000 T2I + 3000 edit, enough to train the tiny teachers."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    resolution: int = typer.Option(64, "--resolution", help="Square image side in pixels."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), "--workers",
                                help="Render processes (output does not depend on it)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a corpus already at --out."),
    t2i_per_category: int = typer.Option(None, "--t2i-per-category", help="Override the preset's count."),
    edit_per_category: int = typer.Option(None, "--edit-per-category", help="Override the preset's count."),
) -> None:
    """Build a raw T2I + edit corpus: emoji and words rendered from fonts on this machine.

    T2I categories portrait, landscape, text and edit categories scene, enhancement, object, text, identity, style, each with equal counts. Prompts state the subject, background colour, position, size and count (text: word, font, colour), so prompt following is measurable.

    Writes OUT/t2i/part-*.parquet (raw T2I contract), OUT/edit/part-*.parquet (raw edit contract) and OUT/corpus.json last. Combinations reserved for the mini benches are never emitted. Needs the Debian packages fonts-noto-color-emoji, unicode-data, fonts-dejavu, fonts-liberation and fonts-freefont-ttf.

    Example: fewstep corpus build --out runs/corpus --preset standard --seed 0
    """
    from fewstep.bench.corpus.build import CorpusError, build_corpus
    from fewstep.bench.world import WorldDataMissing
    from fewstep.settings import get_settings

    try:
        summary = build_corpus(out, preset=preset, seed=seed, resolution=resolution, workers=workers,
                               overwrite=overwrite, options=get_settings().storage_options(),
                               t2i_per_category=t2i_per_category, edit_per_category=edit_per_category)
    except (CorpusError, WorldDataMissing) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    counts = summary["counts"]
    typer.echo(f"wrote {summary['totals']['t2i']} T2I records {counts['t2i']}")
    typer.echo(f"wrote {summary['totals']['edit']} edit records {counts['edit']}")
    typer.echo(f"summary: {out.rstrip('/')}/corpus.json ({summary['build_seconds']} s)")


@corpus_app.command("bench-refs")
def bench_refs(
    bench: str = typer.Option(..., "--bench", help="t2i-bench-mini, editing-bench-mini, t2i-bench-val or editing-bench-val."),
    out: str = typer.Option(..., "--out", help="Output directory URI."),
    resolution: int = typer.Option(None, "--resolution", help="Default: the bench's own (64)."),
    sources: bool = typer.Option(False, "--sources/--no-sources",
                                 help="Also write edit sources as OUT/sources/<case_id>.png."),
    through_vae: str = typer.Option(None, "--through-vae",
                                    help="A pipeline directory: write each reference after a round trip through "
                                         "its VAE (encode, decode). Sources are written unchanged."),
) -> None:
    """Write a bench's real reference images as OUT/<case_id>.png.

    Each is the true render of a T2I prompt, or the ground-truth target of an edit: the "upper bound" generator for the judges.

    With --through-vae, each reference is encoded by that pipeline's VAE and decoded again: the upper
    bound for any model that decodes through that VAE, however good its transformer. Score both to see
    how much of the gap to the real images the VAE alone costs:

      fewstep corpus bench-refs --bench t2i-bench-mini --out runs/refs-vae --through-vae assets/teachers/base

      fewstep bench score --bench t2i-bench-mini --images runs/refs-vae --out runs/refs-vae-scores
    """
    from fewstep import storage
    from fewstep.bench import world
    from fewstep.bench.benches import BenchError, load_bench
    from fewstep.settings import get_settings

    options = get_settings().storage_options()
    try:
        cases = load_bench(bench)
    except BenchError as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise typer.Exit(2) from None
    references = [case.reference_image(resolution) for case in cases]
    if through_vae:
        references = _vae_round_trip(through_vae, references, options)
    for case, reference in zip(cases, references, strict=True):
        storage.write_bytes_atomic(storage.join(out, f"{case.id}.png"), world.png_bytes(reference), options)
        if sources and case.task == "edit":
            storage.write_bytes_atomic(storage.join(out, "sources", f"{case.id}.png"),
                                       world.png_bytes(case.source_image(resolution)), options)
    via = f" through the VAE of {through_vae}" if through_vae else ""
    typer.echo(f"wrote {len(cases)} reference images of {bench}{via} to {out}")


def _vae_round_trip(pipeline: str, images: list, options, batch_size: int = 64) -> list:
    """Encode each image to the VAE's latent (the mode, as precompute does) and decode it again."""
    from fewstep.models.adapter import QwenImageAdapter

    try:
        adapter = QwenImageAdapter.load(pipeline, components=("vae",), device="cpu", storage=options)
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        raise typer.BadParameter(f"cannot load a VAE from {pipeline}: {exc}", param_hint="--through-vae") from None
    out = []
    for start in range(0, len(images), batch_size):
        latents = adapter.encode_images(images[start:start + batch_size])
        out.extend(adapter.to_pil(adapter.decode_latents(latents)))
    return out


@corpus_app.command("bad-inputs")
def bad_inputs(
    out: str = typer.Option(..., "--out", help="Output directory URI."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write bad raw inputs for data-engine tests, with expected.json.

    Corrupt, truncated, zero-byte, extreme-aspect, oversized-header, non-UTF-8, empty and duplicate records as Parquet and JSONL; expected.json lists each case's expected reject reason (or keep).
    """
    from fewstep.bench.badinputs import write_bad_inputs
    from fewstep.settings import get_settings

    paths = write_bad_inputs(out, seed=seed, options=get_settings().storage_options())
    for path in paths.values():
        typer.echo(f"wrote {path}")
