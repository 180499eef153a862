"""Task-mixture sampler: hits the configured ratio within a fixed budget and reports it."""

from __future__ import annotations

import pytest

from fewstep.config import ConfigError, parse_config
from trainer.mixture import MixtureConfig, MixtureError, MixturePlan, MixtureSampler, achieved_ratio


@pytest.mark.parametrize(("t2i", "edit"), [(9, 1), (7, 3), (5, 5), (1, 0), (2, 1)])
@pytest.mark.parametrize("num_batches", [10, 37, 200])
def test_plan_tracks_ratio_within_one_batch(t2i, edit, num_batches):
    fractions = parse_config(MixtureConfig, {"ratio": {"t2i": t2i, "edit": edit}}).fractions()
    plan = MixturePlan(fractions, num_batches=num_batches, batch_size=4)
    counts = plan.counts()
    assert sum(counts.values()) == num_batches * 4
    for task, share in fractions.items():
        # Every prefix of the schedule stays within one batch of the target.
        for upto in range(1, num_batches + 1):
            assert abs(plan.counts(upto)[task] / 4 - share * upto) <= 1.0
    if num_batches % (t2i + edit) == 0:
        assert counts.get("edit", 0) * t2i == counts["t2i"] * edit


def test_sampler_serves_rows_restarts_sources_and_reports():
    t2i_rows = [f"t{i}" for i in range(5)]
    edit_rows = [f"e{i}" for i in range(3)]
    plan = MixturePlan({"t2i": 0.7, "edit": 0.3}, num_batches=20, batch_size=2)
    sampler = MixtureSampler(plan, {"t2i": lambda: iter(t2i_rows), "edit": lambda: iter(edit_rows)})
    batches = list(sampler)
    assert len(batches) == 20
    for task, rows in batches:
        assert len(rows) == 2
        assert all(r.startswith(task[0]) for r in rows)
    report = sampler.report()
    assert report["served"] == {"t2i": 28, "edit": 12}
    assert report["achieved"] == pytest.approx({"t2i": 0.7, "edit": 0.3})
    assert report["epochs"]["edit"] >= 4  # 12 rows from a 3-row source
    assert "7.0:3.0" in report["text"]
    # Rows cycle in order across epoch boundaries (no row lost when a source runs out).
    served_edit = [r for task, rows in batches if task == "edit" for r in rows]
    assert served_edit == [edit_rows[i % 3] for i in range(12)]


def test_resume_mid_plan_keeps_counts():
    plan = MixturePlan({"t2i": 0.5, "edit": 0.5}, num_batches=10, batch_size=3)
    resumed = MixtureSampler(plan, {"t2i": lambda: iter(range(100)), "edit": lambda: iter(range(100))},
                             start=4)
    assert len(list(resumed)) == 6
    assert achieved_ratio(resumed.report()["served"]) == {"t2i": 0.5, "edit": 0.5}


def test_errors():
    plan = MixturePlan({"t2i": 0.5, "edit": 0.5}, num_batches=4, batch_size=2)
    with pytest.raises(MixtureError, match="no rows of that task"):
        MixtureSampler(plan, {"t2i": lambda: iter([1, 2])})
    empty = MixtureSampler(plan, {"t2i": lambda: iter([1]), "edit": lambda: iter([])})
    with pytest.raises(MixtureError, match="yields no rows"):
        list(empty)
    with pytest.raises(ConfigError, match="unknown task"):
        parse_config(MixtureConfig, {"ratio": {"t2i": 1, "video": 1}})
    with pytest.raises(ConfigError, match="positive weight"):
        parse_config(MixtureConfig, {"ratio": {"t2i": 0, "edit": 0}})


def test_scheduler_across_ranks_hits_the_ratio_when_data_allows():
    from trainer.mixture import MixtureScheduler

    both = {"t2i", "edit"}
    sched = MixtureScheduler({"t2i": 0.7, "edit": 0.3}, slots=2)
    for _ in range(50):
        tasks = sched.assign([both, both])
        sched.commit(tasks)
    assert sched.served == {"t2i": 70, "edit": 30} and sched.off_target_steps == 0
    # One process: the same schedule as MixturePlan.
    single = MixtureScheduler({"t2i": 0.7, "edit": 0.3}, slots=1)
    tasks = []
    for _ in range(20):
        tasks += single.assign([both])
        single.commit(tasks[-1:])
    assert tasks == MixturePlan({"t2i": 0.7, "edit": 0.3}, 20, 1).tasks


