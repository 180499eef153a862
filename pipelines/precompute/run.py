"""Run the precompute stage: curated rows -> teacher text embeddings + VAE latents -> shards.

Ray Data plan, one block per shard from start to end:

    plan items -> load rows (task) -> text encoder (actor pool) -> VAE (actor pool) -> write (task)

Keeping a shard in one block means each model sees the same batches on every run (same bits),
and the writer can publish the shard as soon as it is complete. Finished shards are skipped on a
rerun; the manifest is written last, once every shard exists.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter

from fewstep import contract
from fewstep import storage as stg
from fewstep.config import changed_keys
from fewstep.raysession import ray_session
from fewstep.storage import StorageOptions
from pipelines.precompute import encode, report, write
from pipelines.precompute.config import PrecomputeConfig, as_config
from pipelines.precompute.plan import (
    EMPTY_PROMPT_NAME,
    EMPTY_SHARD,
    PROGRESS_DIR,
    SHARDS_DIR,
    PrecomputeError,
    ShardPlan,
    finished_shards,
    plan_id,
    plan_shards,
    progress_uri,
    read_curated_input,
    remove_leftovers,
    teacher_identity,
)

log = logging.getLogger(__name__)


def run_precompute(config: PrecomputeConfig | dict | str | None, teacher: str, input: str, output: str,
                   storage: StorageOptions | None = None, ray_address: str | None = None, *,
                   ray_num_cpus: int | None = None, overwrite: bool = False,
                   show_progress: bool = True) -> dict:
    """Precompute shards of ``input`` (a curate output) with ``teacher`` into ``output``.

    Returns the manifest. Rerunning with the same config, teacher and input skips finished
    shards (a finished run returns at once); a different plan in ``output`` is an error unless
    ``overwrite``. ``storage`` applies to every s3:// URI given (teacher, input, output).
    """
    options = storage
    cfg = as_config(config)
    started = time.perf_counter()
    teacher, input, output = (_norm(teacher), _norm(input), _norm(output))
    if output == input:
        raise PrecomputeError(f"--output {output} is the curate folder itself; pick another folder")
    _check_devices(cfg)
    stg.check_reachable(input, options, "--input")
    stg.check_reachable(teacher, options, "--teacher")
    stg.check_output_dir(output, options, "--output")
    info = read_curated_input(input, options)
    if info.rows == 0:
        log.warning("precompute: the curated input %s has no rows; the output will hold none", input)
    teacher_id = teacher_identity(teacher, options, cfg.teacher_checksum_max_bytes)
    pid = plan_id(cfg.identity_hash(), teacher_id, info)
    manifest_uri = stg.join(output, contract.MANIFEST_NAME)

    state = _prepare_output(output, options, pid, overwrite, _identity(cfg, teacher_id, info))
    if state.get("manifest") is not None:
        log.info("precompute: %s is already complete (plan %s); nothing to do", output, pid)
        return state["manifest"]
    removed = remove_leftovers(output, options)
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    plan_record = state.get("plan") or _write_plan(output, options, pid, cfg, teacher, teacher_id, info)
    _warn_if_threads_changed(plan_record, cfg)

    shards = plan_shards(info, cfg.rows_per_shard)
    items = [ShardPlan(EMPTY_SHARD, [], 1), *shards]
    done = finished_shards(output, options, pid)
    todo = [item for item in items if item.name not in done]
    log.info("precompute plan %s: %d rows -> %d shards of %d; %d already done, %d to make",
             pid, info.rows, len(shards), cfg.rows_per_shard, len(done), len(todo))
    summaries = dict(done)
    ray_stats = None
    encode_started = time.perf_counter()
    if todo and cfg.executor == "local":
        from pipelines.precompute.local import execute_local

        summaries.update(execute_local(cfg, todo, teacher, input, output, options, pid,
                                       info.has_images, show_progress))
    elif todo:
        with ray_session(ray_address, ray_num_cpus):
            new, ray_stats = _execute(cfg, todo, teacher, input, output, options, pid, info.has_images,
                                      show_progress)
        summaries.update(new)
    encode_seconds = time.perf_counter() - encode_started
    missing = [item.name for item in items if item.name not in summaries]
    if missing:
        raise PrecomputeError(f"shards not produced: {missing[:5]}...; rerun to resume")

    manifest = _manifest(cfg, pid, teacher_id, input, info, plan_record, summaries)
    stg.write_json_atomic(manifest_uri, manifest, options)
    if info.rows and not manifest["totals"]["rows"]:
        log.warning("precompute: every one of the %d input rows was rejected (%s); see %s", info.rows,
                    manifest["totals"].get("rejects"), stg.join(output, "rejects"))
    rows_encoded = sum(summaries[item.name]["rows"] + summaries[item.name]["rejects"] for item in todo
                       if item.index != EMPTY_SHARD)
    # Shard counts leave out the empty-prompt item, as the manifest's shard list does.
    made = sum(1 for item in todo if item.index != EMPTY_SHARD)
    skipped = sum(1 for name in done if name != EMPTY_PROMPT_NAME)
    run = {"output": output, "plan_id": pid, "shards_written": made, "shards_skipped": skipped,
           "rows_encoded": rows_encoded, "seconds": time.perf_counter() - started,
           "encode_seconds": encode_seconds,
           "rows_per_s": rows_encoded / encode_seconds if encode_seconds > 0 else 0.0}
    report.write_stats(output, options, ray_stats, run)
    if show_progress:
        report.print_summary(manifest, run)
    return manifest


def _norm(uri: str) -> str:
    return stg.normalize(str(uri))


def _check_devices(cfg: PrecomputeConfig) -> None:
    """The local executor runs in this process: a GPU pool needs a GPU here (Ray checks its own)."""
    if cfg.executor != "local":
        return
    import torch

    for name, pool in (("text_encoder", cfg.text_encoder), ("vae", cfg.vae)):
        if pool.num_gpus > 0 and not torch.cuda.is_available():
            raise PrecomputeError(f"{name}.num_gpus: {pool.num_gpus:g} with executor: local, but torch "
                                  "sees no GPU here; set it to 0 (CPU) or run on a GPU machine")


def _identity(cfg: PrecomputeConfig, teacher_id: dict, info) -> dict:
    return {"config": cfg.identity(), "teacher": teacher_id.get("sha256"), "input": info.content_hash}


def _what_differs(record: dict, identity: dict | None) -> str:
    """Which of config, teacher and input made another plan, from the recorded plan.json."""
    if not record or identity is None or "config_identity" not in record:
        return "the config, teacher or input differ"
    parts = []
    changed = changed_keys(record.get("config_identity") or {}, identity["config"])
    if changed:
        parts.append("config (" + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()) + ")")
    if (record.get("teacher") or {}).get("sha256") != identity["teacher"]:
        parts.append(f"teacher (was {(record.get('teacher') or {}).get('uri')})")
    if (record.get("input") or {}).get("content_sha256") != identity["input"]:
        parts.append(f"input (was {(record.get('input') or {}).get('uri')})")
    return "these differ: " + "; ".join(parts) if parts else "the config, teacher or input differ"


def _warn_if_threads_changed(plan_record: dict, cfg: PrecomputeConfig) -> None:
    recorded = plan_record.get("torch_threads")
    now = _threads(cfg)
    if recorded is not None and recorded != now:
        log.warning("precompute: the shards already made used torch_threads %s, this run uses %s; on "
                    "CPU the new shards may differ from an uninterrupted run in the last bits (set "
                    "text_encoder/vae.torch_threads as before for identical bytes)", recorded, now)


def _threads(cfg: PrecomputeConfig) -> dict[str, int]:
    return {"text_encoder": encode.pool_threads(cfg.text_encoder), "vae": encode.pool_threads(cfg.vae)}


def _prepare_output(output: str, options: StorageOptions | None, pid: str, overwrite: bool,
                    identity: dict | None = None) -> dict:
    """What the output already holds: a finished run of this plan, a partial one, or nothing."""
    manifest_uri = stg.join(output, contract.MANIFEST_NAME)
    plan_uri = progress_uri(output, "plan")
    existing = stg.read_json(manifest_uri, options) if stg.exists(manifest_uri, options) else None
    plan = stg.read_json(plan_uri, options) if stg.exists(plan_uri, options) else None
    if existing is not None and existing.get("kind") != "shards":
        raise PrecomputeError(f"{output} holds a {existing.get('kind')!r} dataset; precompute never "
                              "overwrites another stage's output: pick another --output")
    other = next((r.get("plan_id") for r in (existing, plan) if r and r.get("plan_id") != pid), None)
    if other is not None:
        if not overwrite:
            raise PrecomputeError(
                f"{output} holds precompute output of another plan ({other}, this one is {pid}: "
                f"{_what_differs(plan or {}, identity)}); pick another --output or pass --overwrite")
        log.warning("overwrite: deleting precompute output of plan %s in %s", other, output)
        _clear(output, options)
        return {}
    return {"manifest": existing, "plan": plan}


def _clear(output: str, options: StorageOptions | None) -> None:
    for name in (contract.MANIFEST_NAME, EMPTY_PROMPT_NAME):
        stg.delete(stg.join(output, name), options)
    for name in (SHARDS_DIR, PROGRESS_DIR):
        stg.delete(stg.join(output, name), options, recursive=True)
    for uri in stg.list_files(stg.join(output, "rejects"), ".parquet", options):
        if uri.rsplit("/", 1)[-1].startswith("precompute-"):
            stg.delete(uri, options)


def _write_plan(output: str, options: StorageOptions | None, pid: str, cfg: PrecomputeConfig, teacher: str,
                teacher_id: dict, info) -> dict:
    """Record the plan (and the VAE geometry, read once on the driver) before any shard."""
    import torch

    from fewstep.models.adapter import QwenImageAdapter

    # No components: only the configs are read (VAE geometry), no weights are loaded here.
    try:
        vae = QwenImageAdapter.load(teacher, components=(), device="cpu", dtype=torch.float32,
                                    storage=options)
    except (OSError, ValueError) as exc:  # not a pipeline folder, a config that does not parse
        raise PrecomputeError(f"--teacher {teacher}: {exc}") from None
    multiple = int(vae.vae_scale_factor) * 2
    if cfg.resolution is not None and cfg.resolution % multiple:
        raise PrecomputeError(f"resolution: {cfg.resolution} is not a multiple of {multiple} (this "
                              f"teacher's VAE factor {vae.vae_scale_factor} x 2x2 latent packing)")
    record = {"plan_id": pid, "config_identity": cfg.identity(), "teacher": teacher_id,
              "input": {"uri": info.uri, "content_sha256": info.content_hash, "rows": info.rows},
              "latent_channels": int(vae.latent_channels), "vae_scale_factor": int(vae.vae_scale_factor),
              "torch_threads": _threads(cfg)}
    del vae
    stg.write_json_atomic(progress_uri(output, "plan"), record, options)
    return record


def _check_resources(cfg: PrecomputeConfig) -> None:
    """Refuse pool sizes that would leave no CPU for the read and write tasks (a deadlock)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    if cfg.cpu_limit is not None:
        cpus = min(cpus, cfg.cpu_limit)
    need = cfg.total_actor_cpus() + cfg.io.num_cpus
    if need > cpus:
        raise PrecomputeError(
            f"the actor pools need {cfg.total_actor_cpus():g} CPUs plus {cfg.io.num_cpus:g} for a "
            f"read/write task, but the run may use {cpus:g} (cluster CPUs or cpu_limit): lower "
            "text_encoder/vae pool_size or num_cpus (fractions such as 0.5 are fine)")
    pools = [("text_encoder", cfg.text_encoder)] + ([] if cfg.fuse_encoders else [("vae", cfg.vae)])
    for name, pool in pools:
        if pool.num_gpus * pool.pool_size > gpus:
            raise PrecomputeError(f"{name}: pool_size x num_gpus = {pool.num_gpus * pool.pool_size:g} "
                                  f"GPUs, the cluster has {gpus:g}; set {name}.num_gpus: 0 on CPU")


