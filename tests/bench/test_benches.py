"""The benches (mini and validation): committed files, their loader, reference renders and
``bench-refs``."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from fewstep.bench import world
from fewstep.bench.benches import BENCHES, BenchError, bench_texts, generate, load_bench
from fewstep.bench.corpus_cli import corpus_app


@pytest.mark.parametrize("name,task,categories,per_category", [
    ("t2i-bench-mini", "t2i", world.T2I_CATEGORIES, 20),
    ("editing-bench-mini", "edit", world.EDIT_CATEGORIES, 10),
    ("t2i-bench-val", "t2i", world.T2I_CATEGORIES, 20),
    ("editing-bench-val", "edit", world.EDIT_CATEGORIES, 10),
])
def test_benches_have_equal_categories_and_fixed_fields(name, task, categories, per_category):
    cases = load_bench(name)
    assert Counter(c.category for c in cases) == {c: per_category for c in categories}
    assert len({c.id for c in cases}) == len(cases)
    assert len({c.prompt for c in cases}) == len(cases)
    assert {c.version for c in cases} == {BENCHES[name].version} and {c.task for c in cases} == {task}
    assert all(isinstance(c.seed, int) and c.prompt for c in cases)
    key = world.combo_key if task == "t2i" else world.edit_key
    assert all(world.is_reserved(key(c.meta)) for c in cases)
    if task == "edit":
        assert {(c.meta["edit_category"], c.meta["operation"]) for c in cases} >= {
            (cat, ops[0]) for cat, ops in world.EDIT_OPERATIONS.items()}


@pytest.mark.parametrize("name", list(BENCHES))
def test_committed_files_match_the_generator(name):
    """Regenerating gives the committed bytes: the world has not drifted under the bench."""
    spec = BENCHES[name]
    assert generate.dumps(generate.generate_cases(spec)) == spec.path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", list(BENCHES))
def test_references_render_as_recorded(name):
    cases = load_bench(name)
    assert [p for c in cases for p in c.verify()] == []
    for case in cases[::9]:
        ref = case.reference_image()
        assert ref.size == (64, 64) and ref.mode == "RGB"
        assert case.reference_image(32).size == (32, 32)
        if case.task == "edit":
            assert case.source_image().tobytes() != ref.tobytes()
        else:
            with pytest.raises(BenchError, match="edit"):
                case.source_image()


def test_loader_rejects_bad_files(tmp_path: Path):
    with pytest.raises(BenchError, match="unknown bench"):
        load_bench("t2i-bench-huge")
    good = BENCHES["t2i-bench-mini"].path.read_text().splitlines()
    wrong_version = json.loads(good[0]) | {"version": 7}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(wrong_version), *good[1:]]) + "\n")
    with pytest.raises(BenchError, match="bad.jsonl:1.*v1"):
        load_bench("t2i-bench-mini", bad)
    bad.write_text("\n".join(good[:-1]) + "\n")
    with pytest.raises(BenchError, match="per category"):
        load_bench("t2i-bench-mini", bad)
    bad.write_text("\n".join([*good[:5], "{oops", *good[5:]]) + "\n")
    with pytest.raises(BenchError, match="bad.jsonl:6.*JSON"):
        load_bench("t2i-bench-mini", bad)


def test_bench_texts_cover_every_bench():
    texts = bench_texts()
    assert len(texts) == 240
    assert {c.prompt for c in load_bench("editing-bench-mini")} <= texts
    assert {c.prompt for c in load_bench("t2i-bench-val")} <= texts


@pytest.mark.parametrize("test,validation", [("t2i-bench-mini", "t2i-bench-val"),
                                             ("editing-bench-mini", "editing-bench-val")])
def test_validation_benches_share_no_case_with_the_test_benches(test, validation):
    """Choosing a checkpoint on a validation bench must not be choosing on the reported one."""
    reported, held = load_bench(test), load_bench(validation)
    assert BENCHES[validation].validates == test and not BENCHES[test].is_validation
    assert not {generate.case_key(c) for c in reported} & {generate.case_key(c) for c in held}
    assert not {c.prompt for c in reported} & {c.prompt for c in held}
    assert not {c.id for c in reported} & {c.id for c in held}


def test_bench_refs_writes_one_png_per_case(tmp_path: Path):
    out = tmp_path / "refs"
    result = CliRunner().invoke(corpus_app, ["bench-refs", "--bench", "editing-bench-mini", "--out", str(out),
                                             "--sources"])
    assert result.exit_code == 0, result.output
    cases = load_bench("editing-bench-mini")
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(c.id for c in cases)
    assert len(list((out / "sources").glob("*.png"))) == len(cases)
    case = cases[0]
    assert Image.open(out / f"{case.id}.png").tobytes() == case.reference_image().tobytes()
    bad = CliRunner().invoke(corpus_app, ["bench-refs", "--bench", "nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown bench" in bad.output


def test_bench_refs_through_a_vae_writes_the_round_trip(tmp_path: Path):
    """--through-vae: the ceiling of a model that decodes through that VAE (close to, not equal to, the real)."""
    import numpy as np

    from fewstep.bench.judges.measure import psnr

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "refs-vae"
    result = CliRunner().invoke(corpus_app, ["bench-refs", "--bench", "t2i-bench-mini", "--out", str(out),
                                             "--through-vae", str(repo / "assets" / "teachers" / "base")])
    assert result.exit_code == 0, result.output
    assert "through the VAE" in result.output
    cases = load_bench("t2i-bench-mini")
    assert sorted(p.stem for p in out.glob("*.png")) == sorted(c.id for c in cases)
    for case in cases[:5]:
        real, trip = case.reference_image(), Image.open(out / f"{case.id}.png").convert("RGB")
        assert trip.size == real.size
        assert not np.array_equal(np.asarray(trip), np.asarray(real)), "no round trip happened"
        assert psnr(trip, real) > 18.0, "the round trip lost the image"
    bad = CliRunner().invoke(corpus_app, ["bench-refs", "--bench", "t2i-bench-mini", "--out", str(out),
                                          "--through-vae", str(tmp_path / "no-such-pipeline")])
    assert bad.exit_code == 2 and "--through-vae" in bad.output
