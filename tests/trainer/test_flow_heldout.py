"""Held-out loss of a flow-matching run: logged before training and every N steps, it shows the
model fitting its training rows faster than rows it never saw; errors name the field."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from trainer.objectives.flow_heldout import HeldoutConfig
from trainer.runtime.synthetic import ensure_tiny_world, write_synthetic_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_tiny_world(tmp_path_factory.getbasetemp() / "tiny-world")


@pytest.fixture(scope="module")
def heldout(world, tmp_path_factory):
    """Held-out T2I rows (colour pairs the tiny world's shards never show) with their latents negated:
    unlike any training row, so fitting the training rows cannot lower their loss much."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    pipeline, _ = world
    out = tmp_path_factory.getbasetemp() / "tiny-heldout"
    if not (out / "manifest.json").exists():
        write_synthetic_shards(pipeline, str(out), t2i_rows=6, first_row=24)
        for part in (out / "shards").glob("*.parquet"):
            table = pq.read_table(part)
            flipped = [(-np.frombuffer(b, np.float32)).tobytes() for b in table.column("latents").to_pylist()]
            table = table.set_column(table.schema.get_field_index("latents"), "latents",
                                     pa.array(flipped, table.schema.field("latents").type))
            pq.write_table(table, part)
    return str(out)


def _raw(tmp_path, world, heldout_cfg: dict, name: str = "fm-heldout", steps: int = 40) -> dict:
    pipeline, shards = world
    return {
        "run": {"name": name, "runs_dir": str(tmp_path / "runs")},
        "launcher": "local", "device": "cpu", "deepspeed": {"enabled": False},
        "train": {"max_steps": steps, "batch_size": 8, "log_every": 5, "checkpoint_every": 100,
                  "progress": False, "export": False},
        "data": {"uri": shards},
        "objective": {"name": "flow_matching", "init": {"from": "pretrained", "path": pipeline},
                      "optimizer": {"lr": 2e-3}, "heldout": heldout_cfg},
    }


def test_heldout_loss_is_logged_from_step_zero_and_shows_the_gap(world, heldout, tmp_path):
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    raw = _raw(tmp_path, world, {"uri": heldout, "every": 10, "rows": 64})
    records = read_metrics(launch(TrainConfig.model_validate(raw)).run_uri)

    start = records[0]
    # The model before any update, in its own record (not averaged into step 1-5's window).
    assert start["step"] == 0 and "loss" not in start
    scored = [r for r in records if "heldout_loss" in r]
    assert [r["step"] for r in scored] == [0, 10, 20, 30, 40]
    for r in scored:
        assert {"heldout_loss_t2i", "train_fixed_loss", "heldout_ratio"} <= set(r)
        assert "heldout_loss_edit" not in r  # no edit rows held out
        assert r["heldout_ratio"] == pytest.approx(r["heldout_loss"] / r["train_fixed_loss"])
    end = scored[-1]
    assert end["train_fixed_loss"] < 0.7 * start["train_fixed_loss"]
    # Fitting 32 rows for 40 steps lowers their loss further than that of rows unlike them.
    assert end["heldout_ratio"] > 1.1 * start["heldout_ratio"], (start, end)


def test_a_run_stopped_by_max_minutes_scores_its_final_model(world, heldout, tmp_path):
    """A time budget ends the run between scheduled checks: the last record still carries the
    held-out score of the model that is exported, not only the one of the last multiple of every."""
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    raw = _raw(tmp_path, world, {"uri": heldout, "every": 1000, "rows": 16}, steps=10_000)
    raw["train"].update(max_minutes=0.02, log_every=1000, checkpoint_every=1000)  # 1.2 s
    raw["testing"] = {"step_sleep_s": 0.2}
    result = launch(TrainConfig.model_validate(raw))
    records = read_metrics(result.run_uri)
    stop = result.metrics["step"]
    assert 2 <= stop < 1000
    assert [r["step"] for r in records] == [0, stop]
    assert {"heldout_loss", "train_fixed_loss", "heldout_ratio"} <= set(records[-1])
    assert records[-1]["heldout_loss"] != records[0]["heldout_loss"]  # the trained model, scored
    assert result.metrics["heldout_loss"] == records[-1]["heldout_loss"]


def test_heldout_scores_are_fixed_draws(world, heldout, tmp_path):
    """Same net, same numbers: the rows, noise and timesteps do not change between checks."""
    from trainer.objectives.base import ObjectiveEnv, TrainState
    from trainer.objectives.flow_heldout import HeldoutScorer
    from trainer.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective

    pipeline, shards = world
    cfg = FlowMatchingConfig.model_validate({"init": {"from": "pretrained", "path": pipeline},
                                             "heldout": {"uri": heldout, "every": 1, "rows": 4}})
    env = ObjectiveEnv(rank=0, world_size=1, device=torch.device("cpu"), storage=None,
                       run_uri=str(tmp_path), data_uri=shards, work_dir=tmp_path)
    objective = FlowMatchingObjective(cfg, env)
    (spec,) = objective.model_specs()
    net = spec.build()
    state = TrainState(step=0, max_steps=1, rank=0, world_size=1, device=torch.device("cpu"),
                       compute_dtype=torch.float32, models={}, generator=torch.Generator().manual_seed(0))
    scorer = HeldoutScorer(cfg.heldout, objective.adapter, shards, env, objective.collate)
    assert len(scorer.batches["heldout"]) == 4 and len(scorer.batches["train"]) == 4
    first, second = scorer.run(state, net), scorer.run(state, net)
    assert first == second
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(0.5)
    assert scorer.run(state, net)["heldout_loss"] != first["heldout_loss"]


def test_heldout_errors_name_the_field(world, tmp_path):
    from fewstep.models.tiny import init_tiny, load_tiny_config
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.teachers.init import REPO_MODEL_CONFIGS

    with pytest.raises(ValidationError, match="heldout.uri: required"):
        HeldoutConfig.model_validate({"every": 5})
    with pytest.raises(ValidationError, match="heldout.timesteps"):
        HeldoutConfig.model_validate({"timesteps": [0.5, 1.0]})

    # Shards encoded by another teacher (another text encoder): their losses would not compare.
    other = tmp_path / "other-pipeline"
    init_tiny(other, load_tiny_config(REPO_MODEL_CONFIGS / "tiny.yaml"), seed=5)
    foreign = write_synthetic_shards(str(other), str(tmp_path / "foreign"), t2i_rows=4)
    with pytest.raises(ValueError, match="heldout.uri: .*another text encoder"):
        launch(TrainConfig.model_validate(_raw(tmp_path, world, {"uri": foreign, "every": 5}, steps=2)))
    with pytest.raises(FileNotFoundError, match="heldout.uri: no manifest.json"):
        launch(TrainConfig.model_validate(
            _raw(tmp_path, world, {"uri": str(tmp_path / "nowhere"), "every": 5}, name="fm-none", steps=2)))


def test_sample_rows_is_seeded_spread_and_filtered(world):
    """The held-out reader: distinct rows from several files, the same for a seed, the filter kept."""
    from trainer.runtime.config import DataSection
    from trainer.runtime.data import open_source, sample_rows

    source = open_source(DataSection(uri=world[1]), "shards", None, None)
    assert len(source.files) >= 2
    first = sample_rows(source, 12, seed=3, options=None)
    assert len(first["id"]) == 12 and len(set(first["id"])) == 12
    assert list(sample_rows(source, 12, seed=3, options=None)["id"]) == list(first["id"])
    assert set(sample_rows(source, 12, seed=4, options=None)["id"]) != set(first["id"])
    everything = sample_rows(source, 10_000, seed=0, options=None)
    assert len(set(everything["id"])) == len(everything["id"]) == 32  # the whole tiny world, once

    edits = open_source(DataSection(uri=world[1], tasks=["edit"]), "shards", None, None)
    sampled = sample_rows(edits, 5, seed=0, options=None)
    assert len(sampled["id"]) == 5 and set(sampled["task"]) == {"edit"}
    with pytest.raises(ValueError, match="no rows"):
        sample_rows(open_source(DataSection(uri=world[1], categories=["none-such"]), "shards", None, None),
                    4, seed=0, options=None)


def test_a_log_record_keeps_the_latest_check_not_the_mean_of_its_window():
    """Checks every 10 steps logged every 20: the record shows the step-20 check; losses are means."""
    from trainer.objectives.dmd import DMDObjective
    from trainer.objectives.flow_matching import FlowMatchingObjective
    from trainer.runtime.loop import window_values

    window = {"loss": [0.4, 0.2], "heldout_loss": [0.9, 0.5], "train_fixed_loss": [0.3, 0.1],
              "heldout_ratio": [3.0, 5.0]}
    record = window_values(window, FlowMatchingObjective.snapshot_prefixes)
    assert record == {"loss": pytest.approx(0.3), "heldout_loss": 0.5, "train_fixed_loss": 0.1,
                      "heldout_ratio": 5.0}
    dmd = window_values({"dmd_loss": [1.0, 3.0], "val_score": [2.0, 4.0], "mixture_edit_share": [0.0, 0.2]},
                        DMDObjective.snapshot_prefixes)
    assert dmd == {"dmd_loss": 2.0, "val_score": 4.0, "mixture_edit_share": 0.2}  # a running share: its latest


def test_a_heldout_set_that_is_the_training_data_is_refused(tmp_path):
    from trainer.objectives.flow_heldout import check_compatible

    with pytest.raises(ValueError, match="heldout.uri: .* is data.uri itself"):
        check_compatible(str(tmp_path / "shards"), str(tmp_path / "shards") + "/", None, None, None)
