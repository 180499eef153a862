"""The distill / eval / demo commands: shipped configs validate, bad input gives a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fewstep.cli import app

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "distill").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_distill_configs_validate(path):
    from fewstep.config import parse_config
    from trainer.runtime.config import TrainConfig

    data = yaml.safe_load(path.read_text())
    if path.name == "demo.yaml":  # the demo fills in its teacher and data
        data["objective"]["guidance"]["teachers"][0]["path"] = "/teachers/base"
    cfg = parse_config(TrainConfig, data, str(path))
    objective = cfg.objective_config()
    assert objective.student_steps == 4
    assert objective.table().num_steps == 4


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_eval_configs_validate(path):
    from fewstep.config import load_config
    from trainer.evaluate.config import EvalConfig

    cfg = load_config(EvalConfig, path)
    assert cfg.models and cfg.benches


def test_shipped_eval_and_demo_configs_validate():
    from fewstep.config import load_config
    from trainer.demo import load_demo_config
    from trainer.evaluate.config import EvalConfig

    assert load_config(EvalConfig, REPO / "configs" / "eval" / "mini.yaml").models[0].role == "teacher"
    demo = load_demo_config(None)
    assert demo.teacher == "assets/teachers/base" and demo.distill.config == "configs/distill/demo.yaml"


def test_distill_rejects_a_bad_lambda_table(tmp_path):
    data = yaml.safe_load((REPO / "configs" / "distill" / "stepwise.yaml").read_text())
    data["objective"]["guidance"]["lambdas"]["text"][3] = [0.5, 0.4]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["distill", "--config", str(bad)])
    assert result.exit_code == 2
    assert "guidance.lambdas.text[3]" in result.output and "sum to 0.9, not 1" in result.output


def test_demo_without_teacher_says_what_to_do(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "run"),
                                      "--set", f"teacher={tmp_path / 'missing'}"])
    assert result.exit_code == 2
    assert "model_index.json is missing" in result.output and "init-tiny" in result.output
    assert not (tmp_path / "run").exists()


def test_eval_rejects_unknown_keys(tmp_path):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"models": [{"name": "t", "path": "/x", "nfe_steps": 3}]}))
    result = CliRunner().invoke(app, ["eval", "--config", str(cfg), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "models.0.nfe_steps" in result.output


def test_demo_checks_its_inputs_before_any_stage_runs(tmp_path):
    run = tmp_path / "run"
    missing = CliRunner().invoke(app, ["demo", "--out", str(run), "--set", f"corpus.uri={tmp_path / 'nope'}"])
    assert missing.exit_code == 2 and "corpus.uri" in missing.output and "not found" in missing.output
    # A typo in the last stage's settings fails now, not after the distillation.
    typo = CliRunner().invoke(app, ["demo", "--out", str(run), "--set", "eval.set={cases_per_categry: 1}"])
    assert typo.exit_code == 2 and "cases_per_categry" in typo.output
    assert not run.exists()


def test_a_bad_demo_setting_leaves_a_finished_run_folder_as_it_was(tmp_path):
    """Finished stages are removed for a redo only once every input has been checked: a typo in
    the corpus preset or an address where no Ray cluster answers must not cost the old results."""
    import socket

    run = tmp_path / "run"
    for name in ("corpus", "curated", "shards", "distill", "eval"):
        (run / name).mkdir(parents=True)
        (run / name / "done").write_text("x")
    typo = CliRunner().invoke(app, ["demo", "--out", str(run), "--set", "corpus.preset=huge"])
    assert typo.exit_code == 2 and "corpus.preset: 'huge' is not one of" in typo.output
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray = CliRunner().invoke(app, ["demo", "--out", str(run), "--set", f"ray_address=127.0.0.1:{port}"])
    assert ray.exit_code == 2 and "ray_address" in ray.output and "nothing answers" in ray.output
    assert sorted(p.name for p in run.iterdir()) == ["corpus", "curated", "distill", "eval", "shards"]


def test_a_nested_stage_setting_changes_one_key_of_its_section():
    """`--set distill.set.train.max_steps=2` reaches the stage as {train: {max_steps: 2}}: it is
    merged into the stage config's train section, not put in its place."""
    from fewstep.config import parse_overrides
    from trainer.demo import DEFAULT_CONFIG, _config_path, load_config_dict, load_demo_config

    cfg = load_demo_config(DEFAULT_CONFIG, parse_overrides(["distill.set.train.max_steps=2"]))
    data = load_config_dict(_config_path(cfg.distill.config), cfg.distill.set)
    assert data["train"]["max_steps"] == 2 and "batch_size" in data["train"]
    from trainer.runtime.config import TrainConfig

    assert TrainConfig.model_validate(data).train.max_steps == 2
    # A mapping onto a plain value still replaces it (a per-task guidance scale for a single one).
    replaced = load_config_dict(_config_path(cfg.distill.config),
                                {"objective.guidance_scale": {"t2i": 3.0, "edit": 2.0}})
    assert replaced["objective"]["guidance_scale"] == {"t2i": 3.0, "edit": 2.0}


def test_demo_redoes_the_stages_whose_inputs_changed(tmp_path):
    """A run folder remembers what made each stage; a later run reuses a stage only if it and
    every stage before it had the same inputs (the teacher counts from precompute on)."""
    from trainer.demo import STAGE_DIRS, DemoConfig, Stages, stages_to_redo

    def folder_run(**changes) -> list[str]:
        cfg = DemoConfig.model_validate({"run_dir": str(tmp_path / "demo"), **changes})
        for name in STAGE_DIRS.values():  # every stage looks finished
            (tmp_path / "demo" / name).mkdir(parents=True, exist_ok=True)
            (tmp_path / "demo" / name / "done").write_text("x")
        return stages_to_redo(cfg, cfg.teacher, Stages(cfg, None), None)

    assert folder_run() == []  # no record yet (a folder of an older fewstep): reused, then recorded
    assert json.loads((tmp_path / "demo" / "demo_inputs.json").read_text())["precompute"]["teacher"]
    assert folder_run() == []
    assert folder_run(eval={"config": "configs/eval/demo.yaml", "set": {"grid_cases": 2}}) == ["eval"]
    assert not (tmp_path / "demo" / "eval" / "done").exists()  # removed, so never half-reused
    assert (tmp_path / "demo" / "distill" / "done").exists()
    assert folder_run(teacher="assets/teachers/text-specialist") == ["precompute", "distill", "eval"]
    assert folder_run(teacher="assets/teachers/text-specialist", resume=False) == list(Stages.NAMES)
