"""The curate stage end to end on Ray: bench corpus + planted bad inputs, local and on moto S3.

One local run (mixed preset, corpus + bad T2I Parquet + bad edit JSONL + broken files) is shared
by several tests; the S3 run repeats it with input and output on ``s3://`` and must publish the
same bytes. A second, small run covers the other formats (bad T2I JSONL, bad edit Parquet) with
the default keep-all composition and the NSFW filter on.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from fewstep import storage
from fewstep.contract import CURATED_SCHEMA, REJECT_REASONS, REJECT_SCHEMA, check_manifest
from pipelines.curate.config import CurateConfig

PRESETS = Path(__file__).resolve().parents[2] / "configs" / "curate"
MAIN_BAD = ("t2i.parquet", "edit.jsonl", "empty.parquet", "truncated.parquet", "empty.jsonl")


def _config(name: str, **overrides) -> CurateConfig:
    from fewstep.bench.badinputs import ASSUMED_LIMITS
    from fewstep.config import load_config

    base = {"filters.text.banned_words": ASSUMED_LIMITS["banned_words"]}
    return load_config(CurateConfig, PRESETS / f"{name}.yaml", {**base, **overrides})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from fewstep.bench.badinputs import write_bad_inputs
    from fewstep.bench.corpus.build import build_corpus

    root = tmp_path_factory.mktemp("curate-world")
    build_corpus(str(root / "corpus"), preset="small")
    write_bad_inputs(str(root / "bad"))
    return root


def _main_inputs(root: str) -> list[str]:
    return [storage.join(root, "corpus")] + [storage.join(root, "bad", name) for name in MAIN_BAD]


@pytest.fixture(scope="module")
def local_run(world, ray_cluster):
    from pipelines.curate.run import run_curate

    out = str(world / "out-local")
    # NSFW is covered by the second run; here it would only add ~30 s of ResNet-50 on 2 cores.
    report = run_curate(_config("mixed", **{"filters.nsfw.enabled": False}), _main_inputs(str(world)), out)
    return report, out


def _rejects(out: str, options=None) -> list[dict]:
    rows = []
    for uri in storage.list_files(storage.join(out, "rejects"), ".parquet", options):
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))
        assert table.schema.equals(REJECT_SCHEMA, check_metadata=False)
        rows.extend(table.to_pylist())
    return rows


def _curated(out: str, options=None):
    import pyarrow as pa

    manifest = check_manifest(storage.read_json(storage.join(out, "manifest.json"), options), "curated")
    tables = []
    for entry in manifest["shards"]:
        uri = storage.join(out, entry["path"])
        assert storage.sha256_of(uri, options) == entry["sha256"]
        assert storage.size_of(uri, options) == entry["bytes"]
        table = pq.read_table(io.BytesIO(storage.read_bytes(uri, options)))
        assert table.num_rows == entry["rows"]
        assert table.schema.equals(CURATED_SCHEMA, check_metadata=False)
        tables.append(table)
    return manifest, pa.concat_tables(tables)


def _expected_refs(world: Path, files: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Input ref ("t2i.parquet#row=3", "edit.jsonl#line=4") -> (case name, expected outcome)."""
    expected = json.loads((world / "bad" / "expected.json").read_text())
    refs = {}
    for name in files:
        for index, case in enumerate(expected["records"][name]):
            ref = f"{name}#row={index}" if name.endswith(".parquet") else f"{name}#line={index + 1}"
            refs[ref] = (case["name"], case["expected"])
    return refs


def _check_planted(world: Path, rejects: list[dict], files: tuple[str, ...], allowed_for_keep: set[str]):
    by_ref = {r["input"]: r for r in rejects}
    wrong = []
    for ref, (name, expected) in _expected_refs(world, files).items():
        got = by_ref.get(ref, {}).get("reason", "keep")
        if expected == "keep":
            if got != "keep" and got not in allowed_for_keep:
                wrong.append((ref, name, expected, got, by_ref[ref]["detail"]))
        elif got != expected:
            wrong.append((ref, name, expected, got, by_ref.get(ref, {}).get("detail")))
    assert not wrong, "planted records with the wrong outcome:\n" + "\n".join(map(str, wrong))


def test_every_planted_bad_record_gets_its_reason(world, local_run):
    report, out = local_run
    rejects = _rejects(out)
    # Good records of the bad-input set may only be dropped by the rebalancer (mixed keeps 80 per category).
    _check_planted(world, rejects, ("t2i.parquet", "edit.jsonl"), allowed_for_keep={"over_budget", "not_in_composition"})
    file_rejects = {r["input"]: r["reason"] for r in rejects if "#" not in r["input"]}
    assert file_rejects == {"empty.parquet": "malformed_row", "truncated.parquet": "malformed_row"}
    assert all(r["reason"] in REJECT_REASONS for r in rejects)
    # The bench corpus itself is clean: apart from rebalancing, at most a couple of its records go.
    corpus_filtered = [r for r in rejects if r["input"].startswith("corpus/") and r["reason"] not in ("over_budget", "not_in_composition")]
    assert len(corpus_filtered) <= 3, corpus_filtered


