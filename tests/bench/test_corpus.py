"""``fewstep corpus build``: counts, contract, determinism, bench hold-out, storage backends."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from fewstep import contract
from fewstep.bench import world
from fewstep.bench.benches import load_bench
from fewstep.bench.corpus import build
from fewstep.bench.corpus_cli import corpus_app


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    """The acceptance command, run through the CLI: corpus build --preset small."""
    out = tmp_path_factory.mktemp("corpus") / "small"
    result = CliRunner().invoke(corpus_app, ["build", "--out", str(out), "--preset", "small", "--seed", "0",
                                             "--workers", "1"])
    assert result.exit_code == 0, result.output
    return out


def _parts(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_small_preset_counts_and_summary(small_corpus: Path):
    summary = json.loads((small_corpus / "corpus.json").read_text())
    contract.check_manifest(summary, expected_kind="raw_corpus")
    t2i = build.read_corpus(str(small_corpus), "t2i").to_pylist()
    edit = build.read_corpus(str(small_corpus), "edit").to_pylist()
    preset = build.PRESETS["small"]
    assert Counter(r["category"] for r in t2i) == {c: preset.t2i_per_category for c in world.T2I_CATEGORIES}
    assert Counter(r["edit_category"] for r in edit) == {c: preset.edit_per_category
                                                          for c in world.EDIT_CATEGORIES}
    assert summary["counts"]["t2i"] == dict(Counter(r["category"] for r in t2i))
    assert summary["counts"]["edit"] == dict(Counter(r["edit_category"] for r in edit))
    assert summary["vocabulary_hash"] == world.vocabulary_hash()
    assert (summary["seed"], summary["preset"], summary["resolution"]) == (0, "small", 64)
    # Every edit operation shows up, so each category really covers its sub-kinds.
    ops = Counter((json.loads(r["meta"])["edit_category"], json.loads(r["meta"])["operation"]) for r in edit)
    assert set(ops) == {(c, o) for c, opts in world.EDIT_OPERATIONS.items() for o in opts}


def test_rows_follow_the_raw_contract(small_corpus: Path):
    for path in sorted(small_corpus.rglob("*.parquet")):
        table = pq.read_table(path)
        expected = contract.RAW_T2I_SCHEMA if path.parent.name == "t2i" else contract.RAW_EDIT_SCHEMA
        assert table.schema.equals(expected, check_metadata=False)
        for row in table.to_pylist():
            (contract.validate_raw_t2i if path.parent.name == "t2i" else contract.validate_raw_edit)(row)
    rows = build.read_corpus(str(small_corpus), "edit").to_pylist()
    for row in rows[::25]:
        meta = json.loads(row["meta"])
        src = Image.open(io.BytesIO(row["source_image"]))
        tgt = Image.open(io.BytesIO(row["target_image"]))
        assert src.size == tgt.size == (64, 64) and src.mode == "RGB"
        # The stored pixels are exactly what the world renders from the meta.
        r_src, r_tgt = world.render_edit_pair(meta, 64)
        assert world.png_bytes(r_src) == row["source_image"] and world.png_bytes(r_tgt) == row["target_image"]
        assert src.tobytes() != tgt.tobytes(), f"{row['id']}: an edit that changes nothing"
        for key in ("edit_category", "operation", "source", "target", "region", "resolution"):
            assert key in meta
    t2i = build.read_corpus(str(small_corpus), "t2i").to_pylist()
    for row in t2i[::30]:
        meta = json.loads(row["meta"])
        assert world.png_bytes(world.render_t2i(meta, 64)) == row["image"]
        assert meta["category"] == row["category"] and meta["background"] in row["prompt"]


def test_same_seed_same_bytes_other_seed_differs(small_corpus: Path, tmp_path: Path):
    again = tmp_path / "again"
    build.build_corpus(str(again), preset="small", seed=0)
    assert _parts(again) == _parts(small_corpus)
    other = tmp_path / "other"
    build.build_corpus(str(other), preset="small", seed=1, t2i_per_category=10, edit_per_category=5)
    prompts = set(build.read_corpus(str(other), "t2i").column("prompt").to_pylist())
    assert prompts != set(build.read_corpus(str(small_corpus), "t2i").column("prompt").to_pylist()[:30])


def test_train_and_bench_never_share_ids_prompts_or_combinations(small_corpus: Path):
    t2i = build.read_corpus(str(small_corpus), "t2i").to_pylist()
    edit = build.read_corpus(str(small_corpus), "edit").to_pylist()
    t2i_bench, edit_bench = load_bench("t2i-bench-mini"), load_bench("editing-bench-mini")
    train_ids = {r["id"] for r in t2i} | {r["id"] for r in edit}
    bench_ids = {c.id for c in t2i_bench} | {c.id for c in edit_bench}
    assert len(train_ids) == len(t2i) + len(edit) and not train_ids & bench_ids
    assert not {r["prompt"] for r in t2i} & {c.prompt for c in t2i_bench}
    assert not {r["instruction"] for r in edit} & {c.prompt for c in edit_bench}
    assert not any(world.is_reserved(world.combo_key(json.loads(r["meta"]))) for r in t2i)
    assert not any(world.is_reserved(world.edit_key(json.loads(r["meta"]))) for r in edit)
    bench_t2i_keys = {world.combo_key(c.meta) for c in t2i_bench}
    assert not bench_t2i_keys & {world.combo_key(json.loads(r["meta"])) for r in t2i}
    # Bench cases are new combinations of subjects the corpus does teach.
    train_subjects = {json.loads(r["meta"])["subject"] for r in t2i}
    assert {c.meta["subject"] for c in t2i_bench if c.category != "text"} <= train_subjects


@pytest.mark.parametrize("task,categories", [("t2i", world.T2I_CATEGORIES), ("edit", world.EDIT_CATEGORIES)])
def test_prompt_determines_its_combination(task, categories):
    """Why hold-out keys give hold-out prompts: no text maps to two different keys."""
    key_fn = world.combo_key if task == "t2i" else world.edit_key
    owner: dict[str, tuple] = {}
    for category in categories:
        for record in build.plan(task, category, 400 if task == "t2i" else 300, seed=3, resolution=64):
            key = key_fn(record.meta)
            assert owner.setdefault(record.text, key) == key, record.text


def test_refuses_to_overwrite_without_flag(tmp_path: Path):
    out = str(tmp_path / "c")
    build.build_corpus(out, t2i_per_category=3, edit_per_category=2)
    with pytest.raises(build.CorpusError, match="--overwrite"):
        build.build_corpus(out, t2i_per_category=3, edit_per_category=2)
    summary = build.build_corpus(out, seed=5, t2i_per_category=4, edit_per_category=1, overwrite=True)
    assert summary["totals"] == {"rows": 18, "t2i": 12, "edit": 6}
    assert len(list((Path(out) / "t2i").glob("*.parquet"))) == 1


def test_bad_arguments_give_clear_errors(tmp_path: Path):
    runner = CliRunner()
    result = runner.invoke(corpus_app, ["build", "--out", str(tmp_path / "x"), "--preset", "huge"])
    assert result.exit_code == 2 and "--preset" in result.output and "small" in result.output
    with pytest.raises(build.CorpusError, match="distinct"):
        build.plan("t2i", "text", 10, seed=0, resolution=64, max_tries_per_record=0)


def test_worker_processes_give_identical_bytes(tmp_path: Path):
    one, two = tmp_path / "one", tmp_path / "two"
    build.build_corpus(str(one), t2i_per_category=140, edit_per_category=1, workers=1)
    build.build_corpus(str(two), t2i_per_category=140, edit_per_category=1, workers=2)
    assert _parts(one) == _parts(two)


def test_build_to_s3(s3_bucket, s3_options):
    out = f"{s3_bucket}/corpora/tiny"
    summary = build.build_corpus(out, seed=2, t2i_per_category=4, edit_per_category=2, options=s3_options)
    table = build.read_corpus(out, "edit", s3_options)
    assert table.num_rows == 12 == summary["totals"]["edit"]
    assert build.read_corpus(out, "t2i", s3_options).num_rows == 12
