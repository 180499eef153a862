"""A short DMD run on tiny models and small shards, on the product path (Ray Train, 2 workers,
DeepSpeed ZeRO-2): no NaNs, the student moves, N fake updates per student update, step-wise
multi-teacher guidance, a T2I:edit mixture served at its ratio across ranks, and an export."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fewstep.config import ConfigError, parse_config
from tests.trainer.dmd_world import tiny_teacher, write_shards
from trainer.runtime.config import TrainConfig

STEPS, FAKE_UPDATES = 4, 2


def _config(root: Path, data: str, base: str, specialist: str, launcher: str = "local",
            **objective) -> TrainConfig:
    body = {
        "name": "dmd",
        "guidance": {"teachers": [{"name": "base", "path": base},
                                  {"name": "text", "path": specialist, "specialises": ["text"]}],
                     "preset": "stepwise", "anchor_steps": 1},
        "fake_updates": FAKE_UPDATES,
        "student_optimizer": {"lr": 1e-3}, "fake_optimizer": {"lr": 1e-3},
        "mixture": {"ratio": {"t2i": 1, "edit": 1}},
        "fm_first_step_weight": 0.5,
        **objective,
    }
    return parse_config(TrainConfig, {
        "run": {"name": f"dmd-test-{launcher}", "runs_dir": str(root / "runs")},
        "launcher": launcher, "deepspeed": {"enabled": launcher == "ray", "zero_stage": 2},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "train": {"max_steps": STEPS, "batch_size": 2, "log_every": 1, "checkpoint_every": STEPS,
                  "max_failures": 0},
        "data": {"uri": data},
        "objective": body,
    })


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("dmd")
    base = tiny_teacher(root, seed=0)
    specialist = tiny_teacher(root, name="text", seed=1)
    data = write_shards(root / "shards", base, n_t2i=6, n_edit=6)
    return root, base, specialist, data


@pytest.fixture(scope="module")
def run(world, ray_cluster):
    from fewstep.settings import Settings
    from trainer.runtime.launch import launch

    root, base, specialist, data = world
    # Rows are written T2I first, so Ray's split gives the two workers different task mixes:
    # the mixture must still be served at 1:1 across ranks.
    result = launch(_config(root, data, base, specialist, launcher="ray"), Settings(runs_dir=str(root / "runs")))
    lines = (Path(result.run_uri) / "metrics.jsonl").read_text().splitlines()
    return result, [json.loads(line) for line in lines]


def test_runs_without_nans_and_reports_metrics(run):
    _, metrics = run
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    for record in metrics:
        for key in ("dmd_loss", "fake_loss", "student_grad_norm", "fake_grad_norm", "fm_first_step_loss",
                    "mixture_edit_share"):
            assert math.isfinite(record[key]), (key, record)
    assert sum(m["student_updates"] for m in metrics) == STEPS  # rank-averaged per-step counts
    assert sum(m["fake_updates"] for m in metrics) == STEPS * FAKE_UPDATES
    assert metrics[-1]["mixture_edit_share"] == 0.5
    assert metrics[-1]["mixture_off_target_steps"] == 0
    assert sum(m["task_edit"] for m in metrics) == STEPS / 2  # rank-averaged: half the batches edit
    assert any(m["student_grad_norm"] > 0 for m in metrics)


def test_student_moved_and_exported(run, world):
    from diffusers import QwenImageTransformer2DModel

    result, _ = run
    _, base, _, _ = world
    student = QwenImageTransformer2DModel.from_pretrained(str(Path(result.final_uri) / "transformer"))
    teacher = QwenImageTransformer2DModel.from_pretrained(str(Path(base) / "transformer"))
    with torch.no_grad():
        diffs = [float((a - b).abs().max()) for a, b in zip(student.parameters(), teacher.parameters())]
    assert max(diffs) > 1e-4
    assert all(math.isfinite(d) for d in diffs)
    meta = json.loads((Path(result.final_uri) / "fewstep_model.json").read_text())
    assert meta["role"] == "student" and meta["num_steps"] == 4
    assert meta["trained_steps"] == STEPS  # the student's updates, not the base teacher's
    assert meta["lambda_table"]["tables"]["text"][1] == [0.0, 1.0]


def test_mixture_without_data_for_a_task_fails_clearly(world):
    from fewstep.settings import Settings
    from trainer.runtime.launch import launch

    root, base, specialist, _ = world
    t2i_only = write_shards(root / "t2i-only", base, n_t2i=4, n_edit=0)
    with pytest.raises(Exception, match="holds no such rows"):
        launch(_config(root, t2i_only, base, specialist), Settings(runs_dir=str(root / "runs2")))
    # The data filter counts: both tasks on disk, but data.tasks keeps only T2I.
    filtered = _config(root, data_with_both := world[3], base, specialist)
    filtered.data.tasks = ["t2i"]
    with pytest.raises(Exception, match=r"holds no such rows after data.tasks \['t2i'\]"):
        launch(filtered, Settings(runs_dir=str(root / "runs2")))
    assert data_with_both


def test_a_teacher_made_for_other_shards_is_refused_by_name(world, tmp_path):
    import shutil

    from fewstep.settings import Settings
    from trainer.runtime.launch import launch

    root, base, specialist, data = world
    other = tmp_path / "other-teacher"
    shutil.copytree(specialist, other)
    config_file = other / "transformer" / "config.json"
    transformer = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**transformer, "out_channels": transformer["out_channels"] * 2}))
    config = _config(root, data, base, str(other))
    config.run.runs_dir = str(tmp_path / "runs")
    with pytest.raises(ValueError, match=r"teacher 'text' .*other-teacher.* takes"):
        launch(config, Settings(runs_dir=str(tmp_path / "runs")))


def test_the_export_records_what_the_student_was_trained_from_and_at(world, tmp_path):
    """init_from does not make the previous student the 'base teacher', and a student trained at
    another resolution says so, so that eval samples it there."""
    from fewstep.settings import Settings
    from trainer.export import export_student
    from trainer.runtime.launch import launch

    root, base, specialist, data = world
    from fewstep.models.adapter import QwenImageAdapter

    earlier = export_student(QwenImageAdapter.load(base, components=("transformer",)).transformer, base,
                             str(tmp_path / "earlier"), num_steps=4, shift=3.0)
    config = _config(root, data, base, specialist, init_from=earlier, resolution=16)
    config.train.max_steps, config.run.runs_dir = 1, str(tmp_path / "runs")
    final = launch(config, Settings(runs_dir=str(tmp_path / "runs"))).final_uri
    meta = json.loads((Path(final) / "fewstep_model.json").read_text())
    assert (meta["base_teacher"], meta["init_from"], meta["resolution"]) == (base, earlier, 16)
    assert QwenImageAdapter.load(final, components=()).resolution == 16


def test_a_validation_between_log_steps_is_logged_at_its_own_step(world, tmp_path):
    from fewstep.settings import Settings
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    root, base, specialist, data = world
    config = _config(root, data, base, specialist,
                     validation={"every": 3, "cases_per_category": 1, "save_grids": False})
    config.train.max_steps, config.train.log_every, config.train.export = 4, 2, False
    config.run.runs_dir = str(tmp_path / "runs")
    result = launch(config, Settings(runs_dir=str(tmp_path / "runs")))
    records = read_metrics(result.run_uri)
    assert [r["step"] for r in records] == [0, 2, 3, 4]
    assert [("val_score" in r) for r in records] == [True, False, True, True]


def test_a_run_stopped_by_max_minutes_validates_the_exported_student(world):
    """The time budget ends the run between validation steps; the last record still scores the
    student that the run exports (collapse in the final minutes must show)."""
    from fewstep.settings import Settings
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    root, base, specialist, data = world
    config = _config(root, data, base, specialist,
                     validation={"every": 1000, "cases_per_category": 1, "save_grids": False})
    config.run.name = "dmd-time-up"
    config.train.max_steps, config.train.max_minutes, config.train.export = 10_000, 0.02, False
    config.train.log_every = config.train.checkpoint_every = 1000
    config.testing.step_sleep_s = 0.2
    result = launch(config, Settings(runs_dir=str(root / "runs-time-up")))
    records = read_metrics(result.run_uri)
    stop = result.metrics["step"]
    assert 1 <= stop < 1000
    assert [r["step"] for r in records] == [0, stop]
    assert {"val_score", "val_pixel_std"} <= set(records[0]) and {"val_score", "dmd_loss"} <= set(records[-1])


def test_config_errors_name_the_field(world):
    root, base, specialist, data = world
    with pytest.raises(ConfigError, match="sum to"):
        _config(root, data, base, specialist, guidance={
            "teachers": [{"name": "base", "path": base}], "preset": None,
            "lambdas": {"default": [[0.5]] * 4}}).objective_config()
    with pytest.raises(ConfigError, match="renoise_t"):
        _config(root, data, base, specialist, renoise_t=[0.9, 0.1]).objective_config()
    for probs in ([1, -1, 0, 0], [0, 0, 0, 0], [1, 1]):
        with pytest.raises(ConfigError, match="step_probs: give 4 non-negative weights"):
            _config(root, data, base, specialist, step_probs=probs).objective_config()


def test_backward_simulation_uses_the_students_own_steps(world):
    """Step k's input is the student's Euler trajectory (checked against explicit sampling)."""
    from fewstep.models.adapter import QwenImageAdapter
    from trainer.objectives import dmd_math as M

    _, base, _, _ = world
    ad = QwenImageAdapter.load(base, components=("transformer", "text_encoder"))
    cond = ad.encode_prompts(["a red circle", "a blue square"])
    fn = lambda z, t: ad.predict_velocity(ad.transformer, z, t, cond)  # noqa: E731
    noise = torch.randn(2, ad.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    sigmas = ad.sigmas(4, 3.0)
    z_k, _ = M.backward_simulate(fn, noise, sigmas, torch.tensor([3, 3]))
    # adapter.sample runs the same Euler steps; stopping after 3 of 4 steps must match.
    full = ad.sample(ad.transformer, cond, None, num_steps=4, shift=3.0, init_noise=noise)
    x0, _ = M.student_x0(fn, z_k, sigmas[torch.tensor([3, 3])])
    assert torch.allclose(x0, full, atol=1e-4)


def test_a_resumed_run_trains_on_the_rows_an_uninterrupted_one_does(world, tmp_path):
    """Rows a rank had read into the mixture's buffer but not yet trained on are part of the
    checkpoint: the resumed run serves them, so its losses match a run that never stopped."""
    import copy

    from fewstep.settings import Settings
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    root, base, specialist, data = world
    config = _config(root, data, base, specialist, mixture={"ratio": {"t2i": 3, "edit": 1}})
    config.train.max_steps, config.train.checkpoint_every, config.train.export = 8, 4, False
    config.run.runs_dir = str(tmp_path / "runs")
    straight = copy.deepcopy(config)
    straight.run.name = "straight"
    launch(straight, Settings(runs_dir=str(tmp_path / "runs")))
    resumed = copy.deepcopy(config)
    resumed.run.name = "resumed"
    resumed.train.max_steps = 4
    launch(resumed, Settings(runs_dir=str(tmp_path / "runs")))
    resumed.train.max_steps = 8
    launch(resumed, Settings(runs_dir=str(tmp_path / "runs")))

    def losses(name: str) -> list[tuple[int, float]]:
        return [(r["step"], r["dmd_loss"]) for r in read_metrics(str(tmp_path / "runs" / name)) if "dmd_loss" in r]

    checkpoint = next((tmp_path / "runs" / "resumed" / "checkpoints").glob("step-00000004"))
    assert list(checkpoint.glob("objective-rank0.pt")), "no rows were buffered at the checkpoint"
    assert losses("resumed") == losses("straight")
