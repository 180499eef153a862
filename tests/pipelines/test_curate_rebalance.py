"""Composition targets and seeded sampling; the shipped presets; config errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fewstep.config import ConfigError, load_config, parse_config
from pipelines.curate.config import CompositionConfig, CurateConfig
from pipelines.curate.rebalance import CompositionError, largest_remainder, plan_targets, select

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "curate"
KNOWN = {"t2i": ["portrait", "landscape", "text"],
         "edit": ["scene", "enhancement", "object", "text", "identity", "style"]}


def _rows(counts: dict[str, dict[str, int]]) -> list[dict]:
    rows, order = [], 0
    for task, cats in counts.items():
        for cat, n in cats.items():
            for _ in range(n):
                rows.append({"order": order, "task": task, "category": cat})
                order += 1
    return rows


SMALL = {"t2i": {"portrait": 98, "landscape": 97, "text": 99},
         "edit": {c: 48 for c in KNOWN["edit"]}}


def test_largest_remainder_sums_exactly():
    for total in (0, 1, 7, 100, 301):
        split = largest_remainder(total, {"a": 1, "b": 1, "c": 1})
        assert sum(split.values()) == total and max(split.values()) - min(split.values()) <= 1
    assert largest_remainder(10, {"a": 9, "b": 1, "z": 0}) == {"a": 9, "b": 1, "z": 0}


@pytest.mark.parametrize("name,expected", [
    ("landscape", {"t2i": {"landscape": 80}}),
    ("portrait", {"t2i": {"portrait": 80}}),
    ("text", {"t2i": {"text": 80}}),
    ("landscape+portrait", {"t2i": {"landscape": 80, "portrait": 80}}),
    ("mixed", {"t2i": {"landscape": 80, "portrait": 80, "text": 80}}),
    ("ratio-9-1", {"t2i": {"portrait": 90, "landscape": 90, "text": 90}, "edit": {c: 5 for c in KNOWN["edit"]}}),
    ("ratio-7-3", {"t2i": {"portrait": 70, "landscape": 70, "text": 70}, "edit": {c: 15 for c in KNOWN["edit"]}}),
    ("ratio-5-5", {"t2i": {"portrait": 50, "landscape": 50, "text": 50}, "edit": {c: 25 for c in KNOWN["edit"]}}),
])
def test_presets_hit_their_targets_exactly(name, expected):
    cfg = load_config(CurateConfig, PRESETS / f"{name}.yaml")
    selection = select(_rows(SMALL), cfg.composition, KNOWN)
    assert selection.targets == expected
    assert selection.achieved == {t: {c: expected.get(t, {}).get(c, 0) for c in SMALL[t]} for t in SMALL}
    assert not selection.shortfalls
    assert len(selection.copies) == sum(sum(c.values()) for c in expected.values())
    assert set(selection.copies.values()) == {1}


def test_default_config_keeps_everything():
    cfg = load_config(CurateConfig, PRESETS / "default.yaml")
    assert cfg.composition is None
    selection = select(_rows(SMALL), None, KNOWN)
    assert selection.achieved == SMALL and len(selection.copies) == sum(sum(c.values()) for c in SMALL.values())


def test_sampling_is_seeded_and_changes_with_the_seed():
    spec = CompositionConfig.model_validate({"tasks": {"t2i": {"weight": 1}}, "total": 60, "seed": 3})
    a = select(_rows(SMALL), spec, KNOWN).copies
    assert a == select(_rows(SMALL), spec, KNOWN).copies
    other = select(_rows(SMALL), spec.model_copy(update={"seed": 4}), KNOWN).copies
    assert len(other) == len(a) == 60 and other != a


def test_shortfall_is_reported_and_replacement_fills_it():
    spec = CompositionConfig.model_validate(
        {"tasks": {"t2i": {"weight": 1, "categories": {"portrait": {"count": 120}, "text": {"count": 10}}}}})
    short = select(_rows(SMALL), spec, KNOWN)
    assert short.achieved["t2i"] == {"portrait": 98, "landscape": 0, "text": 10}
    assert short.shortfalls == [{"task": "t2i", "category": "portrait", "target": 120, "available": 98,
                                 "achieved": 98, "missing": 22}]
    filled = select(_rows(SMALL), spec.model_copy(update={"replace": True, "total": 130}), KNOWN)
    assert filled.achieved["t2i"]["portrait"] == 120 and not filled.shortfalls
    assert sum(filled.copies.values()) == 130 and max(filled.copies.values()) >= 2


def test_auto_total_is_the_largest_that_fits():
    spec = CompositionConfig.model_validate({"tasks": {"t2i": {"weight": 2}, "edit": {"weight": 1}}})
    targets = select(_rows(SMALL), spec, KNOWN).targets
    # Edit is the binding side: 6 x 48 = 288 edit rows -> at most 576 T2I rows, but T2I has 294,
    # so T2I binds: 3 equal categories capped by the smallest (97) -> 291 T2I, 145 or 146 edit.
    assert sum(targets["t2i"].values()) == 291 and sum(targets["edit"].values()) in (145, 146)
    assert all(n <= SMALL[t][c] for t, cats in targets.items() for c, n in cats.items())


def test_impossible_counts_are_config_errors():
    spec = CompositionConfig.model_validate(
        {"tasks": {"t2i": {"count": 10, "categories": {"portrait": {"count": 20}}}}})
    with pytest.raises(CompositionError, match="more than 10"):
        plan_targets(spec, SMALL, KNOWN)
    with pytest.raises(ConfigError, match="composition.tasks.t2i.categories"):
        load_config(CurateConfig, PRESETS / "mixed.yaml", {"composition.tasks.t2i.categories.sky": {"count": 1}})
    with pytest.raises(ConfigError, match="exactly one of count or weight"):
        load_config(CurateConfig, PRESETS / "mixed.yaml", {"composition.tasks.t2i.count": 5})
    with pytest.raises(ConfigError, match="captioning"):
        load_config(CurateConfig, PRESETS / "default.yaml", {"captioning.captioner": "vlm"})


def test_repeats_get_unique_ids_and_consecutive_positions():
    from pipelines.curate.operators import apply_decisions
    from pipelines.curate.records import from_rows, new_row
    from pipelines.curate.run import _decide

    narrow = [new_row(order=i, id=f"r{i}", task="t2i", category="portrait", prompt=f"prompt {i}",
                      input=f"f#{i}") for i in range(4)]
    narrow.append(new_row(order=9, id="bad", task="t2i", stage="image", reason="image_empty", input="f#9"))
    cfg = CurateConfig.model_validate({"composition": {"tasks": {"t2i": {"weight": 1, "categories": {
        "portrait": {"count": 7}}}}, "replace": True, "total": 7, "seed": 1}})
    rejects, selection, plan, position = _decide(narrow, cfg, KNOWN)
    assert position == 7 and [r["reason"] for r in rejects] == ["image_empty"]
    out = apply_decisions(from_rows(narrow), [plan], rows_per_part=3).to_pylist()
    assert len(out) == 7 and len({r["id"] for r in out}) == 7
    assert sorted(r["position"] for r in out) == list(range(7))
    assert {r["origin_id"] for r in out} == {"r0", "r1", "r2", "r3"}
    assert all(r["id"] == r["origin_id"] or r["id"].startswith(r["origin_id"] + "#rep") for r in out)
    assert [r["part"] for r in sorted(out, key=lambda r: r["position"])] == [0, 0, 0, 1, 1, 1, 2]


def test_summary_marks_categories_the_composition_does_not_list():
    from io import StringIO

    from rich.console import Console

    from pipelines.curate.report import print_summary

    report = {"config": "mine.yaml", "config_hash": "abc", "input_rows": 9, "kept_rows": 2, "rejected_rows": 7,
              "output_rows": 2, "repeats": 0,
              "rejected_by_reason": {"not_in_composition": 4, "over_budget": 1},
              "target": {"t2i": {"text": 2}}, "available": {"t2i": {"text": 3, "portrait": 4}},
              "achieved": {"t2i": {"text": 2}}, "shortfalls": []}
    out = StringIO()
    print_summary(report, Console(file=out, width=120))
    lines = {line.split("│")[2].strip(): line for line in out.getvalue().splitlines() if line.count("│") > 5}
    assert "not in composition" in lines["portrait"] and " - " in lines["portrait"]
    assert "not in composition" not in lines["text"]


def test_ratio_shorthand_sizes_the_tasks_like_their_weights(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("composition:\n  ratio: 7:3\n  total: 300\n")  # unquoted, as a user types it
    short = load_config(CurateConfig, path).composition
    long = load_config(CurateConfig, PRESETS / "ratio-7-3.yaml").composition
    assert short.tasks == long.tasks
    assert select(_rows(SMALL), short, KNOWN).targets == select(_rows(SMALL), long, KNOWN).targets
    # Categories given beside the ratio are kept; a task sized twice is an error naming both keys.
    kept = CompositionConfig.model_validate({"ratio": "9:1", "tasks": {"t2i": {"categories": {"text": {"weight": 2}}}}})
    assert kept.tasks["t2i"].weight == 9 and kept.tasks["t2i"].categories["text"].weight == 2
    with pytest.raises(ConfigError, match="composition.ratio and composition.tasks.t2i"):
        load_config(CurateConfig, path, {"composition.tasks": {"t2i": {"weight": 2}}})
    with pytest.raises(ConfigError, match="composition.ratio: .*quote it"):
        load_config(CurateConfig, path, {"composition.ratio": 423})


def test_a_weight_that_category_counts_would_override_is_refused():
    counted = {"categories": {c: {"count": 10} for c in ("portrait", "landscape", "text")}}
    with pytest.raises(ConfigError, match=r"composition.tasks.t2i: .*30 rows.*weight 7 .*ignored"):
        parse_config(CompositionConfig, {"ratio": "7:3", "total": 100, "tasks": {"t2i": counted}})
    # Counts and a task count agree with each other's meaning; counts alone on one task are fine too.
    parse_config(CompositionConfig, {"tasks": {"t2i": {"count": 30, **counted}, "edit": {"weight": 1}}, "total": 100})
    parse_config(CompositionConfig, {"tasks": {"t2i": {"weight": 1, **counted}}})


def test_ids_that_would_repeat_in_the_curated_set_stop_the_run_before_writing():
    from pipelines.curate.run import _check_unique_ids

    _check_unique_ids({1: "a", 2: "b"}, {1: (3, 0), 2: (1, 3)})  # a, a#rep1, a#rep2, b
    with pytest.raises(CompositionError, match=r"\['dup'\].*filters.dedup.ids"):
        _check_unique_ids({1: "dup", 2: "dup"}, {1: (1, 0), 2: (1, 1)})  # id dedup switched off
    with pytest.raises(CompositionError, match=r"\['a#rep1'\].*#rep<k>"):
        _check_unique_ids({1: "a#rep1", 2: "a"}, {1: (1, 0), 2: (2, 1)})  # a raw id like a repeat's
