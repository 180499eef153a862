"""The shard reader: Ray Data streaming (no driver copy), collation, the plain pyarrow iterator, S3."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from fewstep import contract, storage
from pipelines.precompute.write import _shard_table, shard_parquet_bytes
from pipelines.shards import collate_shard_rows, iter_shard_batches, load_empty_prompt, read_shards

D, C, H = 6, 4, 4  # text width, latent channels, latent side


def _row(i: int, dtype: str, rng) -> tuple[dict, dict]:
    """One shard row and the float32 arrays it was made from (to check the reader against)."""
    task = "edit" if i % 3 == 0 else "t2i"
    length = 2 + (i * 7) % 9
    arrays = {"prompt_embeds": rng.standard_normal((length, D)).astype(np.float32)}
    if task == "edit":
        arrays["negative_embeds"] = rng.standard_normal((3 + i % 2, D)).astype(np.float32)
        arrays["source_latents"] = rng.standard_normal((C, H, H)).astype(np.float32)
    if i % 2 == 0:
        arrays["latents"] = rng.standard_normal((C, H, H)).astype(np.float32)
    row = {"id": f"r{i:03d}", "task": task, "category": ["portrait", "landscape", "text"][i % 3],
           "prompt": f"prompt {i}"}
    for name in ("prompt_embeds", "negative_embeds", "latents", "source_latents"):
        if name in arrays:
            row[name], row[f"{name}_shape"] = contract.tensor_to_bytes(arrays[name], dtype)
            if name.endswith("embeds"):
                row[name.replace("embeds", "mask")] = contract.mask_to_bytes(np.ones(len(arrays[name])))
        else:
            row[name], row[f"{name}_shape"] = None, None
    row.setdefault("negative_mask", None)
    # What a reader of this dtype can get back exactly.
    expect = {k: contract.tensor_from_bytes(*contract.tensor_to_bytes(v, dtype), dtype).astype(np.float32)
              for k, v in arrays.items()}
    return row, expect


def write_shards(root: str, n_rows: int = 23, rows_per_shard: int = 5, dtype: str = "float32",
                 options=None) -> dict[str, dict]:
    """A precompute-shaped output folder with known content; returns the expected arrays by id."""
    rng = np.random.default_rng(7)
    no_dtype = pa.schema([f for f in contract.SHARD_SCHEMA if f.name != "dtype"])
    expected, entries = {}, []
    rows = []
    for i in range(n_rows):
        row, expect = _row(i, dtype, rng)
        rows.append(row)
        expected[row["id"]] = {**expect, "task": row["task"], "category": row["category"]}
    for k in range(0, n_rows, rows_per_shard):
        data = shard_parquet_bytes(_shard_table(pa.Table.from_pylist(rows[k:k + rows_per_shard], schema=no_dtype),
                                                dtype), "zstd", 2)
        rel = f"shards/part-{k // rows_per_shard:05d}.parquet"
        storage.write_bytes_atomic(storage.join(root, rel), data, options)
        entries.append(contract.ShardEntry(rel, min(rows_per_shard, n_rows - k), hashlib.sha256(data).hexdigest(),
                                           len(data)))
    empty = {"id": "__empty__", "task": "t2i", "category": "", "prompt": ""}
    empty["prompt_embeds"], empty["prompt_embeds_shape"] = contract.tensor_to_bytes(np.full((3, D), 0.5), dtype)
    empty["prompt_mask"] = contract.mask_to_bytes(np.ones(3))
    storage.write_bytes_atomic(storage.join(root, "empty_prompt.parquet"), shard_parquet_bytes(
        _shard_table(pa.Table.from_pylist([empty], schema=no_dtype), dtype), "zstd", 2), options)
    manifest = contract.build_manifest(kind="shards", config={}, config_hash="x", shards=entries,
                                       extra={"empty_prompt": {"path": "empty_prompt.parquet"}, "dtype": dtype})
    storage.write_json_atomic(storage.join(root, "manifest.json"), manifest, options)
    return expected


def _check_batch(batch, expected: dict) -> None:
    for i, rid in enumerate(batch.ids):
        exp = expected[rid]
        assert (batch.tasks[i], batch.categories[i]) == (exp["task"], exp["category"])
        n = len(exp["prompt_embeds"])
        assert int(batch.prompt_mask[i].sum()) == n and not batch.prompt_mask[i, n:].any()
        np.testing.assert_array_equal(batch.prompt_embeds[i, :n].numpy(), exp["prompt_embeds"])
        assert not batch.prompt_embeds[i, n:].any()
        for name, flag in (("latents", "has_latents"), ("source_latents", "has_source"),
                           ("negative_embeds", "has_negative")):
            if name in exp:
                assert bool(getattr(batch, flag)[i])
                value = getattr(batch, name)[i]
                if name == "negative_embeds":
                    value = value[: len(exp[name])]
                np.testing.assert_array_equal(value.numpy(), exp[name])
            elif getattr(batch, flag) is not None:
                assert not bool(getattr(batch, flag)[i])


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_collate_pads_and_round_trips(tmp_path, dtype):
    import pyarrow.parquet as pq

    expected = write_shards(str(tmp_path), n_rows=9, rows_per_shard=9, dtype=dtype)
    table = pq.read_table(tmp_path / "shards" / "part-00000.parquet")
    batch = collate_shard_rows(table)
    assert batch.prompt_embeds.shape == (9, max(len(e["prompt_embeds"]) for e in expected.values()), D)
    assert batch.prompt_embeds.dtype == torch.float32 and batch.prompt_mask.dtype == torch.long
    assert batch.latents.shape == (9, C, H, H) and batch.source_latents.shape == (9, C, H, H)
    _check_batch(batch, expected)
    # Row dicts collate to the same thing as the table.
    again = collate_shard_rows(table.to_pylist())
    assert again.ids == batch.ids and torch.equal(again.prompt_embeds, batch.prompt_embeds)
    t2i_only = collate_shard_rows(table.filter(pa.compute.equal(table["task"], "t2i")))
    assert t2i_only.negative_embeds is None and t2i_only.source_latents is None


def test_select_picks_rows_of_a_collated_batch(tmp_path):
    """The local device cache collates every row once, then selects each batch from it."""
    import pyarrow.parquet as pq

    expected = write_shards(str(tmp_path), n_rows=12, rows_per_shard=12)
    everything = collate_shard_rows(pq.read_table(tmp_path / "shards" / "part-00000.parquet"))
    index = np.array([7, 0, 3, 3, 11])
    picked = everything.select(index)
    assert picked.ids == [everything.ids[i] for i in index] and len(picked) == 5
    assert torch.equal(picked.latents, everything.latents[torch.as_tensor(index)])
    _check_batch(picked, expected)  # each row still holds its own arrays, padding and flags
    assert collate_shard_rows(picked) is not picked  # passed through (moved), not re-decoded
    assert torch.equal(collate_shard_rows(picked).prompt_embeds, picked.prompt_embeds)


def test_read_shards_streams_on_workers(ray_cluster, tmp_path):
    """streaming_split into two Ray tasks (as Ray Train does): each row once, no driver copy."""
    import ray

    expected = write_shards(str(tmp_path), n_rows=24, rows_per_shard=4)
    ds = read_shards(str(tmp_path))
    # The plan starts from a Parquet read (rows come from files on the workers), not from
    # driver-side data such as from_items / from_arrow.
    op, names = ds._logical_plan.dag, []
    while op is not None:
        names.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert any("Parquet" in name for name in names), names
    assert not any(name.startswith("From") for name in names), names

    @ray.remote(num_cpus=0.5)
    def consume(it) -> list[str]:
        from pipelines.shards import collate_shard_rows

        ids = []
        for batch in it.iter_torch_batches(batch_size=4, collate_fn=collate_shard_rows):
            _check_batch(batch, expected)
            ids.extend(batch.ids)
        return ids

    splits = ds.streaming_split(2, equal=True)
    parts = ray.get([consume.remote(s) for s in splits])
    assert len(parts[0]) == len(parts[1]) == 12 and sorted(parts[0] + parts[1]) == sorted(expected)
    assert not set(parts[0]) & set(parts[1])



def test_iter_shard_batches_split_between_ranks(tmp_path):
    expected = write_shards(str(tmp_path), n_rows=23, rows_per_shard=5)
    ranks = [list(iter_shard_batches(str(tmp_path), batch_size=3, shuffle_seed=1, rank=r, world_size=3))
             for r in range(3)]
    ids = [[i for b in batches for i in b.ids] for batches in ranks]
    assert [len(b) for b in ranks] == [2, 2, 2]  # 23 rows -> 7 per rank -> 2 full batches each
    flat = [i for part in ids for i in part]
    assert len(flat) == len(set(flat)) == 18
    for batches in ranks:
        for b in batches:
            _check_batch(b, expected)
    again = [i for b in iter_shard_batches(str(tmp_path), 3, shuffle_seed=1, rank=0, world_size=3) for i in b.ids]
    assert again == ids[0]
    other_seed = [i for b in iter_shard_batches(str(tmp_path), 3, shuffle_seed=2, rank=0, world_size=3)
                  for i in b.ids]
    assert other_seed != ids[0]
    ordered = [i for b in iter_shard_batches(str(tmp_path), 5, shuffle_seed=None, drop_last=False) for i in b.ids]
    assert ordered == sorted(expected)
    two_epochs = list(iter_shard_batches(str(tmp_path), 23, shuffle_seed=0, epochs=2))
    assert len(two_epochs) == 2 and sorted(two_epochs[0].ids) == sorted(two_epochs[1].ids)
    assert two_epochs[0].ids != two_epochs[1].ids
    edits = [i for b in iter_shard_batches(str(tmp_path), 1, tasks=["edit"]) for i in b.ids]
    assert sorted(edits) == sorted(k for k, v in expected.items() if v["task"] == "edit")


def test_empty_prompt_and_manifest_errors(tmp_path):
    write_shards(str(tmp_path))
    empty = load_empty_prompt(str(tmp_path))
    assert empty.embeds.shape == (1, 3, D) and torch.all(empty.embeds == 0.5) and empty.mask.sum() == 3
    with pytest.raises(contract.ContractError, match="fewstep precompute"):
        read_shards(str(tmp_path / "missing"))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "kind": "curated"}))
    with pytest.raises(contract.ContractError, match="kind"):
        list(iter_shard_batches(str(tmp_path), 2))
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": "9.0"}))
    with pytest.raises(contract.ContractError, match="major version"):
        load_empty_prompt(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="rank"):
        next(iter_shard_batches(str(tmp_path), 2, rank=2, world_size=2))


def test_reader_on_s3(ray_cluster, s3_bucket, s3_options):
    root = f"{s3_bucket}/shards"
    expected = write_shards(root, n_rows=12, rows_per_shard=4, dtype="bfloat16", options=s3_options)
    ids = [i for b in iter_shard_batches(root, 4, shuffle_seed=3, storage=s3_options) for i in b.ids]
    assert sorted(ids) == sorted(expected)
    rows = read_shards(root, storage=s3_options, tasks=["edit"]).take_all()  # filter pushed into the scan
    batch = collate_shard_rows(rows)
    assert sorted(batch.ids) == sorted(k for k, v in expected.items() if v["task"] == "edit")
    _check_batch(batch, expected)
    assert load_empty_prompt(root, storage=s3_options).embeds.shape == (1, 3, D)