def _execute(cfg: PrecomputeConfig, todo: list[ShardPlan], teacher: str, input: str, output: str,
             options: StorageOptions | None, pid: str, has_images: bool,
             show_progress: bool) -> tuple[dict[str, dict], str]:
    import ray
    import ray.data
    from tqdm import tqdm

    _check_resources(cfg)
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.target_max_block_size, ctx.enable_progress_bars, ctx.execution_options)
    # A dataset seals a copy of the context when created: these settings are this run's only.
    ctx.target_max_block_size = None  # never split a shard's block between stages
    ctx.enable_progress_bars = show_progress
    if cfg.cpu_limit is not None:
        options_copy = copy.deepcopy(ctx.execution_options)
        options_copy.resource_limits = options_copy.resource_limits.copy(cpu=cfg.cpu_limit)
        ctx.execution_options = options_copy
    try:
        ds = ray.data.from_items([{"plan": item.to_json()} for item in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(encode.load_shard, batch_size=None, batch_format="pyarrow",
                            num_cpus=cfg.io.num_cpus,
                            fn_kwargs={"input_uri": input, "options": options,
                                       "negative_prompt": cfg.negative_prompt})
        if cfg.fuse_encoders:
            ds = _actor_stage(ds, encode.TeacherEncodeActor, cfg, cfg.text_encoder, teacher, options,
                              text_batch_size=cfg.text_encoder.batch_size, vae_batch_size=cfg.vae.batch_size,
                              negative_prompt=cfg.negative_prompt,
                              condition_resolution=cfg.condition_resolution, resolution=cfg.resolution,
                              has_images=has_images)
        else:
            ds = _separate_pools(ds, cfg, teacher, options, has_images)
        ds = ds.map_batches(write.write_shard, batch_size=None, batch_format="pyarrow",
                            num_cpus=cfg.io.num_cpus,
                            fn_kwargs={"output": output, "options": options, "input_uri": input,
                                       "dtype": cfg.dtype, "compression": cfg.compression,
                                       "row_group_rows": cfg.row_group_rows, "plan_id": pid})
    finally:
        ctx.target_max_block_size, ctx.enable_progress_bars, ctx.execution_options = saved
    new: dict[str, dict] = {}
    with tqdm(total=len(todo), desc="precompute shards", unit="shard", disable=not show_progress) as bar:
        for row in ds.iter_rows():
            summary = json.loads(row["summary"])
            name = summary["path"].rsplit("/", 1)[-1]
            new[name] = summary
            bar.update(1)
            bar.set_postfix(rows=sum(s["rows"] for s in new.values()))
    return new, ds.stats()


def _separate_pools(ds, cfg: PrecomputeConfig, teacher: str, options: StorageOptions | None, has_images: bool):
    """The text encoder pool, then the VAE pool (or ``drop_images`` for prompt-only input)."""
    ds = _actor_stage(ds, encode.TextEncodeActor, cfg, cfg.text_encoder, teacher, options,
                      batch_size=cfg.text_encoder.batch_size, negative_prompt=cfg.negative_prompt,
                      condition_resolution=cfg.condition_resolution)
    if has_images:
        ds = _actor_stage(ds, encode.VaeEncodeActor, cfg, cfg.vae, teacher, options,
                          batch_size=cfg.vae.batch_size, resolution=cfg.resolution)
    else:
        log.info("the input holds no images: VAE stage skipped (prompt-only shards)")
        ds = ds.map_batches(encode.drop_images, batch_size=None, batch_format="pyarrow",
                            num_cpus=cfg.io.num_cpus)
    return ds


def _actor_stage(ds, actor_cls, cfg: PrecomputeConfig, pool, teacher: str, options: StorageOptions | None,
                 **kwargs):
    """One actor pool over whole shards (``batch_size=None``: a block is one shard)."""
    import ray.data

    return ds.map_batches(
        actor_cls, batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.pool_size),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus or None,
        fn_constructor_args=encode.actor_args(cfg, pool, teacher, options), fn_constructor_kwargs=kwargs)


def _sum_counters(summaries: list[dict], key: str) -> dict[str, int]:
    total: Counter = Counter()
    for summary in summaries:
        total.update(summary.get(key, {}))
    return dict(sorted(total.items()))


def _single(shapes: list[list[int]]) -> list[int] | None:
    return shapes[0] if len(shapes) == 1 else None


def _manifest(cfg: PrecomputeConfig, pid: str, teacher_id: dict, input: str, info, plan_record: dict,
              summaries: dict[str, dict]) -> dict:
    shard_summaries = [s for name, s in sorted(summaries.items()) if name != EMPTY_PROMPT_NAME]
    empty = summaries[EMPTY_PROMPT_NAME]
    entries = [contract.ShardEntry(path=s["path"], rows=s["rows"], sha256=s["sha256"], bytes=s["bytes"])
               for s in shard_summaries]
    latent_shapes = sorted({tuple(x) for s in shard_summaries for x in s["latent_shapes"]})
    source_shapes = sorted({tuple(x) for s in shard_summaries for x in s["source_latent_shapes"]})
    dims = sorted({d for s in [*shard_summaries, empty] for d in s["text_embed_dims"]})
    if len(dims) > 1:
        raise PrecomputeError(f"text embedding widths differ between shards: {dims}")
    extra = {
        "plan_id": pid,
        "dtype": cfg.dtype,
        "latent_channels": plan_record["latent_channels"],
        "vae_scale_factor": plan_record["vae_scale_factor"],
        "latent_shape": _single([list(x) for x in latent_shapes]),
        "latent_shapes": [list(x) for x in latent_shapes],
        "source_latent_shape": _single([list(x) for x in source_shapes]),
        "source_latent_shapes": [list(x) for x in source_shapes],
        "text_embed_dim": dims[0] if dims else None,
        "max_prompt_tokens": max([s["max_prompt_tokens"] for s in shard_summaries] or [0]),
        "empty_prompt": {"path": EMPTY_PROMPT_NAME, "sha256": empty["sha256"], "bytes": empty["bytes"],
                         "prompt": cfg.negative_prompt},
        "input": {"uri": input, "content_sha256": info.content_hash, "rows": info.rows},
    }
    totals = {
        "by_task": _sum_counters(shard_summaries, "by_task"),
        "by_category": _sum_counters(shard_summaries, "by_category"),
        "rejects": _sum_counters(shard_summaries, "reject_reasons"),
    }
    return contract.build_manifest(kind="shards", config=cfg.model_dump(mode="json"),
                                   config_hash=cfg.identity_hash(), shards=entries, teacher=teacher_id,
                                   totals=totals, extra=extra)
