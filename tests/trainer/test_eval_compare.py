"""Paired, case-by-case comparison of evaluated models (``fewstep eval-compare``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from trainer.evaluate.compare import compare_scores, sign_test


def test_sign_test_matches_the_binomial_tail():
    # 8 wins, 6 losses: P[X >= 8], X ~ Bin(14, 1/2)
    expected = sum(math.comb(14, k) for k in range(8, 15)) / 2**14
    p_better, p_two = sign_test(8, 6)
    assert p_better == pytest.approx(expected) and p_better == pytest.approx(0.3953, abs=1e-4)
    assert p_two == pytest.approx(2 * expected)  # the smaller tail, doubled
    assert sign_test(10, 0)[0] == pytest.approx(1 / 1024)  # ten straight wins
    assert sign_test(0, 0) == (1.0, 1.0)  # all ties: no evidence either way


def test_compare_counts_wins_on_shared_cases_only():
    a = {"c1": 3, "c2": 2, "c3": 2, "c4": 5, "only-a": 5}
    b = {"c1": 2, "c2": 2, "c3": 4, "c4": 1, "only-b": 1}
    result = compare_scores("t2i-bench-mini", "student", "teacher", a, b)
    assert (result.cases, result.wins, result.losses, result.ties) == (4, 2, 1, 1)
    assert result.mean_diff == pytest.approx((1 + 0 - 2 + 4) / 4)
    assert result.ci_low <= result.mean_diff <= result.ci_high
    assert not result.clearly_better()  # 2 wins against 1 is no evidence
    saved = result.as_dict()
    assert saved["clearly_better"] is False
    assert type(result).from_dict(saved) == result  # report.json round trip


def test_many_wins_and_few_losses_are_clearly_better():
    a = {f"c{i}": 3.0 for i in range(40)}
    b = {f"c{i}": (2.0 if i < 14 else 4.0 if i < 16 else 3.0) for i in range(40)}  # 14 wins, 2 losses
    result = compare_scores("editing-bench-mini", "a", "b", a, b)
    assert (result.wins, result.losses, result.ties) == (14, 2, 24)
    assert result.clearly_better() and result.p_better < 0.01
    with pytest.raises(ValueError, match="share no scored case"):
        compare_scores("t2i-bench-mini", "a", "b", {"x": 1.0}, {"y": 1.0})


def test_draws_of_a_case_are_averaged_before_pairing():
    # Four draws per case: A's mean beats B's in c1 and c2, loses in c3; each case counts once.
    a = {"c1": [3, 3, 2, 3], "c2": [2, 2, 2, 3], "c3": [1, 2, 2, 2]}
    b = {"c1": [3, 2, 2, 2], "c2": [2, 2, 2, 2], "c3": [2, 2, 2, 2]}
    result = compare_scores("t2i-bench-mini", "a", "b", a, b)
    assert (result.cases, result.wins, result.losses, result.ties) == (3, 2, 1, 0)
    assert (result.draws_a, result.draws_b) == (4, 4)
    assert result.mean_a == pytest.approx((2.75 + 2.25 + 1.75) / 3)
    assert result.mean_diff == pytest.approx((0.5 + 0.25 - 0.25) / 3)
    # A single score and a one-draw list are the same thing.
    single = compare_scores("t2i-bench-mini", "a", "b", {"c1": 3.0}, {"c1": [2.0]})
    assert (single.wins, single.draws_a, single.draws_b) == (1, 1, 1)


def _list_model(root: Path, model: str) -> None:
    """report.json lists the eval's models, as eval writes it."""
    report = root / "report.json"
    data = json.loads(report.read_text()) if report.exists() else {"models": {}}
    data["models"][model] = {}
    report.write_text(json.dumps(data))


def _write_eval(root: Path, model: str, scores: dict[str, float], bench: str = "t2i-bench-mini") -> None:
    folder = root / "cases" / model
    folder.mkdir(parents=True)
    lines = [json.dumps({"bench": bench, "case_id": case, "score": score}) for case, score in scores.items()]
    (folder / f"{bench}.jsonl").write_text("\n".join(lines) + "\n")
    _list_model(root, model)


