"""Lambda table: presets, validation errors that name the entry, per-sample lookup."""

from __future__ import annotations

import pytest
import torch

from fewstep.config import ConfigError, parse_config
from trainer.guidance import GuidanceConfig, GuidanceError, LambdaTable, validate_lambdas

TEACHERS = [
    {"name": "base", "path": "t/base"},
    {"name": "text", "path": "t/text", "specialises": ["text"]},
]
CATS = ["portrait", "landscape", "text"]


def cfg(**kw) -> GuidanceConfig:
    return parse_config(GuidanceConfig, {"teachers": TEACHERS, **kw})


def test_base_preset_is_base_teacher_everywhere():
    table = cfg(preset="base").build_table(4, CATS)
    w = table.for_samples(torch.tensor([0, 1, 2, 3]), ["text", "portrait", "text", "unseen"])
    assert torch.equal(w, torch.tensor([[1.0, 0.0]] * 4))
    assert table.active_teachers() == [0]


def test_specialist_preset_uses_specialist_alone_on_its_category():
    table = cfg(preset="specialist").build_table(4, CATS)
    w = table.for_samples(torch.tensor([0, 3, 0]), ["text", "text", "landscape"])
    assert w.tolist() == [[0.0, 1.0], [0.0, 1.0], [1.0, 0.0]]


def test_stepwise_preset_anchors_early_steps_on_base():
    table = cfg(preset="stepwise", specialist_weight=0.75).build_table(4, CATS)
    steps = torch.tensor([0, 1, 2, 3])
    w = table.for_samples(steps, ["text"] * 4)
    assert w[:2].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert w[2:].tolist() == [[0.25, 0.75], [0.25, 0.75]]
    # Categories without a specialist stay on the base teacher at every step.
    assert table.for_samples(steps, ["portrait"] * 4)[:, 0].tolist() == [1.0] * 4
    assert sorted(table.active_teachers()) == [0, 1]
    one = cfg(preset="stepwise", anchor_steps=1).build_table(4, CATS)
    assert one.for_samples(torch.tensor([1]), ["text"]).tolist() == [[0.0, 1.0]]
    with pytest.raises(GuidanceError, match="anchor_steps"):
        cfg(preset="stepwise", anchor_steps=5).build_table(4, CATS)


def test_custom_table_per_category_and_default():
    lambdas = {
        "default": [[1, 0], [1, 0], [1, 0], [1, 0]],
        "text": [[1, 0], [0.5, 0.5], [0.2, 0.8], [0, 1]],
    }
    table = cfg(preset=None, lambdas=lambdas).build_table(4, CATS)
    w = table.for_samples(torch.tensor([2, 2]), ["text", "portrait"])
    assert torch.allclose(w, torch.tensor([[0.2, 0.8], [1.0, 0.0]]))
    assert table.to_dict()["tables"]["text"][1] == [0.5, 0.5]


@pytest.mark.parametrize(
    ("lambdas", "match"),
    [
        ({"default": [[1, 0]] * 3}, r"3 rows but the student has 4 steps"),
        ({"default": [[1, 0]] * 3 + [[1, 0, 0]]}, r"lambdas\.default\[3\]: 3 weights but there are 2"),
        ({"default": [[1, 0]] * 3 + [[1.5, -0.5]]}, r"\[3\]\[0\] \(base\): weight 1.5 outside \[0, 1\]"),
        ({"default": [[1, 0]] * 3 + [[0.5, 0.4]]}, r"lambdas\.default\[3\]: weights .* sum to 0.9, not 1"),
        ({"text": [[1, 0]] * 4}, r"no table for categories \['portrait', 'landscape'\]"),
        ({"default": [[1, 0]] * 3 + [[float("nan"), 1.0]]}, r"not a number"),
        # A misspelt category would match no row and leave the specialist unused: refused.
        ({"default": [[1, 0]] * 4, "txt": [[0, 1]] * 4}, r"tables for categories \['txt'\] .* objective.categories"),
        ({"default": [[1, 0]] * 4, "t2i:txt": [[0, 1]] * 4}, r"\['t2i:txt'\]"),
    ],
)
def test_invalid_tables_raise_clear_errors(lambdas, match):
    with pytest.raises(GuidanceError, match=match):
        cfg(preset=None, lambdas=lambdas).build_table(4, CATS)