def test_counts_reconcile_and_preset_is_exact(world, local_run):
    report, out = local_run
    rejects = _rejects(out)
    expected = json.loads((world / "bad" / "expected.json").read_text())["records"]
    planted = len(expected["t2i.parquet"]) + len(expected["edit.jsonl"]) + 2  # + two broken files
    assert report["input_rows"] == 600 + planted
    assert report["input_rows"] == report["kept_rows"] + report["rejected_rows"]
    assert report["rejected_rows"] == len(rejects) == sum(report["rejected_by_reason"].values())
    assert report["target"] == {"t2i": {"landscape": 80, "portrait": 80, "text": 80}}
    assert report["achieved"]["t2i"] == report["target"]["t2i"]
    assert report["exact"] and report["shortfalls"] == []
    assert report["kept_rows"] == report["output_rows"] == 240
    assert json.loads(Path(out, "composition.json").read_text()) == report


def test_curated_output_follows_the_contract(local_run):
    report, out = local_run
    manifest, table = _curated(out)
    assert manifest["totals"]["rows"] == table.num_rows == 240
    assert manifest["config_hash"] == report["config_hash"]
    rows = table.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    assert {(r["task"], r["category"]) for r in rows} == {("t2i", c) for c in ("landscape", "portrait", "text")}
    for row in rows[:40]:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.mode == "RGB"
        assert json.loads(row["meta"])["curate"]["category_origin"] == "given"
    assert all(r["caption_origin"] == "given" and r["id"] == r["origin_id"] for r in rows)
    stats = Path(out, "stats")
    assert "NsfwFilter" not in (stats / "filter_tag.txt").read_text()
    assert "TagRows" in (stats / "filter_tag.txt").read_text() and (stats / "write.txt").stat().st_size > 0


def test_a_curated_set_curates_again_to_another_composition(world, local_run):
    """Rebalancing an existing curated set: its directory is the input, every row is kept or
    rejected with a reason, and the kept rows are the first run's rows unchanged."""
    from pipelines.curate.run import run_curate

    _, first = local_run
    out = str(world / "out-again")
    report = run_curate(_config("text", **{"filters.nsfw.enabled": False}), [first], out)
    assert report["input_rows"] == 240 == report["kept_rows"] + report["rejected_rows"]
    assert report["exact"] and report["target"] == {"t2i": {"text": 80}}
    assert report["achieved"] == {"t2i": {"landscape": 0, "portrait": 0, "text": 80}}
    reasons = {(r["detail"].split(" ")[0].split(":")[0], r["reason"]) for r in _rejects(out)}
    # Categories the composition does not list are named as such, not as over their budget.
    assert reasons == {("t2i/portrait", "not_in_composition"), ("t2i/landscape", "not_in_composition")}
    _, before = _curated(first)
    _, after = _curated(out)
    by_id = {r["id"]: r for r in before.to_pylist()}
    for row in after.to_pylist():
        assert (row["prompt"], row["category"], row["image"]) == tuple(by_id[row["id"]][k] for k in ("prompt", "category", "image"))


def test_s3_run_publishes_the_same_dataset(world, local_run, s3_bucket, s3_options):
    from pipelines.curate.run import run_curate

    fs, _ = storage.resolve(s3_bucket, s3_options)
    for sub in ("corpus", "bad"):
        for path in sorted((world / sub).rglob("*")):
            if path.is_file():
                key = f"{s3_bucket}/{path.relative_to(world)}"
                storage.write_bytes_atomic(key, path.read_bytes(), s3_options)
    out = f"{s3_bucket}/curated"
    report = run_curate(_config("mixed", **{"filters.nsfw.enabled": False}), _main_inputs(s3_bucket), out,
                        storage=s3_options)
    local_report, local_out = local_run
    drop = ("inputs", "seconds")
    assert {k: v for k, v in report.items() if k not in drop} == {
        k: v for k, v in local_report.items() if k not in drop}
    s3_manifest, _ = _curated(out, s3_options)
    local_manifest, _ = _curated(local_out)
    assert s3_manifest["shards"] == local_manifest["shards"]  # same bytes, same checksums
    assert _rejects(out, s3_options) == _rejects(local_out)
    assert storage.exists(f"{out}/stats/filter_tag.txt", s3_options)


