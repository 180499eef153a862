"""``fewstep eval`` on tiny models: per-case JSON, per-category tables and grids, NFE and
network-call counts (a teacher with CFG costs two calls per step, a student one), and several
seeded draws per case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.trainer.dmd_world import tiny_teacher

TEACHER_NFE, STUDENT_NFE = 3, 2
DRAWS = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from fewstep.models.adapter import QwenImageAdapter
    from trainer.export import export_student

    root = tmp_path_factory.mktemp("eval")
    teacher = tiny_teacher(root)
    ad = QwenImageAdapter.load(teacher, components=("transformer",))
    student = export_student(ad.transformer, teacher, str(root / "student"), num_steps=STUDENT_NFE, shift=2.0)
    return root, teacher, student


def test_resolve_model_defaults(models):
    from trainer.evaluate.config import ModelEntry
    from trainer.evaluate.run import resolve_model

    _, teacher, student = models
    t = resolve_model(ModelEntry(name="t", path=teacher, role="teacher"))
    s = resolve_model(ModelEntry(name="s", path=student, role="student"))
    assert (t["nfe"], t["guidance_scale"]) == (80, 4.0)
    assert (s["nfe"], s["guidance_scale"], s["shift"]) == (STUDENT_NFE, 1.0, 2.0)
    # The fixture's student is the teacher's transformer exported unchanged: same digests.
    assert set(t["weights"]) == {"transformer", "vae", "text_encoder"} and s["weights"] == t["weights"]


def test_model_fingerprint_tells_a_changed_component(models, tmp_path):
    """Eval reports record a digest per component, so a path whose weights changed is visible."""
    import shutil

    from safetensors.torch import load_file, save_file

    from fewstep.models.info import fingerprint

    _, _, student = models
    copy = tmp_path / "student-copy"
    shutil.copytree(student, copy)
    assert fingerprint(str(copy)) == fingerprint(student)
    weights = next((copy / "transformer").glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3
    save_file(tensors, weights)
    changed, original = fingerprint(str(copy)), fingerprint(student)
    assert changed["transformer"] != original["transformer"]
    assert {k: v for k, v in changed.items() if k != "transformer"} == \
        {k: v for k, v in original.items() if k != "transformer"}


def test_model_fingerprint_on_s3_uses_object_tags_not_downloads(models, s3_bucket, s3_options, monkeypatch):
    """A checkpoint on S3 is named from its objects' ETags: a changed file changes its component's
    digest, and no weight file is read for it."""
    from fewstep import storage
    from fewstep.models.info import fingerprint

    _, _, student = models
    remote = f"{s3_bucket}/student"
    for path in Path(student).rglob("*"):
        if path.is_file():
            storage.upload_file_atomic(path, f"{remote}/{path.relative_to(student).as_posix()}", s3_options)

    def no_download(uri, options=None):
        raise AssertionError(f"read {uri} to name it")

    monkeypatch.setattr(storage, "sha256_of", no_download)
    first = fingerprint(remote, s3_options)
    assert set(first) == {"transformer", "vae", "text_encoder"}
    assert all(v.startswith("etag-") for v in first.values()) and fingerprint(remote, s3_options) == first
    vae = next(f for f in storage.list_files(f"{remote}/vae", ".safetensors", s3_options))
    storage.write_bytes_atomic(vae, storage.read_bytes(vae, s3_options) + b" ", s3_options)
    changed = fingerprint(remote, s3_options)
    assert changed["vae"] != first["vae"]
    assert (changed["transformer"], changed["text_encoder"]) == (first["transformer"], first["text_encoder"])


def test_eval_writes_cases_tables_grids_with_nfe_counts(models, ray_cluster):
    from fewstep.bench.world import EDIT_CATEGORIES, T2I_CATEGORIES
    from fewstep.config import parse_config
    from trainer.evaluate.config import EvalConfig
    from trainer.evaluate.run import run_eval

    root, teacher, student = models
    cfg = parse_config(EvalConfig, {
        "models": [
            {"name": "teacher", "path": teacher, "role": "teacher", "nfe": TEACHER_NFE, "guidance_scale": 2.0},
            {"name": "student", "path": student},  # no role: an exported student says it is one
        ],
        "cases_per_category": 1, "resolution": 32, "batch_size": 8, "grid_cases": 2, "seeds_per_case": DRAWS,
    })
    out = root / "report"
    report = run_eval(cfg, str(out), progress=False)
    teacher_m, student_m = report["models"]["teacher"], report["models"]["student"]
    assert teacher_m["weights"]["vae"] and teacher_m["weights"] == student_m["weights"]
    assert teacher_m["nfe"] == TEACHER_NFE and student_m["nfe"] == STUDENT_NFE
    assert teacher_m["network_calls_per_image"] == 2 * TEACHER_NFE  # true CFG: cond + uncond
    assert student_m["network_calls_per_image"] == STUDENT_NFE
    assert (teacher_m["role"], student_m["role"]) == ("teacher", "student")
    for m in (teacher_m, student_m):
        assert m["seconds_per_image"] > 0
        # Each bench reports its own cost; together they make up the model's.
        per_bench = [(b["seconds_per_image"], b["cases"] * b["draws_per_case"]) for b in m["benches"].values()]
        assert all(sec > 0 for sec, _ in per_bench)
        assert sum(sec * n for sec, n in per_bench) / sum(n for _, n in per_bench) == \
            pytest.approx(m["seconds_per_image"])
        assert {b["network_calls_per_image"] for b in m["benches"].values()} == {m["network_calls_per_image"]}
        assert m["images"] == DRAWS * (len(T2I_CATEGORIES) + len(EDIT_CATEGORIES))
        assert list(m["benches"]) == cfg.benches  # the config's order, whatever order rows arrived in
        assert list(m["benches"]["t2i-bench-mini"]["categories"]) == list(T2I_CATEGORIES)
        assert 1 <= m["benches"]["t2i-bench-mini"]["score"] <= 5
        edit_m = m["benches"]["editing-bench-mini"]
        assert (edit_m["cases"], edit_m["draws_per_case"]) == (len(EDIT_CATEGORIES), DRAWS)

    for model in ("teacher", "student"):
        lines = (out / "cases" / model / "editing-bench-mini.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert sorted(r["category"] for r in records) == sorted(EDIT_CATEGORIES * DRAWS)
        for r in records:
            assert {"overall_score", "sub_scores", "reasoning", "failure_modes"} <= set(r["verdict"])
            assert (out / r["image"]).exists()
        # Each draw of a case has its own seed and noise, so its own image.
        by_case: dict[str, list[dict]] = {}
        for r in records:
            by_case.setdefault(r["case_id"], []).append(r)
        for draws in by_case.values():
            assert sorted(r["draw"] for r in draws) == list(range(DRAWS))
            assert len({r["seed"] for r in draws}) == DRAWS
            assert len({(out / r["image"]).read_bytes() for r in draws}) == DRAWS
    with open(out / "tables" / "t2i-bench-mini.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["model"] for r in rows] == ["teacher", "student"]
    assert [r["NFE"] for r in rows] == [str(TEACHER_NFE), str(STUDENT_NFE)]
    assert set(T2I_CATEGORIES) <= set(rows[0])
    for bench, categories in (("t2i-bench-mini", T2I_CATEGORIES), ("editing-bench-mini", EDIT_CATEGORIES)):
        for category in categories:
            assert (out / "grids" / bench / f"{category}.png").stat().st_size > 0
    assert "| teacher | teacher | 3 |" in (out / "report.md").read_text()
    saved = json.loads(Path(out / "report.json").read_text())
    assert saved["models"]["student"]["role"] == "student"
    # The student against the teacher, case by case, on each bench.
    paired = {r["bench"]: r for r in saved["paired"]}
    assert set(paired) == {"t2i-bench-mini", "editing-bench-mini"}
    edit = paired["editing-bench-mini"]
    assert (edit["a"], edit["b"]) == ("student", "teacher")
    # The case, not the draw, is the unit of the paired test: draws are averaged first.
    assert edit["wins"] + edit["losses"] + edit["ties"] == edit["cases"] == len(EDIT_CATEGORIES)
    assert (edit["draws_a"], edit["draws_b"]) == (DRAWS, DRAWS)
    assert edit["mean_diff"] == pytest.approx(student_m["benches"]["editing-bench-mini"]["score"]
                                              - teacher_m["benches"]["editing-bench-mini"]["score"])
    assert "## Paired by case" in (out / "report.md").read_text()


def test_eval_refuses_what_would_fail_after_sampling_and_replaces_an_earlier_eval(models, tmp_path):
    """Checks that need no sampling run first (no Ray starts for them); an --out with an earlier
    eval is emptied of its results, so no old model's cases sit beside the new ones."""
    import shutil

    from fewstep.models.pipeline_dir import NotAPipelineError
    from fewstep.storage import StorageError
    from trainer.evaluate.config import EvalConfig
    from trainer.evaluate.run import clear_previous_eval, run_eval

    _, teacher, _ = models
    config = EvalConfig.model_validate({"models": [{"name": "t", "path": teacher}], "cases_per_category": 1})
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(StorageError, match="--out: .*a-file is a file"):
        run_eval(config, str(a_file), progress=False)
    broken = tmp_path / "no-transformer"
    shutil.copytree(teacher, broken)
    shutil.rmtree(broken / "transformer")
    with pytest.raises(NotAPipelineError, match="no-transformer/transformer is missing or empty"):
        run_eval(EvalConfig.model_validate({"models": [{"name": "t", "path": str(broken)}]}),
                 str(tmp_path / "out"), progress=False)

    old = tmp_path / "old-eval"
    for rel in ("cases/old-model/t2i-bench-mini.jsonl", "images/old-model/a.png", "tables/t2i-bench-mini.md",
                "report.json", "notes.txt"):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text("{}")
    clear_previous_eval(str(old), None)
    assert sorted(p.name for p in old.iterdir()) == ["notes.txt"]  # the user's own file stays


def test_eval_config_refuses_settings_that_would_mislead():
    from fewstep.config import ConfigError, parse_config
    from trainer.evaluate.config import EvalConfig
    from trainer.evaluate.run import plan_items

    base = {"models": [{"name": "t", "path": "/x"}]}
    for change, field in (({"benches": []}, "benches"), ({"benches": ["t2i-bench-mini"] * 2}, "each bench once"),
                          ({"resolution": 36}, "resolution"), ({"models": [{"name": "..", "path": "/x"}]}, "dots")):
        with pytest.raises(ConfigError, match=field):
            parse_config(EvalConfig, {**base, **change})
    # The teachers' cap only ever lowers their case count.
    cfg = EvalConfig.model_validate({**base, "benches": ["t2i-bench-mini"], "cases_per_category": 1,
                                     "teacher_cases_per_category": 2})
    teacher = {"name": "t", "nfe": 80}
    assert sum(len(i["draws"]) for i in plan_items(cfg, [teacher])) == 3
