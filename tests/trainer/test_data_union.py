"""`data.uri` as a list: a run trains on the union of several shard roots, and roots encoded by
different teachers are refused with an error that names the field and the fix."""

from __future__ import annotations

import pytest

from trainer.runtime.config import DataSection, TrainConfig
from trainer.runtime.data import LocalReader, open_source, union_totals
from trainer.runtime.synthetic import ensure_tiny_world, write_synthetic_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    pipeline, shards = ensure_tiny_world(tmp_path_factory.getbasetemp() / "tiny-world")
    # A second corpus encoded separately by the same teacher: other colour pairs, other ids.
    more = str(tmp_path_factory.mktemp("more") / "shards")
    write_synthetic_shards(pipeline, more, t2i_rows=6, edit_rows=4, first_row=40, rows_per_shard=4)
    return pipeline, shards, more


def test_a_list_of_roots_streams_every_row_of_each(world):
    _, shards, more = world
    one = LocalReader(open_source(DataSection(uri=shards), "shards", None, None), None)
    both = LocalReader(open_source(DataSection(uri=[shards, more]), "shards", None, None), None)
    assert both.table.num_rows == one.table.num_rows + 10
    ids = set(both.table.column("id").to_pylist())
    assert {"t2i-00040", "edit-00043"} <= ids and "t2i-00000" in ids
    edits = LocalReader(open_source(DataSection(uri=[shards, more], tasks=["edit"]), "shards", None, None), None)
    assert set(edits.table.column("task").to_pylist()) == {"edit"}
    assert edits.table.num_rows == 8 + 4


def test_a_run_trains_on_the_union(world, tmp_path):
    from trainer.runtime.launch import launch

    pipeline, shards, more = world
    raw = {
        "run": {"name": "fm-union", "runs_dir": str(tmp_path / "runs")},
        "launcher": "local", "device": "cpu", "deepspeed": {"enabled": False},
        "train": {"max_steps": 3, "batch_size": 8, "log_every": 1, "checkpoint_every": 100,
                  "progress": False, "export": False},
        "data": {"uri": [shards, more], "tasks": ["edit"]},
        "objective": {"name": "flow_matching", "init": {"from": "pretrained", "path": pipeline}},
    }
    result = launch(TrainConfig.model_validate(raw))
    assert result.metrics["step"] == 3
    # 12 edit rows in all: one full batch of 8 per epoch, so 3 steps span 3 epochs of the union.
    assert result.metrics["epoch"] >= 2


def test_roots_from_different_teachers_are_refused(world, tmp_path):
    from fewstep.models.tiny import init_tiny, load_tiny_config
    from trainer.teachers.init import REPO_MODEL_CONFIGS

    _, shards, _ = world
    other = init_tiny(tmp_path / "other-teacher", load_tiny_config(REPO_MODEL_CONFIGS / "tiny.yaml"), seed=7)
    foreign = write_synthetic_shards(other, str(tmp_path / "foreign"), t2i_rows=4)
    with pytest.raises(ValueError, match=r"data\.uri: .*foreign.* encoded differently.*same teacher"):
        open_source(DataSection(uri=[shards, foreign]), "shards", None, None)


def test_local_and_s3_roots_are_refused_before_anything_is_read(world):
    _, shards, _ = world
    with pytest.raises(ValueError, match=r"data\.uri: .*mix local and s3:// roots"):
        open_source(DataSection(uri=[shards, "s3://bucket/shards"]), "shards", None, None)


def test_totals_add_up_over_roots(world, tmp_path):
    """What DMD's mixture check reads: rows per task of the union, not of the first root."""
    import json

    _, shards, more = world
    both = union_totals([shards, more], None)
    assert both["rows"] == union_totals([shards], None)["rows"] + union_totals([more], None)["rows"] == 42
    roots = []
    for name, by_task in (("t2i-only", {"t2i": 5}), ("edit-only", {"edit": 3})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"totals": {"rows": 5, "by_task": by_task}}))
        roots.append(str(tmp_path / name))
    assert union_totals(roots, None) == {"rows": 10, "by_task": {"t2i": 5, "edit": 3}}


@pytest.mark.parametrize(("uri", "message"), [
    ([], "empty list"),
    (["/data/a", "/data/a"], "more than once"),
])
def test_bad_root_lists_name_the_field(uri, message):
    from fewstep.config import ConfigError

    raw = {"launcher": "local", "data": {"uri": uri},
           "objective": {"name": "flow_matching", "init": {"from": "pretrained", "path": "/x"}}}
    with pytest.raises((ConfigError, ValueError), match=rf"(?s)data\.uri.*{message}"):
        TrainConfig.model_validate(raw)


def test_a_one_item_list_is_that_root():
    assert DataSection(uri=["/data/a"]).uri == "/data/a"
    assert DataSection(uri=["/data/a", "/data/b"]).primary_uri == "/data/a"


def test_shards_of_another_model_are_refused_before_the_first_step(tmp_path):
    import json

    from trainer.runtime.data import check_shards_fit

    root = tmp_path / "shards"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"latent_channels": 16, "text_embed_dim": 64}))
    fits = {"out_channels": 16, "joint_attention_dim": 64}
    check_shards_fit(fits, (str(root),), None, "objective.init (mine)")
    with pytest.raises(ValueError, match=r"data.uri: .*\(text_embed_dim 64; objective.init \(mine\) takes 128\)"):
        check_shards_fit({**fits, "joint_attention_dim": 128}, (str(root),), None, "objective.init (mine)")
    with pytest.raises(ValueError, match="latent_channels 16"):
        check_shards_fit({**fits, "out_channels": 4}, (str(root),), None, "objective.init (mine)")
