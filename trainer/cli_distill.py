"""``fewstep distill``, ``fewstep eval`` and ``fewstep demo``."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def distill(
    config: Path = typer.Option(..., "--config", "-c", help="Run config, e.g. configs/distill/base.yaml."),
    data: str = typer.Option(None, "--data", help="Shards dataset URI (overrides data.uri)."),
    name: str = typer.Option(None, "--name", help="Run name (overrides run.name)."),
    steps: int = typer.Option(None, "--steps", help="Iterations (overrides train.max_steps)."),
    launcher: str = typer.Option(None, "--launcher", help="ray (Ray Train + DeepSpeed) or local."),
    set_: list[str] = typer.Option([], "--set", help="Any config key: --set objective.fake_updates=3 "
                                   "(repeatable; values are YAML)."),
) -> None:
    """DMD distillation of a few-step student from frozen teacher(s).

    Student and fake score start from the base teacher; each iteration updates the fake score objective.fake_updates times (flow matching on the student's samples), then the student once (DMD with backward simulation; real score = step-wise lambda mix of the teachers with CFG).

    Metrics go to <run>/metrics.jsonl (losses, grad norms, the mixture's served ratio, periodic judge scores), the student to <run>/final: a diffusers pipeline directory for QwenImagePipeline.from_pretrained(...) with num_inference_steps=4, true_cfg_scale=1. Rerunning the same run name resumes from its last checkpoint. See docs/distill.md.

    Example: fewstep distill --config configs/distill/base.yaml --data runs/demo/shards
    """
    from fewstep.config import ConfigError, parse_overrides
    from fewstep.settings import get_settings
    from trainer.runtime.config import load_train_config
    from trainer.runtime.launch import launch

    try:
        overrides = parse_overrides(set_)
        for key, value in (("data.uri", data), ("run.name", name), ("train.max_steps", steps),
                           ("launcher", launcher)):
            if value is not None:
                overrides[key] = value
        cfg = load_train_config(config, overrides)
    except ConfigError as exc:
        _fail(str(exc))
    if cfg.objective_name() != "dmd":
        _fail(f"{config}: objective.name is {cfg.objective_name()!r}; fewstep distill runs 'dmd' "
              "(use fewstep train-teacher for flow matching)")
    from trainer.runtime.launch import RunFailedError

    try:
        result = launch(cfg, get_settings())
    except (OSError, ValueError, RunFailedError) as exc:  # OSError: missing or unreachable stores
        _fail(str(exc))
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    typer.echo(json.dumps({"run": result.run_uri, "final": result.final_uri, "metrics": metrics}, indent=2))


def evaluate(
    config: Path = typer.Option(..., "--config", "-c", help="Eval config, e.g. configs/eval/mini.yaml."),
    out: str = typer.Option(..., "--out", help="Report folder URI (local path or s3://)."),
    set_: list[str] = typer.Option([], "--set", help="Any config key, e.g. --set cases_per_category=2."),
) -> None:
    """Sample t2i-bench-mini and editing-bench-mini with any models and judge them.

    Teachers default to 80 NFE with CFG 4, students to their exported steps without CFG; any model may set nfe, guidance_scale and shift. Runs as a Ray Data job (FEWSTEP_RAY_ADDRESS joins a cluster).

    Writes report.json and report.md, tables/<bench>.md|csv (per category, with NFE, network calls and seconds per image), cases/<model>/<bench>.jsonl (one JSON per case) and grids/<bench>/<category>.png.

    Example: fewstep eval --config configs/eval/mini.yaml --out runs/eval-mini
    """
    from fewstep.config import ConfigError, load_config, parse_overrides
    from fewstep.settings import get_settings
    from trainer.evaluate.config import EvalConfig
    from trainer.evaluate.run import run_eval

    try:
        cfg = load_config(EvalConfig, config, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    settings = get_settings()
    try:
        report = run_eval(cfg, out, settings.storage_options(), settings.ray_address)
    except (OSError, ValueError) as exc:  # OSError: missing or unreachable stores
        _fail(str(exc))
    from trainer.evaluate.report import bench_table

    for bench in cfg.benches:
        typer.echo(f"\n{bench}\n" + bench_table(bench, report["models"]))
    if report.get("paired"):
        from trainer.evaluate.compare import PairedResult, paired_table

        typer.echo("\npaired by case (students vs teachers)\n"
                   + paired_table([PairedResult.from_dict(r) for r in report["paired"]]))
    typer.echo(f"report: {report['output']}/report.md")


def eval_compare(
    a: str = typer.Argument(..., help="Model A as EVAL_DIR:MODEL (an eval output folder and a model name in it)."),
    b: str = typer.Argument(..., help="Model B as EVAL_DIR:MODEL."),
    alpha: float = typer.Option(0.05, "--alpha", min=0.0, max=1.0,
                                help="A is 'clearly better' when the sign test p is below this."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    metric: str = typer.Option("score", "--metric", help="score: the judge's 1-5 on every case; "
                               "text_chars: the OCR character accuracy on `text` cases only (every text "
                               "score is 2 while no word is drawn exactly; this still separates models)."),
) -> None:
    """Compare two evaluated models case by case: wins, losses, ties, mean difference, sign test.

    Cases scored by only one of them are left out, with a warning. Exit code 0 either way; read 'A clearly better'.

    Example (after `make demo`): fewstep eval-compare runs/demo/eval:student runs/demo/eval:teacher
    """
    from fewstep.settings import get_settings
    from trainer.evaluate.compare import METRICS, compare_scores, paired_table, read_case_scores

    if metric not in METRICS:
        _fail(f"--metric: {metric!r} is not one of {', '.join(METRICS)}")
    options = get_settings().storage_options()
    parsed = []
    for label, value in (("A", a), ("B", b)):
        folder, sep, model = value.rpartition(":")
        if not sep or not folder or not model:
            _fail(f"{label}: expected EVAL_DIR:MODEL, got {value!r}")
        try:
            parsed.append((model, read_case_scores(folder, model, options, metric)))
        except FileNotFoundError as exc:
            _fail(str(exc))
    (name_a, scores_a), (name_b, scores_b) = parsed
    if name_a == name_b:
        name_a, name_b = f"{name_a} (A)", f"{name_b} (B)"
    benches = [bench for bench in scores_a if bench in scores_b]
    if not benches:
        _fail(f"no bench in common: A has {sorted(scores_a)}, B has {sorted(scores_b)}")
    for bench in benches:
        only_a, only_b = set(scores_a[bench]) - set(scores_b[bench]), set(scores_b[bench]) - set(scores_a[bench])
        if only_a or only_b:
            typer.echo(f"warning: {bench}: A and B scored different cases ({len(only_a)} only in A, "
                       f"{len(only_b)} only in B); comparing the cases both scored", err=True)
    try:
        results = [compare_scores(bench, name_a, name_b, scores_a[bench], scores_b[bench]) for bench in benches]
    except ValueError as exc:
        _fail(str(exc))
    if json_out:
        typer.echo(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        typer.echo(paired_table(results, alpha))


def demo(
    config: Path = typer.Option(None, "--config", "-c", help="Demo config (default: "
                                "configs/demo/default.yaml): corpus, teacher, storage, Ray address."),
    out: str = typer.Option(None, "--out", help="Run folder (overrides run_dir)."),
    set_: list[str] = typer.Option([], "--set", help="Any key of the demo config, e.g. --set teacher=DIR "
                                   "or --set corpus.uri=DIR (repeatable; values are YAML)."),
) -> None:
    """The main job end to end on this machine: corpus -> curate -> precompute -> distill -> eval.

    Builds the small corpus (or uses the config's), curates it to a composition, precomputes with the shipped base teacher, distills a 4-step student on a short budget, evaluates the teacher (80 NFE, CFG) and the student (4 NFE) on the mini benches and prints the teacher-vs-student table. Writes <run_dir>/summary.json. No network needed; finished stages are reused.

    Example: fewstep demo --set teacher=path/to/teacher --out runs/demo2
    """
    from fewstep.config import ConfigError
    from trainer.demo import DemoError, load_demo_config, run_demo

    try:
        from fewstep.config import parse_overrides

        cfg = load_demo_config(config, parse_overrides(set_))
    except ConfigError as exc:
        _fail(str(exc))
    if out:
        cfg = cfg.model_copy(update={"run_dir": out})
    try:
        run_demo(cfg)
    except DemoError as exc:
        _fail(str(exc))


def register(app: typer.Typer) -> None:
    """Add this module's commands to the main app."""
    app.command("distill")(distill)
    app.command("eval")(evaluate)
    app.command("eval-compare")(eval_compare)
    app.command("demo")(demo)
