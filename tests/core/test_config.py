"""Configs: YAML into typed models; errors name the field path and the fix."""

from __future__ import annotations

import pytest

from fewstep.config import ConfigError, StrictModel, config_hash, load_config


class Inner(StrictModel):
    steps: int = 4
    rate: float


class Outer(StrictModel):
    name: str
    inner: Inner


def test_load_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: run\ninner:\n  rate: 0.5\n")
    cfg = load_config(Outer, path, overrides={"inner.steps": 8})
    assert cfg.inner.steps == 8 and cfg.inner.rate == 0.5


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("name: run\ninner:\n  rate: 0.5\n  stpes: 3\n", "inner.stpes: unknown key"),
        ("name: run\ninner: {}\n", "inner.rate: required"),
        ("name: run\ninner:\n  rate: fast\n", "inner.rate:"),
        ("- a\n- b\n", "expected a mapping"),
        ("name: [unclosed\n", "not valid YAML"),
    ],
)
def test_errors_name_the_field(tmp_path, text, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Outer, tmp_path / "none.yaml")


def test_config_hash_is_order_independent():
    a = Outer(name="x", inner=Inner(rate=1.0, steps=2))
    b = Outer.model_validate({"inner": {"steps": 2, "rate": 1.0}, "name": "x"})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(Outer(name="y", inner=Inner(rate=1.0, steps=2)))


def test_set_reaches_list_items_and_explains_bad_paths():
    import pytest

    from fewstep.config import ConfigError, set_dotted

    data = {"models": [{"name": "teacher", "path": "a"}, {"name": "student", "path": "b"}], "seed": 0}
    set_dotted(data, "models.1.path", "runs/x/final")
    set_dotted(data, "train.max_steps", 5)
    assert data["models"][1]["path"] == "runs/x/final" and data["train"] == {"max_steps": 5}
    with pytest.raises(ConfigError, match="list of 2; use an index 0..1"):
        set_dotted(data, "models.7.path", "c")
    with pytest.raises(ConfigError, match="is a value"):
        set_dotted(data, "seed.value", 1)


def test_config_yaml_reads_ratios_as_written_and_numbers_as_yaml_does():
    import yaml

    from fewstep.config import load_yaml

    # YAML 1.1 (safe_load) reads an unquoted 9:1 as the base-60 number 541; configs keep the text.
    assert yaml.safe_load("ratio: 9:1") == {"ratio": 541}
    assert load_yaml("ratio: 9:1\nat: 12:30:00") == {"ratio": "9:1", "at": "12:30:00"}
    for text in ("1", "-3", "0x1f", "017", "0b101", "1_000", "1.5", "3.0e-5", ".5", "-.inf", "1e-4",
                 "true", "null", "[1, 2.5]", "{a: 7, b: [x, 2]}"):
        assert load_yaml(text) == yaml.safe_load(text), text


def test_set_values_are_parsed_once_for_every_stage():
    from fewstep.config import parse_overrides

    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=null", "e= 9:1", "f=x=y"]) == \
        {"a.b": 3, "c": [1, 2], "d": None, "e": "9:1", "f": "x=y"}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["train.max_steps"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["models=[1, 2"])
