"""precompute: real tiny teacher, real Ray Data actor pools, real moto S3, a real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fewstep import contract, storage
from pipelines.precompute import PrecomputeConfig, PrecomputeError, run_precompute
from pipelines.precompute.encode import decode_image
from pipelines.precompute.fixtures import curated_rows, write_curated
from pipelines.shards import collate_shard_rows, load_empty_prompt

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "rows_per_shard": 3,
    "cpu_limit": 2,  # plan for a 2-core machine: the pools must leave room for reads and writes
    "dtype": "float32",
    "text_encoder": {"pool_size": 1, "batch_size": 2, "num_cpus": 0.5},
    "vae": {"pool_size": 1, "batch_size": 2, "num_cpus": 0.5},
}
N_T2I, N_EDIT = 18, 12


def _rows() -> list[dict]:
    rows = curated_rows(N_T2I, N_EDIT, resolution=48)
    # Two rows precompute must reject (with a reason) without failing the run.
    rows.insert(20, {**rows[N_T2I], "id": "edit-bad-source", "origin_id": "edit-bad-source",
                     "source_image": b"definitely not a png"})
    rows.insert(5, {**rows[0], "id": "t2i-empty-image", "origin_id": "t2i-empty-image", "image": b""})
    return rows


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    from fewstep.models.tiny import init_tiny, load_tiny_config

    return init_tiny(str(tmp_path_factory.mktemp("teacher") / "tiny"),
                     load_tiny_config(REPO / "configs/models/tiny.yaml"), seed=0)


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("curated"))
    write_curated(out, _rows(), parts=3)
    return out


@pytest.fixture(scope="module")
def clean_run(ray_cluster, teacher, curated, tmp_path_factory) -> tuple[str, dict]:
    out = str(tmp_path_factory.mktemp("shards-clean"))
    manifest = run_precompute(CONFIG, teacher, curated, out, show_progress=False)
    return out, manifest


def _shard_files(out: str) -> dict[str, bytes]:
    root = Path(out)
    files = sorted(root.glob("shards/*.parquet")) + [root / "empty_prompt.parquet"]
    files += sorted(root.glob("rejects/*.parquet"))
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _rows_without_input(data: bytes) -> list[dict]:
    import pyarrow as pa

    return [{k: v for k, v in row.items() if k != "input"} for row in pq.read_table(pa.BufferReader(data)).to_pylist()]


def _location_free(manifest: dict) -> dict:
    manifest = json.loads(json.dumps(manifest))
    manifest["teacher"].pop("uri")
    manifest["input"].pop("uri")
    return manifest


def test_manifest_totals_and_layout(clean_run):
    out, manifest = clean_run
    assert manifest == json.loads(Path(out, "manifest.json").read_text())
    contract.check_manifest(manifest, expected_kind="shards")
    good = N_T2I + N_EDIT
    assert manifest["totals"]["rows"] == good
    assert manifest["totals"]["by_task"] == {"t2i": N_T2I, "edit": N_EDIT}
    assert manifest["totals"]["rejects"] == {"image_empty": 1, "image_undecodable": 1}
    assert sum(manifest["totals"]["by_category"].values()) == good
    # 32 curated rows in shards of 3 -> 11 shards; the plan is by position, rejects drop out.
    assert [s["path"] for s in manifest["shards"]] == [f"shards/part-{k:05d}.parquet" for k in range(11)]
    for entry in manifest["shards"]:
        data = Path(out, entry["path"]).read_bytes()
        assert (len(data), storage.sha256_of(str(Path(out, entry["path"])))) == (entry["bytes"], entry["sha256"])
        assert pq.read_schema(Path(out, entry["path"])).names == contract.SHARD_SCHEMA.names
    assert manifest["latent_channels"] == 4 and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["source_latent_shape"] == [4, 8, 8] and manifest["text_embed_dim"] == 32
    assert len(manifest["teacher"]["sha256"]) == 64 and manifest["dtype"] == "float32"
    rejects = pq.read_table(Path(out, "rejects")).to_pylist()
    assert {(r["id"], r["stage"], r["reason"]) for r in rejects} == {
        ("edit-bad-source", "precompute", "image_undecodable"), ("t2i-empty-image", "precompute", "image_empty")}
    assert (Path(out) / "stats" / "precompute_ray_data.txt").read_text().count("Operator") >= 4


def test_rows_equal_single_process_encoding(clean_run, teacher):
    """Every stored tensor equals what the teacher computes for that row in one plain process."""
    from fewstep.models.adapter import QwenImageAdapter

    out, manifest = clean_run
    ad = QwenImageAdapter.load(teacher, components=("text_encoder", "vae"))
    by_id = {r["id"]: r for r in _rows()}
    seen = []
    for entry in manifest["shards"]:
        table = pq.read_table(Path(out, entry["path"]))
        batch = collate_shard_rows(table)
        for i, rid in enumerate(batch.ids):
            seen.append(rid)
            row = by_id[rid]
            assert (batch.tasks[i], batch.categories[i], batch.prompts[i]) == (
                row["task"], row["category"], row["prompt"])
            source = decode_image(row["source_image"], None) if row["task"] == "edit" else None
            ref = ad.encode_prompts([row["prompt"]], images=[source] if source else None)
            n = int(batch.prompt_mask[i].sum())
            assert n == int(ref.mask.sum())
            torch.testing.assert_close(batch.prompt_embeds[i, :n], ref.embeds[0, :n], atol=2e-5, rtol=1e-4)
            if row["task"] == "edit":
                neg = ad.encode_prompts([""], images=[source])
                m = int(batch.negative_mask[i].sum())
                assert batch.has_negative[i] and m == int(neg.mask.sum())
                torch.testing.assert_close(batch.negative_embeds[i, :m], neg.embeds[0, :m], atol=2e-5, rtol=1e-4)
                src = ad.encode_images([decode_image(row["source_image"], 32)])
                torch.testing.assert_close(batch.source_latents[i], src[0], atol=2e-5, rtol=1e-4)
            else:
                assert batch.has_negative is None or not batch.has_negative[i]
            if row["image"]:
                lat = ad.encode_images([decode_image(row["image"], 32)])
                assert batch.has_latents[i]
                torch.testing.assert_close(batch.latents[i], lat[0], atol=2e-5, rtol=1e-4)
            else:
                assert not batch.has_latents[i]
    # Curated order, nothing missing, nothing twice.
    assert seen == [r["id"] for r in _rows() if r["id"] not in ("edit-bad-source", "t2i-empty-image")]
    empty = load_empty_prompt(out)
    ref = ad.encode_prompts([""])
    torch.testing.assert_close(empty.embeds, ref.embeds, atol=2e-5, rtol=1e-4)


def test_rerun_is_a_noop_and_other_plans_are_refused(clean_run, teacher, curated):
    out, manifest = clean_run
    before = {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()}
    started = time.perf_counter()
    assert run_precompute(CONFIG, teacher, curated, out, show_progress=False) == manifest
    assert time.perf_counter() - started < 20  # no Ray work: the manifest says it is done
    assert {p: p.stat().st_mtime_ns for p in Path(out).rglob("*") if p.is_file()} == before
    with pytest.raises(PrecomputeError, match="another plan"):
        run_precompute({**CONFIG, "dtype": "bfloat16"}, teacher, curated, out, show_progress=False)
    with pytest.raises(PrecomputeError, match="curate folder itself"):
        run_precompute(CONFIG, teacher, curated, curated, show_progress=False)


def test_missing_input_and_bad_config_say_what_to_do(tmp_path):
    teacher = str(tmp_path / "teacher")  # never reached: the input and the config are checked first
    with pytest.raises(PrecomputeError, match="fewstep curate"):
        run_precompute(CONFIG, teacher, str(tmp_path / "nothing"), str(tmp_path / "out"), show_progress=False)
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match="text_encoder.pool_size"):
        run_precompute({**CONFIG, "text_encoder": {"pool_size": 0}}, teacher, str(tmp_path), str(tmp_path / "o"))


def test_s3_run_killed_and_resumed_matches_local(clean_run, teacher, s3_bucket, s3_options, tmp_path):
    """Teacher, input and output on moto S3: SIGKILL a real `fewstep precompute` after its first
    shard, rerun, and get the local run's manifest (apart from locations) and the same bytes.

    The killed CLI joins the test's Ray cluster (a driver of its own, as under `ray job submit`);
    its actors and tasks die with it."""
    import ray
    import s3fs

    clean_out, clean_manifest = clean_run
    fs = s3fs.S3FileSystem(**s3_options.s3fs_kwargs())
    s3_teacher, s3_curated, out = f"{s3_bucket}/teacher", f"{s3_bucket}/curated", f"{s3_bucket}/shards"
    fs.put(teacher.rstrip("/") + "/", s3_teacher[len("s3://"):] + "/", recursive=True)
    write_curated(s3_curated, _rows(), parts=3, options=s3_options)
    config = tmp_path / "precompute.yaml"
    config.write_text(json.dumps(CONFIG))  # JSON is YAML
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1",
               FEWSTEP_S3_ENDPOINT_URL=s3_options.endpoint_url, FEWSTEP_AWS_ACCESS_KEY_ID="testing",
               FEWSTEP_AWS_SECRET_ACCESS_KEY="testing")
    cmd = [sys.executable, "-m", "fewstep.cli", "precompute", "--config", str(config), "--teacher", s3_teacher,
           "--input", s3_curated, "--output", out, "--quiet",
           "--ray-address", ray.get_runtime_context().gcs_address]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline, first = time.time() + 600, False
        while not first and time.time() < deadline and proc.poll() is None:
            first = any("/part-" in u for u in storage.list_files(f"{out}/_progress", ".json", s3_options))
            time.sleep(0.05)
        assert proc.poll() is None, f"precompute ended before it was killed: {proc.stderr.read()[-2000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI's own process group (started above)
        assert first, "no shard finished within 10 minutes"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    time.sleep(2)  # let Ray reap the dead driver's workers before counting
    done = len(storage.list_files(f"{out}/shards", ".parquet", s3_options))
    assert not storage.exists(f"{out}/manifest.json", s3_options)
    assert 1 <= done < len(clean_manifest["shards"])

    manifest = run_precompute(CONFIG, s3_teacher, s3_curated, out, storage=s3_options, show_progress=False)
    assert _location_free(manifest) == _location_free(clean_manifest)
    assert (manifest["teacher"]["uri"], manifest["input"]["uri"]) == (s3_teacher, s3_curated)
    assert storage.read_json(f"{out}/manifest.json", s3_options) == manifest
    local = _shard_files(clean_out)
    remote = {u[len(out) + 1:]: storage.read_bytes(u, s3_options) for u in storage.list_files(out, ".parquet", s3_options)}
    assert sorted(remote) == sorted(local)
    for name, data in remote.items():
        if name.startswith("rejects/"):  # reject records name their input location: compare the rest
            assert _rows_without_input(data) == _rows_without_input(local[name])
        else:
            assert data == local[name], name  # every shard and the empty prompt: same bytes
    assert not [k for k in fs.find(out[len("s3://"):]) if ".tmp-" in k]
    run = storage.read_json(f"{out}/stats/precompute_run.json", s3_options)
    assert run["shards_skipped"] >= 1 and run["shards_written"] + run["shards_skipped"] == len(manifest["shards"])
    assert storage.exists(f"{out}/stats/precompute_ray_data.txt", s3_options)


def test_bfloat16_shards_round_trip(tmp_path):
    """The stored dtype is honoured by the writer and undone by the reader (no Ray needed)."""
    import pyarrow as pa

    from pipelines.precompute.write import _shard_table, shard_parquet_bytes

    rng = np.random.default_rng(0)
    embeds = rng.standard_normal((5, 8)).astype(np.float32)
    data, shape = contract.tensor_to_bytes(embeds, "bfloat16")
    mask = contract.mask_to_bytes(np.ones(5))
    row = {"id": "a", "task": "t2i", "category": "portrait", "prompt": "p", "prompt_embeds": data,
           "prompt_embeds_shape": shape, "prompt_mask": mask}
    table = pa.Table.from_pylist([row], schema=pa.schema(
        [f for f in contract.SHARD_SCHEMA if f.name != "dtype"]))
    raw = shard_parquet_bytes(_shard_table(table, "bfloat16"), "zstd", 64)
    assert raw == shard_parquet_bytes(_shard_table(table, "bfloat16"), "zstd", 64)
    batch = collate_shard_rows(pq.read_table(pa.BufferReader(raw)))
    assert batch.prompt_embeds.shape == (1, 5, 8)
    np.testing.assert_allclose(batch.prompt_embeds[0].numpy(), embeds, rtol=1e-2, atol=1e-2)


def test_config_identity_ignores_resources():
    a = PrecomputeConfig.model_validate(CONFIG)
    b = PrecomputeConfig.model_validate({**CONFIG, "text_encoder": {**CONFIG["text_encoder"], "pool_size": 3}})
    c = PrecomputeConfig.model_validate({**CONFIG, "rows_per_shard": 4})
    assert a.identity_hash() == b.identity_hash() != c.identity_hash()


def test_overwrite_clears_only_precompute_output(tmp_path):
    """--overwrite removes another plan's shards, sidecars, rejects and manifest; nothing else."""
    from pipelines.precompute.run import _prepare_output

    for rel, text in {"shards/part-00000.parquet": "x", "_progress/plan.json": '{"plan_id": "old"}',
                      "_progress/part-00000.parquet.json": "{}", "rejects/precompute-part-00000.parquet": "x",
                      "rejects/curate-other.parquet": "keep", "empty_prompt.parquet": "x", "notes.txt": "keep",
                      "manifest.json": json.dumps({"kind": "shards", "plan_id": "old"})}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    with pytest.raises(PrecomputeError, match="--overwrite"):
        _prepare_output(str(tmp_path), None, "new", overwrite=False)
    assert _prepare_output(str(tmp_path), None, "new", overwrite=True) == {}
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert left == ["notes.txt", "rejects/curate-other.parquet"]
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "curated"}))
    with pytest.raises(PrecomputeError, match="never overwrites"):
        _prepare_output(str(tmp_path), None, "new", overwrite=True)


def test_pools_that_would_starve_reads_are_refused(ray_cluster, teacher, curated, tmp_path):
    """On 2 CPUs, pools taking every CPU would leave reads unscheduled forever: refuse up front."""
    greedy = {**CONFIG, "text_encoder": {"pool_size": 2, "num_cpus": 0.5}, "vae": {"pool_size": 2, "num_cpus": 0.5}}
    with pytest.raises(PrecomputeError, match="lower text_encoder/vae pool_size or num_cpus"):
        run_precompute(greedy, teacher, curated, str(tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out" / "shards").exists()


def test_fused_encoders_write_the_same_shards(clean_run, teacher, curated, tmp_path):
    """One pool running both encoders (the small-machine layout) is a resource choice only: the
    same manifest, and the same bytes in every shard, as two pipelined pools."""
    out, manifest = clean_run
    fused_out = str(tmp_path / "fused")
    fused = run_precompute({**CONFIG, "fuse_encoders": True}, teacher, curated, fused_out, show_progress=False)
    assert fused["config"]["fuse_encoders"] is True
    fused["config"]["fuse_encoders"] = False
    assert _location_free(fused) == _location_free(manifest)
    assert _shard_files(fused_out) == _shard_files(out)