def test_config_level_errors():
    with pytest.raises(ConfigError, match="preset.*lambdas|lambdas"):
        parse_config(GuidanceConfig, {"teachers": TEACHERS, "preset": None})
    with pytest.raises(ConfigError, match="both set"):
        parse_config(GuidanceConfig, {"teachers": TEACHERS, "lambdas": {"default": [[1, 0]]}})
    with pytest.raises(ConfigError, match="unique"):
        parse_config(GuidanceConfig, {"teachers": [TEACHERS[0], TEACHERS[0]]})
    with pytest.raises(GuidanceError, match="no base teacher"):
        parse_config(GuidanceConfig, {"teachers": [TEACHERS[1]], "preset": "stepwise"}).build_table(4, CATS)


def test_stepwise_settings_under_another_preset_are_refused():
    for preset in ("base", "specialist"):
        with pytest.raises(ConfigError, match="anchor_steps: only the stepwise preset uses them"):
            parse_config(GuidanceConfig, {"teachers": TEACHERS, "preset": preset, "anchor_steps": 2})
    with pytest.raises(ConfigError, match="specialist_weight"):
        parse_config(GuidanceConfig, {"teachers": TEACHERS, "preset": "base", "specialist_weight": 0.5})


def test_a_misspelt_specialisation_is_an_error_not_a_base_only_run():
    teachers = [TEACHERS[0], {"name": "text", "path": "t/text", "specialises": ["Text"]}]
    for preset in ("stepwise", "specialist"):
        with pytest.raises(GuidanceError, match=r"\['Text'\].*fix the name"):
            parse_config(GuidanceConfig, {"teachers": teachers, "preset": preset}).build_table(4, CATS)
    custom = {"teachers": teachers, "preset": None, "lambdas": {"default": [[1.0, 0.0]] * 4}}
    with pytest.raises(GuidanceError, match=r"specialises \['Text'\].*fix the name"):
        parse_config(GuidanceConfig, custom).build_table(4, CATS)  # also beside a custom table


def test_step_out_of_range_is_an_error():
    table = LambdaTable.from_mapping({"default": [[1.0]] * 2}, ["base"], 2, ["x"])
    with pytest.raises(GuidanceError, match="out of range"):
        table.for_samples(torch.tensor([2]), ["x"])
    validate_lambdas({"default": [[1.0]] * 2}, ["base"], 2)


def test_task_qualified_categories():
    teachers = [TEACHERS[0], {"name": "text", "path": "t/text", "specialises": ["t2i:text"]}]
    table = parse_config(GuidanceConfig, {"teachers": teachers, "preset": "specialist"}).build_table(
        2, CATS)
    w = table.for_samples(torch.tensor([1, 1, 1]), ["t2i:text", "edit:text", "t2i:portrait"])
    assert w.tolist() == [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]


def test_cfg_scale_per_task_with_teacher_overrides():
    """One loaded teacher can guide prompts and edits at different scales; a teacher's own entry wins
    for the tasks it names and the objective's scale covers the rest."""
    from trainer.guidance import scale_for
    from trainer.objectives.dmd import DMDConfig

    teachers = [{**TEACHERS[0], "guidance_scale": {"edit": 5.0}}, TEACHERS[1]]
    cfg = parse_config(DMDConfig, {"guidance": {"teachers": teachers}, "guidance_scale": {"t2i": 2, "edit": 4}})
    base, text = cfg.guidance.teachers
    assert [scale_for(task, base.guidance_scale, cfg.guidance_scale) for task in ("t2i", "edit")] == [2.0, 5.0]
    assert [scale_for(task, text.guidance_scale, cfg.guidance_scale) for task in ("t2i", "edit")] == [2.0, 4.0]
    assert scale_for("edit", None, 3) == 3.0
    with pytest.raises(ConfigError, match="guidance_scale.*give both t2i and edit"):
        parse_config(DMDConfig, {"guidance": {"teachers": TEACHERS}, "guidance_scale": {"t2i": 2}})
    with pytest.raises(ConfigError, match="guidance_scale"):
        parse_config(DMDConfig, {"guidance": {"teachers": TEACHERS}, "guidance_scale": {"t2i": 0.5, "edit": 4}})
    with pytest.raises(GuidanceError, match="no CFG scale for task 'edit'"):
        scale_for("edit", {"t2i": 2.0}, None)