def test_cli_compares_models_of_two_eval_folders(tmp_path):
    from fewstep.cli import app

    _write_eval(tmp_path / "eval-a", "student-4", {f"c{i}": 3.0 + (i < 12) for i in range(30)})
    _write_eval(tmp_path / "eval-b", "teacher-4", {f"c{i}": 3.0 + (i == 29) for i in range(30)})
    runner = CliRunner()
    result = runner.invoke(app, ["eval-compare", f"{tmp_path / 'eval-a'}:student-4",
                                 f"{tmp_path / 'eval-b'}:teacher-4", "--json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["a"], row["b"], row["wins"], row["losses"], row["ties"]) == ("student-4", "teacher-4", 12, 1, 17)
    assert row["clearly_better"] is True

    missing = runner.invoke(app, ["eval-compare", f"{tmp_path / 'eval-a'}:nobody", f"{tmp_path / 'eval-b'}:teacher-4"])
    assert missing.exit_code == 2 and "'nobody' is not a model of that eval" in missing.output
    # Case files an earlier eval left in the folder are not this eval's model.
    (tmp_path / "eval-a" / "cases" / "old-student").mkdir()
    stale = runner.invoke(app, ["eval-compare", f"{tmp_path / 'eval-a'}:old-student", f"{tmp_path / 'eval-b'}:teacher-4"])
    assert stale.exit_code == 2 and "not a model of that eval" in stale.output
    nothing = runner.invoke(app, ["eval-compare", f"{tmp_path / 'nowhere'}:a", f"{tmp_path / 'eval-b'}:teacher-4"])
    assert nothing.exit_code == 2 and "no report.json" in nothing.output
    _write_eval(tmp_path / "eval-c", "fewer", {f"c{i}": 3.0 for i in range(20)})
    partial = runner.invoke(app, ["eval-compare", f"{tmp_path / 'eval-c'}:fewer", f"{tmp_path / 'eval-b'}:teacher-4",
                                  "--json"])
    assert partial.exit_code == 0 and "different cases (0 only in A, 10 only in B)" in partial.stderr
    assert json.loads(partial.stdout)[0]["cases"] == 20
    malformed = runner.invoke(app, ["eval-compare", "no-colon", f"{tmp_path / 'eval-b'}:teacher-4"])
    assert malformed.exit_code == 2 and "EVAL_DIR:MODEL" in malformed.output


def _text_case(case: str, chars: float, bench: str = "t2i-bench-val", score: float = 2.0) -> dict:
    """A case record as eval writes it: T2I text keeps the OCR under `core`, edits under `attribute`."""
    part = "core" if bench.startswith("t2i") else "attribute"
    details = {"measurements": {"category": "text", part: {"ocr": {"char_accuracy": chars, "text": "X"}}}}
    return {"bench": bench, "case_id": case, "score": score, "category": "text", "details": details}


def test_text_char_accuracy_reads_t2i_and_edit_verdicts_and_skips_other_cases():
    from trainer.evaluate.compare import text_char_accuracy

    assert text_char_accuracy(_text_case("a", 0.25)["details"]) == 0.25
    assert text_char_accuracy(json.dumps(_text_case("b", 0.5, "editing-bench-val")["details"])) == 0.5
    assert text_char_accuracy({"measurements": {"category": "portrait", "core": {"ocr": {"char_accuracy": 1}}}}) is None
    assert text_char_accuracy(None) is None


def test_cli_compares_text_characters_where_every_text_score_ties(tmp_path):
    """Both models score 2 on every text case; B reads more characters on 8 of 10."""
    from fewstep.cli import app

    for root, model, chars in (("eval-a", "base", lambda i: 0.0), ("eval-b", "text", lambda i: 0.25 * (i < 8))):
        folder = tmp_path / root / "cases" / model
        folder.mkdir(parents=True)
        rows = [_text_case(f"t{i}", chars(i)) for i in range(10)]
        rows += [{"bench": "t2i-bench-val", "case_id": f"p{i}", "score": 4.0, "category": "portrait",
                  "details": {"measurements": {"category": "portrait"}}} for i in range(5)]
        (folder / "t2i-bench-val.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        _list_model(tmp_path / root, model)
    runner = CliRunner()
    args = ["eval-compare", f"{tmp_path / 'eval-b'}:text", f"{tmp_path / 'eval-a'}:base", "--json"]
    (by_score,) = json.loads(runner.invoke(app, args).output)
    assert (by_score["cases"], by_score["wins"], by_score["ties"]) == (15, 0, 15)
    result = runner.invoke(app, [*args, "--metric", "text_chars"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert (row["cases"], row["wins"], row["losses"], row["ties"]) == (10, 8, 0, 2)
    assert row["mean_a"] == pytest.approx(0.2) and row["clearly_better"] is True
    bad = runner.invoke(app, [*args, "--metric", "words"])
    assert bad.exit_code == 2 and "text_chars" in bad.output


def test_eval_tables_show_text_characters_only_where_text_cases_exist():
    from trainer.evaluate.report import bench_table, summarise

    models = [{"name": m, "role": "teacher", "nfe": 80, "guidance_scale": 4.0, "shift": None, "path": "/x"}
              for m in ("base", "text")]
    timing = {"encode_s": 0.0, "sample_s": 1.0, "decode_s": 0.0, "network_calls": 160}
    rows = []
    for model, chars in (("base", 0.1), ("text", 0.3)):
        rows.append({**_text_case("t0", chars), "model": model, **timing, "details": json.dumps(_text_case("t0", chars)["details"])})
        rows.append({"bench": "editing-bench-val", "case_id": "e0", "category": "style", "score": 3.0,
                     "model": model, "details": json.dumps({"measurements": {"category": "style"}}), **timing})
    summary = summarise(models, rows)
    assert summary["text"]["benches"]["t2i-bench-val"]["text_chars"] == pytest.approx(0.3)
    assert summary["text"]["benches"]["editing-bench-val"]["text_chars"] is None
    t2i = bench_table("t2i-bench-val", summary)
    assert t2i.splitlines()[0].endswith("| overall | text chars |") and "| 0.300 |" in t2i
    assert "text chars" not in bench_table("editing-bench-val", summary)
