"""``fewstep bench score`` / ``score_bench`` on real bench images, locally and on S3 (moto)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from fewstep import storage
from fewstep.bench import world
from fewstep.bench.benches import load_bench
from fewstep.bench.judges.base import Judge, JudgeError
from fewstep.bench.judges.verdicts import EditVerdict, T2IVerdict
from fewstep.bench.scoring import load_images, score_bench, write_report
from fewstep.cli import app


class RecordingJudge(Judge):
    """A judge with fixed answers, to test the bookkeeping apart from any model."""

    name = "recording"

    def __init__(self, fail_on: set[str] = frozenset()) -> None:
        self.fail_on = fail_on
        self.seen: list[str] = []

    def judge_t2i(self, case, image):
        self.seen.append(case.id)
        if case.id in self.fail_on:
            raise JudgeError("endpoint said no")
        return T2IVerdict(score=4 if case.category == "portrait" else 2, reasoning="fixed")

    def judge_edit(self, case, source, output):
        self.seen.append(case.id)
        from fewstep.bench.judges.rubrics import edit_keys

        return EditVerdict(overall_score=3, sub_scores=dict(zip(edit_keys(case.category), (3, 4, 5))),
                           reasoning="fixed", failure_modes=[])


def test_score_bench_bookkeeping_missing_unreadable_and_errors():
    cases = load_bench("t2i-bench-mini")
    images = {c.id: c.reference_image() for c in cases[:-3]}  # last three (text) are missing
    images["not-a-case"] = Image.new("RGB", (8, 8))
    first_text = next(c.id for c in cases if c.category == "text")
    judge = RecordingJudge(fail_on={first_text})
    report = score_bench("t2i-bench-mini", images, judge, problems={cases[0].id: "broken.png: truncated"},
                         set_metrics=False, progress=False)
    assert report.n_cases == 60 and report.n_missing == 3 and report.n_failed == 2
    assert cases[0].id not in judge.seen and "not-a-case" not in judge.seen
    portrait = report.per_category["portrait"]
    assert portrait.mean_score == 4.0 and portrait.scored == 19 and portrait.failed == 1
    assert report.per_category["text"].scored == 16
    assert report.average == pytest.approx((4 + 2 + 2) / 3, abs=1e-3)
    assert report.average_missing_as_1 == pytest.approx((19 * 4 + 20 * 2 + 16 * 2 + 5 * 1) / 60, abs=1e-3)
    md = report.to_markdown()
    assert "| portrait | 20 | 19 | 4.000 |" in md and "endpoint said no" in md and "| missing |" in md


def test_a_crashing_judge_loses_only_that_case():
    class Crashing(RecordingJudge):
        def judge_t2i(self, case, image):
            if case.id.endswith("-001"):
                raise RuntimeError("boom")
            return super().judge_t2i(case, image)

    cases = load_bench("t2i-bench-mini")[:3]
    report = score_bench("t2i-bench-mini", {c.id: c.reference_image() for c in cases}, Crashing(),
                         set_metrics=False, progress=False)
    crashed = [r for r in report.cases if r.status == "error"]
    assert [r.case_id for r in crashed] == [cases[1].id] and "RuntimeError: boom" in crashed[0].error
    assert report.n_scored == 2


def test_edit_report_has_role_sub_scores():
    cases = load_bench("editing-bench-mini")
    report = score_bench("editing-bench-mini", {c.id: c.reference_image() for c in cases[:10]},
                         RecordingJudge(), set_metrics=False, progress=False)
    scene = report.per_category["scene"]
    assert scene.sub_scores == {"instruction": 3.0, "preservation": 4.0, "quality": 5.0}
    assert report.per_category["style"].scored == 0 and report.per_category["style"].mean_score is None
    assert "| scene | 10 | 10 | 3.000 | 3.000 | 4.000 | 5.000 |" in report.to_markdown()


def test_load_images_reports_bad_files_and_ignores_subfolders(tmp_path):
    cases = load_bench("t2i-bench-mini")
    a, b, c = cases[0].id, cases[1].id, cases[2].id
    (tmp_path / f"{a}.png").write_bytes(world.png_bytes(cases[0].reference_image()))
    (tmp_path / f"{b}.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "sources").mkdir()
    (tmp_path / "sources" / f"{c}.png").write_bytes(world.png_bytes(cases[2].reference_image()))
    (tmp_path / "notes.txt").write_text("x")
    images, problems = load_images(str(tmp_path), [x.id for x in cases])
    assert set(images) == {a} and set(problems) == {b} and "cannot decode" in problems[b]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_images(str(tmp_path / "absent"), [a])


def test_cli_scores_real_images_from_s3_and_writes_tables(s3_options, s3_bucket, monkeypatch, tmp_path):
    """Real held-out renders of 2 cases per category on S3, the rest missing: tables and JSONL on S3."""
    monkeypatch.setenv("FEWSTEP_S3_ENDPOINT_URL", s3_options.endpoint_url)
    from fewstep.settings import get_settings

    get_settings.cache_clear()
    cases = load_bench("t2i-bench-mini")
    chosen = [c for cat in ("portrait", "landscape", "text") for c in [x for x in cases if x.category == cat][:2]]
    images_uri = f"{s3_bucket}/gen"
    for case in chosen:
        storage.write_bytes_atomic(f"{images_uri}/{case.id}.png", world.png_bytes(case.reference_image()),
                                   s3_options)
    out = f"{s3_bucket}/scores"
    result = CliRunner().invoke(app, ["bench", "score", "--bench", "t2i-bench-mini", "--images", images_uri,
                                      "--out", out])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    summary = storage.read_json(f"{out}/scores.json", s3_options)
    assert summary["n_scored"] == 6 and summary["n_missing"] == 54
    for cat in ("portrait", "landscape", "text"):
        assert summary["per_category"][cat]["mean_score"] >= 4.5, summary["per_category"][cat]
        assert "kid" in summary["per_category"][cat]["set_metrics"]
    lines = [json.loads(x) for x in storage.read_bytes(f"{out}/cases.jsonl", s3_options).decode().splitlines()]
    scored = [x for x in lines if x["status"] == "scored"]
    assert len(lines) == 60 and len(scored) == 6
    assert set(scored[0]["verdict"]) == {"score", "reasoning"}
    assert "| portrait | 20 | 2 |" in storage.read_bytes(f"{out}/scores.md", s3_options).decode()


def test_cli_judge_prints_the_paper_json(tmp_path):
    case = next(c for c in load_bench("editing-bench-mini") if c.category == "text")
    path = tmp_path / "out.png"
    path.write_bytes(world.png_bytes(case.reference_image()))
    result = CliRunner().invoke(app, ["bench", "judge", "--bench", "editing-bench-mini", "--case", case.id,
                                      "--image", str(path)])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.output)
    assert set(verdict) == {"overall_score", "sub_scores", "reasoning", "failure_modes"}
    assert set(verdict["sub_scores"]) == {"text_accuracy", "unedited_region_preservation", "visual_quality"}
    assert verdict["overall_score"] >= 4

    bad = CliRunner().invoke(app, ["bench", "judge", "--bench", "editing-bench-mini", "--case", "nope",
                                   "--image", str(path)])
    assert bad.exit_code != 0 and "no case 'nope'" in bad.output


def test_write_report_locally(tmp_path):
    cases = load_bench("t2i-bench-mini")
    report = score_bench("t2i-bench-mini", {cases[0].id: cases[0].reference_image()}, RecordingJudge(),
                         set_metrics=False, progress=False)
    paths = write_report(report, str(tmp_path / "r"))
    assert json.loads((tmp_path / "r" / "scores.json").read_text())["n_scored"] == 1
    assert len((tmp_path / "r" / "cases.jsonl").read_text().splitlines()) == 60
    assert paths["scores.md"].endswith("scores.md")