def test_other_formats_and_nsfw_keep_all(world, ray_cluster):
    from pipelines.curate.run import run_curate

    out = str(world / "out-formats")
    inputs = [str(world / "bad" / "t2i.jsonl"), str(world / "bad" / "edit.parquet")]
    report = run_curate(_config("default"), inputs, out)
    rejects = _rejects(out)
    _check_planted(world, rejects, ("t2i.jsonl", "edit.parquet"), allowed_for_keep=set())
    _, table = _curated(out)
    assert report["kept_rows"] == table.num_rows == report["output_rows"]
    assert report["input_rows"] == report["kept_rows"] + report["rejected_rows"]
    # NSFW ran (the world's images are harmless: no record is rejected for it).
    stats = Path(out, "stats", "filter_tag.txt").read_text()
    assert "NsfwFilter" in stats
    assert "nsfw" not in report["rejected_by_reason"]
    # The network runs in an operator of its own: CPU preprocessing is not fused into it, so it
    # runs beside the network rather than in series with it.
    assert re.search(r"Operator \d+ MapBatches\(NsfwFilter\):", stats), stats[:2000]
    assert "nsfw_inputs_op" in stats


def test_cli_captions_and_tags_prompt_less_images(ray_cluster, tmp_path):
    """``fewstep curate`` with the bench captioner: images without prompt or category get both."""
    import base64

    from typer.testing import CliRunner

    from fewstep.bench import world as tiny_world
    from fewstep.cli import app

    font = next(iter(tiny_world.FONTS))
    scenes = [("portrait", {"subject": "woman_cook", "position": "left", "size": "large"}),
              ("portrait", {"subject": "baby", "position": "center", "size": "large", "background": "red"}),
              ("landscape", {"subject": "cactus", "position": "center", "size": "large", "background": "orange"}),
              ("landscape", {"subject": "whale", "position": "right", "size": "large", "background": "blue"}),
              ("text", {"text": "JAZZ", "font": font, "text_color": "white", "size": "large", "background": "blue"}),
              ("text", {"text": "GOLD", "font": font, "text_color": "black", "size": "large", "background": "green"})]
    lines = []
    for index, (category, fields) in enumerate(scenes):
        image = tiny_world.render_t2i(tiny_world.make_attrs(category, **{"background": "teal", **fields}), 64)
        buf = io.BytesIO()
        image.save(buf, "PNG")
        lines.append(json.dumps({"id": f"raw-{index}", "image": "data:image/png;base64,"
                                 + base64.b64encode(buf.getvalue()).decode(), "source": "camera"}))
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [
        "curate", "--config", str(PRESETS / "default.yaml"), "--input", str(tmp_path / "raw.jsonl"),
        "--output", str(out), "--set", "captioning.captioner=bench", "--set", "filters.nsfw.enabled=false"])
    assert result.exit_code == 0, result.output
    assert "input rows" in result.output and "composition" in result.output
    _, table = _curated(str(out))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {f"raw-{i}" for i in range(len(scenes))}
    for row in rows.values():
        meta = json.loads(row["meta"])
        assert row["caption_origin"] == "captioned" and meta["caption"]["captioner"] == "bench"
        assert meta["curate"]["category_origin"] == "tagged"
    right = sum(rows[f"raw-{i}"]["category"] == category for i, (category, _) in enumerate(scenes))
    assert right >= len(scenes) - 1, {k: (r["prompt"], r["category"]) for k, r in rows.items()}
    assert "JAZZ" in rows["raw-4"]["prompt"] and "cactus" in rows["raw-2"]["prompt"]
    assert "woman cook" in rows["raw-0"]["prompt"]
    first, jazz = (json.loads(rows[k]["meta"])["caption"] for k in ("raw-0", "raw-4"))
    assert (first["kind"], first["subject"], first["position"]) == ("subject", "woman_cook", "left")
    assert (jazz["kind"], jazz["text"], jazz["original_prompt"]) == ("text", "JAZZ", None)


def test_cli_reports_usage_errors(tmp_path):
    from typer.testing import CliRunner

    from fewstep.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["curate", "--config", str(PRESETS / "mixed.yaml"), "--input",
                                 str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 2 and "not found" in result.output
    result = runner.invoke(app, ["curate", "--config", str(PRESETS / "mixed.yaml"), "--input", str(tmp_path),
                                 "--output", str(tmp_path / "o"), "--set", "composition.totl=3"])
    assert result.exit_code == 2 and "composition.totl" in result.output
    help_text = runner.invoke(app, ["curate", "--help"]).output
    assert "--input" in help_text and "ratio-7-3" in help_text
