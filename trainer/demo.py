"""``fewstep demo``: the main job end to end on one machine, with no network.

corpus build -> curate (composition) -> precompute (base teacher) -> distill (DMD, 4-step
student) -> eval (teacher 80 NFE + CFG vs student 4 NFE on the mini benches) -> summary.

Every stage is the project's own stage function with its own config file (the demo config
only points at them and sets a few keys), all inside one Ray session. Finished stages in the
run folder are reused (``resume: true``), so a second run or a run after an interruption
picks up where the first stopped; the folder records what made each stage
(``demo_inputs.json``), and a stage whose inputs changed is redone with every stage after it. ``<run_dir>/summary.json`` holds, for every evaluated
model, its role, NFE, measured seconds per image and its average score on each bench.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from fewstep import storage
from fewstep.config import ConfigError, StrictModel, load_config, parse_config, set_dotted
from trainer.demo_summary import print_summary, short_composition, summarise

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "demo" / "default.yaml"


class DemoError(RuntimeError):
    """A demo input that is missing or unusable; the message says what to do."""


class CorpusStep(StrictModel):
    uri: str | None = Field(None, description="Your own raw corpus folder (t2i/ and edit/ parts); "
                            "null builds the small built-in one.")
    preset: str = Field("small", description="Built-in corpus size (fewstep corpus build --preset).")
    seed: int = 0
    resolution: int = 64
    t2i_per_category: int | None = None
    edit_per_category: int | None = None


class StageStep(StrictModel):
    config: str = Field(..., description="The stage's own config file (repo-relative or absolute).")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set on top of it.")


class DemoConfig(StrictModel):
    run_dir: str = Field("runs/demo", description="Run folder (local path or s3://).")
    teacher: str = Field("assets/teachers/base", description="Base teacher pipeline directory.")
    ray_address: str | None = Field(None, description="Ray cluster to join (default: embedded).")
    ray_num_cpus: int | None = Field(None, ge=1, description="Logical CPUs of the embedded cluster.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto); credentials "
                                        "come from FEWSTEP_/AWS_ environment settings.")
    resume: bool = Field(True, description="Reuse stages already finished in run_dir whose inputs "
                         "(and those of every stage before them) are unchanged; false redoes all.")
    corpus: CorpusStep = Field(default_factory=CorpusStep)
    curate: StageStep = Field(default_factory=lambda: StageStep(config="configs/curate/default.yaml"))
    precompute: StageStep = Field(default_factory=lambda: StageStep(config="configs/precompute/default.yaml"))
    distill: StageStep = Field(default_factory=lambda: StageStep(config="configs/distill/demo.yaml"))
    eval: StageStep = Field(default_factory=lambda: StageStep(config="configs/eval/demo.yaml"))


def load_demo_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> DemoConfig:
    return load_config(DemoConfig, path or DEFAULT_CONFIG, overrides)


def _config_path(value: str) -> Path:
    path = Path(value)
    for candidate in (path, REPO / path):
        if candidate.exists():
            return candidate
    raise DemoError(f"stage config {value} not found (looked in . and {REPO})")


def _local_or_uri(value: str) -> str:
    """Repo-relative defaults work from any working directory."""
    if storage.is_s3(value) or Path(value).is_absolute() or Path(value).exists():
        return storage.normalize(value)
    repo_path = REPO / value
    return storage.normalize(str(repo_path if repo_path.exists() else value))


class Stages:
    """Runs the stages in order, timing each and printing one progress line per stage."""

    NAMES = ("corpus", "curate", "precompute", "distill", "eval")

    def __init__(self, cfg: DemoConfig, options):
        from fewstep.settings import get_settings

        self.cfg, self.options = cfg, options
        self.settings = get_settings()
        self.run_dir = storage.normalize(cfg.run_dir)
        self.seconds: dict[str, float] = {}
        self.redo: list[str] = list(self.NAMES)  # stages_to_redo() narrows it
        self.started = time.perf_counter()

    def uri(self, *parts: str) -> str:
        return storage.join(self.run_dir, *parts)

    def header(self, index: int, name: str, what: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"\n[{index}/{len(self.NAMES)}] {name}: {what}   (demo time {elapsed:.0f} s)", flush=True)

    def done(self, name: str, started: float, note: str = "") -> None:
        self.seconds[name] = round(time.perf_counter() - started, 2)
        print(f"    {name} done in {self.seconds[name]:.1f} s {note}", flush=True)

    def finished(self, marker: str) -> bool:
        stage = next(n for n, d in STAGE_DIRS.items() if marker.startswith(d + "/"))
        return stage not in self.redo and storage.exists(self.uri(marker), self.options)

    # -------------------------------------------------------------- stages
    def corpus(self) -> str:
        from fewstep.bench.corpus.build import build_corpus

        c = self.cfg.corpus
        if c.uri:
            self.header(1, "corpus", f"using your corpus {c.uri}")
            return storage.normalize(c.uri)
        out = self.uri("corpus")
        self.header(1, "corpus", f"building the {c.preset} corpus -> {out}")
        start = time.perf_counter()
        if self.finished("corpus/corpus.json"):
            print("    reusing the corpus already there")
        else:
            build_corpus(out, preset=c.preset, seed=c.seed, resolution=c.resolution, workers=1,
                         overwrite=True, options=self.options, t2i_per_category=c.t2i_per_category,
                         edit_per_category=c.edit_per_category)
        self.done("corpus", start)
        return out

    def curate(self, corpus: str) -> str:
        from pipelines.curate.run import run_curate

        out = self.uri("curated")
        self.header(2, "curate", f"filter, tag and rebalance to a composition -> {out}")
        start = time.perf_counter()
        if self.finished("curated/manifest.json"):
            print("    reusing the curated set already there")
        else:
            inputs = [storage.join(corpus, "t2i"), storage.join(corpus, "edit")]
            inputs = [u for u in inputs if storage.exists(u, self.options)] or [corpus]
            composition = run_curate(str(_config_path(self.cfg.curate.config)), inputs, out, self.options,
                                     self.cfg.ray_address, overrides=self.cfg.curate.set)
            print(f"    composition: {short_composition(composition)}")
        self.done("curate", start)
        return out

    def precompute(self, curated: str, teacher: str) -> str:
        from pipelines.precompute.run import run_precompute

        out = self.uri("shards")
        self.header(3, "precompute", f"teacher embeddings + latents -> {out}")
        start = time.perf_counter()
        cfg = load_config_dict(_config_path(self.cfg.precompute.config), self.cfg.precompute.set)
        run_precompute(cfg, teacher, curated, out, self.options, self.cfg.ray_address,
                       ray_num_cpus=self.cfg.ray_num_cpus, show_progress=True)
        self.done("precompute", start)
        return out

    def distill(self, shards: str, teacher: str) -> str:
        from fewstep.config import parse_config
        from trainer.runtime.config import TrainConfig
        from trainer.runtime.launch import launch

        final = self.uri("distill", "final")
        self.header(4, "distill", f"DMD, 4-step student from {teacher}")
        start = time.perf_counter()
        if self.finished("distill/final/model_index.json"):
            print(f"    reusing the student already at {final}")
        else:
            overrides = dict(self.cfg.distill.set)
            overrides.update({"run.name": "distill", "run.runs_dir": self.run_dir, "data.uri": shards})
            path = _config_path(self.cfg.distill.config)
            data = _fill(load_config_dict(path, overrides), {"{teacher}": teacher})
            cfg = parse_config(TrainConfig, data, str(path))
            cfg.objective_config()  # validate the DMD section now, with the file name in errors
            # launch() shows the run's progress bar with the DMD metrics (MetricsFollower).
            result = launch(cfg, self.settings, self.options)
            if not result.final_uri:
                raise DemoError(f"distill finished without an exported student in {result.run_uri}")
            final = result.final_uri
            m = result.metrics
            print(f"    last metrics: dmd_loss {m.get('dmd_loss', float('nan')):.4g}, fake_loss "
                  f"{m.get('fake_loss', float('nan')):.4g}, val_score {m.get('val_score', float('nan')):.2f}")
        self.done("distill", start)
        return final

    def evaluate(self, teacher: str, student: str) -> dict[str, Any]:
        from trainer.evaluate.config import EvalConfig
        from trainer.evaluate.run import run_eval

        out = self.uri("eval")
        self.header(5, "eval", f"teacher (80 NFE, CFG) vs student (4 NFE) on the mini benches -> {out}")
        start = time.perf_counter()
        if self.finished("eval/report.json"):
            print("    reusing the eval report already there")
            report = storage.read_json(self.uri("eval", "report.json"), self.options)
        else:
            data = load_config_dict(_config_path(self.cfg.eval.config), self.cfg.eval.set)
            data = _fill(data, {"{teacher}": teacher, "{student}": student})
            try:
                cfg = EvalConfig.model_validate(data)
            except Exception as exc:
                raise DemoError(f"{self.cfg.eval.config}: {exc}") from None
            report = run_eval(cfg, out, self.options, self.cfg.ray_address)
        self.done("eval", start)
        return report


def load_config_dict(path: Path, overrides: dict[str, Any]) -> dict[str, Any]:
    from fewstep.config import load_yaml

    data = load_yaml(path.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return data


def _fill(value: Any, values: dict[str, str]) -> Any:
    """Replace placeholder strings (``{teacher}``, ``{student}``) anywhere in a config tree."""
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    if isinstance(value, str):
        return values.get(value, value)
    return value


def _reachable(field: str, uri: str, options) -> bool:
    """Whether ``uri`` exists; a store that cannot be reached is a DemoError naming ``field``."""
    try:
        return storage.exists(uri, options)
    except Exception as exc:  # botocore's credential and endpoint errors share no base class
        raise DemoError(f"{field}: cannot reach {uri} ({type(exc).__name__}: {exc}); check the path, "
                        "s3_endpoint_url and the FEWSTEP_/AWS_ credentials") from None


def _check_corpus_preset(cfg: DemoConfig) -> None:
    from fewstep.bench.corpus.build import PRESETS

    if not cfg.corpus.uri and cfg.corpus.preset not in PRESETS:
        raise DemoError(f"corpus.preset: {cfg.corpus.preset!r} is not one of {list(PRESETS)} (or give "
                        "corpus.uri, your own raw corpus)")


def check_stage_configs(cfg: DemoConfig) -> None:
    """Every stage's config file exists and validates with its ``set``, before any stage runs
    (a typo in the eval section should not wait for the distillation to surface)."""
    from pipelines.curate.config import CurateConfig
    from pipelines.precompute.config import load_precompute_config
    from trainer.evaluate.config import EvalConfig
    from trainer.runtime.config import TrainConfig

    try:
        load_config(CurateConfig, _config_path(cfg.curate.config), cfg.curate.set)
        load_precompute_config(_config_path(cfg.precompute.config), cfg.precompute.set)
        path = _config_path(cfg.distill.config)
        data = load_config_dict(path, {**cfg.distill.set, "data.uri": "<shards>"})
        parse_config(TrainConfig, _fill(data, {"{teacher}": cfg.teacher}), str(path)).objective_config()
        path = _config_path(cfg.eval.config)
        data = _fill(load_config_dict(path, cfg.eval.set), {"{teacher}": cfg.teacher, "{student}": "<student>"})
        parse_config(EvalConfig, data, str(path))
    except ConfigError as exc:
        raise DemoError(str(exc)) from None


INPUTS_FILE = "demo_inputs.json"
STAGE_DIRS = {"corpus": "corpus", "curate": "curated", "precompute": "shards", "distill": "distill", "eval": "eval"}


def demo_inputs(cfg: DemoConfig, teacher: str) -> dict[str, Any]:
    """What decides each stage's output (its own settings and, from precompute on, the teacher)."""
    return {"corpus": cfg.corpus.model_dump(mode="json"), "curate": cfg.curate.model_dump(mode="json"),
            **{name: {"teacher": teacher, **getattr(cfg, name).model_dump(mode="json")}
               for name in ("precompute", "distill", "eval")}}


