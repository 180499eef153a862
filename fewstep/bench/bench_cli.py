"""``fewstep bench ...``: judge one image, score a bench, train the recogniser."""

from __future__ import annotations

import json
from pathlib import Path

import typer

bench_app = typer.Typer(help="Benches (mini: reported; val: for choosing) and offline judges.",
                        no_args_is_help=True)

BENCH_HELP = ("t2i-bench-mini or editing-bench-mini (the reported benches), or t2i-bench-val or "
              "editing-bench-val (same shape, no case in common: choose recipes and checkpoints there)")

JUDGE_HELP = ("offline (default: shipped recogniser + OCR + feature/noise measures, deterministic) or vlm "
              "(an OpenAI-compatible chat endpoint; needs --vlm-config)")
VLM_HELP = ("YAML with base_url, model and optionally api_key, timeout_s, max_retries, ... "
            "(see fewstep.bench.judges.vlm.VLMJudgeConfig)")


def _make_judge(judge: str, vlm_config: Path | None):
    if judge == "offline":
        from fewstep.bench.judges.offline import OfflineJudge

        return OfflineJudge()
    if judge == "vlm":
        if vlm_config is None:
            raise typer.BadParameter("--judge vlm needs --vlm-config FILE.yaml", param_hint="--vlm-config")
        from fewstep.bench.judges.vlm import VLMJudge, VLMJudgeConfig
        from fewstep.config import ConfigError, load_config

        try:
            return VLMJudge(load_config(VLMJudgeConfig, vlm_config))
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--vlm-config") from None
    raise typer.BadParameter(f"unknown judge {judge!r}: choose offline or vlm", param_hint="--judge")


def _open_image(path: str, what: str):
    import io

    from PIL import Image, UnidentifiedImageError

    from fewstep import storage
    from fewstep.settings import get_settings

    try:
        data = storage.read_bytes(path, get_settings().storage_options())
        with Image.open(io.BytesIO(data)) as handle:
            handle.load()
            return handle.convert("RGB")
    except FileNotFoundError:
        raise typer.BadParameter(f"{path}: no such file", param_hint=what) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise typer.BadParameter(f"{path}: not a readable image ({exc})", param_hint=what) from None


@bench_app.command("judge")
def judge_cmd(
    bench: str = typer.Option(..., "--bench", help=BENCH_HELP),
    case: str = typer.Option(..., "--case", help="case id, e.g. t2ib-portrait-000"),
    image: str = typer.Option(..., "--image", help="generated image (T2I) or edited output (path or URI)"),
    judge: str = typer.Option("offline", "--judge", help=JUDGE_HELP),
    vlm_config: Path | None = typer.Option(None, "--vlm-config", help=VLM_HELP),
    details: bool = typer.Option(False, "--details", help="also print what the judge measured"),
) -> None:
    """Judge one image against one bench case and print the verdict as JSON (the paper's form).

    For editing cases the source comes from the bench. Example:

      fewstep bench judge --bench t2i-bench-mini --case t2ib-text-003 --image out/t2ib-text-003.png
    """
    from fewstep.bench.benches import BenchError, load_bench
    from fewstep.bench.judges.base import JudgeError

    try:
        cases = {c.id: c for c in load_bench(bench)}
    except BenchError as exc:
        raise typer.BadParameter(str(exc), param_hint="--bench") from None
    if case not in cases:
        raise typer.BadParameter(f"no case {case!r} in {bench} (ids look like {next(iter(cases))})",
                                 param_hint="--case")
    the_case = cases[case]
    picture = _open_image(image, "--image")
    j = _make_judge(judge, vlm_config)
    try:
        if the_case.task == "t2i":
            verdict = j.judge_t2i(the_case, picture)
        else:
            verdict = j.judge_edit(the_case, the_case.source_image(), picture)
    except JudgeError as exc:
        typer.echo(f"judge failed: {exc}", err=True)
        raise typer.Exit(2) from None
    payload = verdict.paper_json()
    if details:
        payload = {**payload, "details": verdict.details}
    typer.echo(json.dumps(payload, indent=2, default=str))


@bench_app.command("score")
def score_cmd(
    bench: str = typer.Option(..., "--bench", help=BENCH_HELP),
    images: str = typer.Option(..., "--images", help="directory URI with <case_id>.png per case "
                                                      "(editing: the edited outputs)"),
    out: str = typer.Option(..., "--out", help="directory URI for cases.jsonl, scores.json, scores.md"),
    judge: str = typer.Option("offline", "--judge", help=JUDGE_HELP),
    vlm_config: Path | None = typer.Option(None, "--vlm-config", help=VLM_HELP),
    set_metrics: bool = typer.Option(True, "--set-metrics/--no-set-metrics",
                                     help="per-category KID/FID against real renders (offline judge)"),
) -> None:
    """Score a directory of generated images on a bench; write per-case JSONL and the tables.

    Missing or unreadable images are listed in the report and counted, never fatal.

    The upper bound for any generator is the bench's own real images, written by `fewstep corpus bench-refs`:

      fewstep corpus bench-refs --bench t2i-bench-mini --out runs/refs

      fewstep bench score --bench t2i-bench-mini --images runs/refs --out runs/refs-scores
    """
    from fewstep.bench.benches import BenchError, load_bench
    from fewstep.bench.scoring import load_images, score_bench, write_report
    from fewstep.settings import get_settings

    options = get_settings().storage_options()
    try:
        cases = load_bench(bench)
    except BenchError as exc:
        raise typer.BadParameter(str(exc), param_hint="--bench") from None
    try:
        found, problems = load_images(images, [c.id for c in cases], options)
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--images") from None
    j = _make_judge(judge, vlm_config)
    report = score_bench(bench, found, j, problems=problems, set_metrics=set_metrics)
    paths = write_report(report, out, options)
    typer.echo(report.to_markdown())
    typer.echo("wrote " + ", ".join(paths.values()))


@bench_app.command("train-recognizers")
def train_recognizers_cmd(
    out: Path = typer.Option(..., "--out", help="where to write recognizer.safetensors/.json; "
                                                "fewstep/bench/assets replaces the shipped recogniser"),
    steps: int = typer.Option(9000, "--steps"),
    pool: int = typer.Option(45000, "--pool", help="augmented renders drawn once, then sampled"),
    width: int = typer.Option(48, "--width", help="channels of the first conv block"),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(2, "--threads", help="torch CPU threads"),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda (same recipe)"),
) -> None:
    """Train the subject / skin-tone / style recogniser the offline judge ships (see docs/bench.md)."""
    from fewstep.bench.judges.train_recognizers import train

    card = train(out, steps=steps, pool=pool, width=width, seed=seed, threads=threads, device=device)
    typer.echo(json.dumps(card["heldout"], indent=2))