def test_scheduler_with_ranks_that_hold_one_task_each():
    from trainer.mixture import MixtureScheduler

    # A dataset sorted by task and split by position: rank 0 sees only edits, rank 1 only T2I.
    even = MixtureScheduler({"t2i": 0.5, "edit": 0.5}, slots=2)
    for _ in range(10):
        tasks = even.assign([{"edit"}, {"t2i"}])
        assert tasks == ["edit", "t2i"]
        even.commit(tasks)
    skewed = MixtureScheduler({"t2i": 0.7, "edit": 0.3}, slots=2)
    ready = [{"edit"}, {"t2i"}]
    first = skewed.assign(ready)
    assert first == ["edit", "t2i"]  # step 1 needs one batch of each: exact
    skewed.commit(first)
    assert skewed.assign(ready, strict=True) is None  # step 2 needs two T2I batches
    relaxed = skewed.assign(ready, strict=False)
    assert relaxed == ["edit", "t2i"]  # the closest the data allow, and reported as such
    skewed.commit(relaxed, on_target=False)
    assert skewed.off_target_steps == 1 and skewed.shares() == {"t2i": 0.5, "edit": 0.5}
    # A rank with nothing ready cannot be served, strict or not.
    assert skewed.assign([set(), {"t2i"}], strict=False) is None


def _resumed_dmd(ratio: dict[str, int], counts_from: str, served: dict[str, int]):
    from fewstep.config import parse_config
    from trainer.objectives.dmd import DMDConfig, DMDObjective

    cfg = parse_config(DMDConfig, {"guidance": {"teachers": [{"name": "base", "path": "/teachers/base"}],
                                                "preset": "base"},
                                   "mixture": {"ratio": ratio, "counts_from": counts_from}})
    objective = DMDObjective(cfg, env=None)
    objective.load_state_dict({"mixture_served": served, "mixture_off_target_steps": 3})
    return objective


def test_a_resume_keeps_the_runs_counts_unless_told_to_count_afresh(caplog):
    """After 7:3, a resumed 9:1 phase serves only T2I until the whole run reaches 9:1 (counts
    from the run), or serves 9:1 from its first step (counts from the resume)."""
    served = {"t2i": 700, "edit": 300}
    with caplog.at_level("WARNING", logger="trainer.objectives.dmd"):
        whole_run = _resumed_dmd({"t2i": 9, "edit": 1}, "run", served)._make_mixer(world_size=2)
    assert whole_run.served == served and whole_run.off_target_steps == 3
    assert "steer towards the new ratio" in caplog.text
    for _ in range(50):
        whole_run.commit(whole_run.assign([{"t2i", "edit"}] * 2))
    assert whole_run.served == {"t2i": 800, "edit": 300}

    phase = _resumed_dmd({"t2i": 9, "edit": 1}, "resume", served)._make_mixer(world_size=2)
    assert phase.served == {"t2i": 0, "edit": 0} and phase.off_target_steps == 0
    for _ in range(50):
        phase.commit(phase.assign([{"t2i", "edit"}] * 2))
    assert phase.served == {"t2i": 90, "edit": 10}

    caplog.clear()
    with caplog.at_level("WARNING", logger="trainer.objectives.dmd"):
        same = _resumed_dmd({"t2i": 7, "edit": 3}, "run", served)._make_mixer(world_size=2)
    assert same.served == served and "steer" not in caplog.text


def test_a_resume_early_in_a_run_with_the_same_ratio_does_not_warn(caplog):
    """After 2 batches a 7:3 run has served 1:1 (whole batches); that is no changed ratio."""
    early = _resumed_dmd({"t2i": 7, "edit": 3}, "run", {"t2i": 1, "edit": 1})
    with caplog.at_level("WARNING", logger="trainer.objectives.dmd"):
        early._make_mixer(world_size=1)
    assert "steer" not in caplog.text
    # The checkpoint records the ratio, so a changed one is told apart at any point of the run.
    changed = _resumed_dmd({"t2i": 9, "edit": 1}, "run", {"t2i": 1, "edit": 1})
    changed._restored["mixture_fractions"] = {"t2i": 0.7, "edit": 0.3}
    with caplog.at_level("WARNING", logger="trainer.objectives.dmd"):
        changed._make_mixer(world_size=1)
    assert "steer towards the new ratio" in caplog.text


def test_ratio_as_the_paper_writes_it(tmp_path):
    from fewstep.config import parse_overrides

    assert parse_config(MixtureConfig, {"ratio": "9:1"}).fractions() == {"t2i": 0.9, "edit": 0.1}
    assert parse_config(MixtureConfig, {"ratio": "5:5"}).ratio == {"t2i": 5.0, "edit": 5.0}
    # From the command line and from a config file, unquoted, as a user types it.
    assert parse_overrides(["objective.mixture.ratio=7:3"]) == {"objective.mixture.ratio": "7:3"}
    path = tmp_path / "mix.yaml"
    path.write_text("ratio: 7:3\n")
    from fewstep.config import load_config

    assert load_config(MixtureConfig, path).fractions() == pytest.approx({"t2i": 0.7, "edit": 0.3})
    with pytest.raises(ConfigError, match="quote it"):
        parse_config(MixtureConfig, {"ratio": 423})  # what plain yaml.safe_load makes of 7:3
    with pytest.raises(ConfigError, match="not a T2I:edit ratio"):
        parse_config(MixtureConfig, {"ratio": "7/3"})
    with pytest.raises(ConfigError, match="positive weight"):
        parse_config(MixtureConfig, {"ratio": "0:0"})