def stages_to_redo(cfg: DemoConfig, teacher: str, stages: Stages, options) -> list[str]:
    """The stages a run must not reuse: all without ``resume``; with it, the first stage whose
    inputs differ from those recorded in the run folder, and every stage after it. Their old
    outputs are removed first, so an interrupted redo cannot leave a stale stage looking finished."""
    uri = stages.uri(INPUTS_FILE)
    wanted = demo_inputs(cfg, teacher)
    redo = list(Stages.NAMES)
    if cfg.resume:
        before = storage.read_json(uri, options) if storage.exists(uri, options) else wanted
        changed = [name for name in Stages.NAMES if before.get(name) != wanted[name]]
        redo = list(Stages.NAMES[Stages.NAMES.index(changed[0]):]) if changed else []
        if changed:
            print(f"inputs of {changed[0]} differ from those {stages.run_dir} was made with: redoing "
                  f"{', '.join(redo)}", flush=True)
    for name in redo:
        folder = stages.uri(STAGE_DIRS[name])
        if name == "corpus" and cfg.corpus.uri:
            continue  # the user's own corpus is read, never written
        if storage.exists(folder, options):
            storage.delete(folder, options, recursive=True)
    storage.write_json_atomic(uri, wanted, options)
    return redo


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    from fewstep.raysession import ray_session
    from fewstep.settings import get_settings

    settings = get_settings()
    options = settings.storage_options()
    if cfg.s3_endpoint_url:
        from dataclasses import replace

        options = replace(options, endpoint_url=cfg.s3_endpoint_url)
    teacher = _local_or_uri(cfg.teacher)
    if not _reachable("teacher", storage.join(teacher, "model_index.json"), options):
        raise DemoError(
            f"teacher {cfg.teacher!r} not found ({teacher}/model_index.json is missing). The demo "
            "needs a base teacher pipeline: the shipped one lives in assets/teachers/base; or make a "
            "random tiny one with `fewstep models init-tiny --config teacher --out DIR` and pass "
            "--set teacher=DIR (its scores will be low: it is untrained)")
    if cfg.corpus.uri and not _reachable("corpus.uri", storage.normalize(cfg.corpus.uri), options):
        raise DemoError(f"corpus.uri: {cfg.corpus.uri} not found: give a raw corpus folder (t2i/ and "
                        "edit/ parts), or null to build the small built-in one")
    check_stage_configs(cfg)
    _check_corpus_preset(cfg)
    if cfg.ray_address:
        from fewstep.raysession import check_reachable

        try:
            check_reachable(cfg.ray_address)
        except ConfigError as exc:
            raise DemoError(f"ray_address: {exc}") from None
    stages = Stages(cfg, options)
    _reachable("run_dir", stages.run_dir, options)
    # Only now, with every input checked, may finished stages whose inputs changed be removed.
    stages.redo = stages_to_redo(cfg, teacher, stages, options)
    print(f"fewstep demo -> {stages.run_dir} (teacher {teacher})", flush=True)
    from fewstep.bench.corpus.build import CorpusError
    from fewstep.contract import ContractError
    from fewstep.storage import StorageError
    from pipelines.curate.read import InputError
    from pipelines.curate.rebalance import CompositionError
    from pipelines.precompute.plan import PrecomputeError
    from trainer.runtime.launch import RunFailedError

    try:
        with ray_session(cfg.ray_address, cfg.ray_num_cpus):
            corpus = stages.corpus()
            curated = stages.curate(corpus)
            shards = stages.precompute(curated, teacher)
            student = stages.distill(shards, teacher)
            report = stages.evaluate(teacher, student)
    except (ConfigError, InputError, CompositionError, PrecomputeError, ContractError, RunFailedError,
            CorpusError, StorageError) as exc:
        raise DemoError(str(exc)) from None
    summary = summarise(report)
    summary.update({"run_dir": stages.run_dir, "teacher": teacher, "student": student,
                    "report": storage.join(stages.run_dir, "eval", "report.md"),
                    "stage_seconds": stages.seconds,
                    "total_seconds": round(time.perf_counter() - stages.started, 1)})
    storage.write_json_atomic(stages.uri("summary.json"), summary, options)
    print()
    print_summary(summary, stages.run_dir, stages.seconds)
    print(f"total {summary['total_seconds']:.0f} s", flush=True)
    return summary
