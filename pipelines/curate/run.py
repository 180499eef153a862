"""Run the curate stage: read -> per-row operators -> global decisions -> rebalance -> publish.

Streaming part (Ray Data, one operator per filter family, model operators in actor pools):
    read files -> images -> text (pre-caption) -> NSFW inputs -> NSFW -> caption -> text -> tag
    (materialised)
Global part (driver, narrow columns only, input order): duplicate ids, images and prompts, then
the composition sample. Then a second streaming pass writes the selected rows as Parquet parts.

Every row that enters is either written once (``kept_rows``; repeats are extra copies) or
rejected with a reason; ``input_rows == kept_rows + rejected_rows`` is checked before publishing.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from fewstep.config import load_config
from fewstep.contract import COMPOSITION_NAME, MANIFEST_NAME, build_manifest
from fewstep.raysession import ray_session
from fewstep.storage import StorageOptions
from pipelines.curate import write
from pipelines.curate.captioning import CaptionRows
from pipelines.curate.config import CurateConfig, processing_hash
from pipelines.curate.dedup import find_duplicates
from pipelines.curate.nsfw import NsfwFilter, nsfw_inputs_op
from pipelines.curate.operators import (
    apply_decisions,
    images_op,
    text_after_caption_op,
    text_before_caption_op,
)
from pipelines.curate.read import InputError, list_inputs, read_inputs
from pipelines.curate.rebalance import CompositionError, select
from pipelines.curate.report import composition_report
from pipelines.curate.tagging import TagRows

log = logging.getLogger(__name__)

# Rows per task of the narrow projection: enough to amortise a task's scheduling on small
# machines, few enough that a task never pulls much image data onto one node.
NARROW_ROWS_PER_TASK = 1024

NARROW = ["order", "id", "task", "prompt", "category", "input", "image_sha", "image_phash", "image_thumb",
          "source_sha", "source_phash", "source_thumb", "stage", "reason", "detail"]


def build_stream(cfg: CurateConfig, files, options: StorageOptions | None):
    """The streaming operators up to tagging (lazy Ray dataset of working rows)."""
    import ray.data

    batch = {"batch_format": "pyarrow", "batch_size": cfg.ray.batch_size}
    ds = read_inputs(files, options, cfg.read.rows_per_block)
    ds = ds.map_batches(images_op, fn_kwargs={"limits": cfg.filters.image,
                                              "identical_pair": cfg.filters.edit_identical_pair},
                        num_cpus=0.5, **batch)
    ds = ds.map_batches(text_before_caption_op, fn_kwargs={"text": cfg.filters.text, "captioning": cfg.captioning},
                        num_cpus=0.5, **batch)
    actors = {"compute": ray.data.ActorPoolStrategy(size=cfg.ray.actors), "num_cpus": cfg.ray.actor_num_cpus}
    if cfg.filters.nsfw.enabled:
        ds = ds.map_batches(nsfw_inputs_op, num_cpus=0.5, **batch)
        # Ray Data never fuses an operator that has a remote-args function (it cannot know the
        # arguments ahead): without one, equal CPU requests would fuse the tasks above into this
        # actor, and the preprocessing would run in series with the network, not beside it.
        ds = ds.map_batches(NsfwFilter, fn_constructor_args=(cfg.filters.nsfw, cfg.ray.threads),
                            ray_remote_args_fn=_no_extra_remote_args, **actors, **batch)
    if cfg.captioning.captioner != "none":
        ds = ds.map_batches(CaptionRows, fn_constructor_args=(cfg.captioning, cfg.ray.threads), **actors, **batch)
    ds = ds.map_batches(text_after_caption_op, fn_kwargs={"text": cfg.filters.text}, num_cpus=0.5, **batch)
    ds = ds.map_batches(TagRows, fn_constructor_args=(cfg.tagging, cfg.ray.threads), **actors, **batch)
    return ds


def _no_extra_remote_args() -> dict:
    return {}


def _select(table, columns: list[str]):
    return table.select(columns)


def _collect(ds, columns: list[str], rows_per_task: int) -> list[dict]:
    """The narrow columns of every row, on the driver. One task per ``rows_per_task`` rows: the
    materialised blocks are small (a model batch each), and a task per block cost a second of
    scheduling at 3000 rows on 2 cores for a projection that takes milliseconds."""
    rows: list[dict] = []
    narrow = ds.map_batches(_select, fn_kwargs={"columns": columns}, batch_format="pyarrow",
                            batch_size=rows_per_task, zero_copy_batch=True, num_cpus=0.25)
    for table in narrow.iter_batches(batch_format="pyarrow", batch_size=None):
        rows.extend(table.to_pylist())
    return rows


def _unselected_reason(row: dict, targets: dict[str, dict[str, int]]) -> dict[str, str]:
    """Why the rebalancer left a row out: its (task, category) has no target, or the target is full."""
    where = f"{row['task']}/{row['category']}"
    if row["category"] not in targets.get(row["task"], {}):
        return {"reason": "not_in_composition",
                "detail": f"{where} is not in composition.tasks (target 0): list it there to keep such rows"}
    return {"reason": "over_budget", "detail": f"{where}: target {targets[row['task']][row['category']]}"}


def _decide(narrow: list[dict], cfg: CurateConfig, known: dict[str, list[str]]):
    """Global decisions on the narrow rows: duplicates, then the composition sample.

    Returns (reject rows, selection, plan {order: (copies, first position)}, rows to write).
    """
    kept = [r for r in narrow if r["reason"] is None]
    duplicates = find_duplicates(kept, cfg.filters.dedup)
    survivors = [r for r in kept if r["order"] not in duplicates]
    selection = select(survivors, cfg.composition, known)
    rejects = [r for r in narrow if r["reason"] is not None]
    for row in kept:
        if (d := duplicates.get(row["order"])) is not None:
            rejects.append({**row, "stage": d.stage, "reason": d.reason, "detail": d.detail})
    for row in survivors:
        if row["order"] not in selection.copies:
            rejects.append({**row, "stage": "rebalance", **_unselected_reason(row, selection.targets)})
    plan: dict[int, tuple[int, int]] = {}
    position = 0
    for order in sorted(selection.copies):  # output order = input order, repeats next to their row
        plan[order] = (selection.copies[order], position)
        position += selection.copies[order]
    _check_unique_ids({r["order"]: r["id"] for r in survivors if r["order"] in plan}, plan)
    return rejects, selection, plan, position


def _check_unique_ids(ids: dict[int, str], plan: dict[int, tuple[int, int]]) -> None:
    """Curated ids must be unique (the contract; precompute refuses a set that breaks it). Found
    before anything is written, with the fix: ids that repeat are kept only with id dedup off, and
    a raw id ending in ``#rep<k>`` can collide with a repeat's generated id."""
    from collections import Counter

    out = Counter(row_id if k == 0 else f"{row_id}#rep{k}" for order, row_id in ids.items()
                  for k in range(plan[order][0]))
    clashes = sorted(i for i, n in out.items() if n > 1)
    if clashes:
        raise CompositionError(
            f"{len(clashes)} id(s) would appear more than once in the curated set, e.g. {clashes[:3]}: "
            "keep filters.dedup.ids on (the first record of an id is kept, later ones rejected), or give "
            "the records unique ids (a raw id ending in '#rep<k>' collides with a repeat made by "
            "composition.replace)")


def run_curate(
    config: CurateConfig | str | Path,
    inputs: list[str] | None,
    output: str | None,
    storage: StorageOptions | None = None,
    ray_address: str | None = None,
    *,
    overrides: dict | None = None,
) -> dict:
    """Curate ``inputs`` into ``output`` (local path or s3://). Returns the composition dict.

    ``config``: a CurateConfig or a YAML path (``overrides``: dotted keys set on top).
    ``ray_address``: a cluster to join; None starts (and stops) an embedded local cluster.
    """
    cfg = config if isinstance(config, CurateConfig) else load_config(CurateConfig, config, overrides)
    inputs = list(inputs or cfg.inputs)
    output = output or cfg.output
    if not output:
        raise InputError("no output: pass --output URI or set output: in the config")
    return _run(cfg, inputs, output, storage, ray_address)


def _run(cfg: CurateConfig, inputs: list[str], output: str, options: StorageOptions | None,
         ray_address: str | None) -> dict:
    import ray
    from ray.data.context import ShuffleStrategy

    from fewstep import storage as store

    out = store.normalize(output)
    for given in inputs:
        folder = store.normalize(given).rstrip("/")
        if out == folder or out.startswith(folder + "/"):
            raise InputError(f"--output {out} is inside --input {given}: a later run would read the curated "
                             "set and its rejects back as input; write the output elsewhere")
    files = list_inputs(inputs, cfg.read.extensions, options)
    log.info("curate %r: %d input file(s) from %d input(s) -> %s", cfg.name, len(files), len(inputs), out)
    known = {task: list(cats) for task, cats in cfg.tagging.categories.items()}
    started = time.time()
    with ray_session(ray_address):
        stage_a = build_stream(cfg, files, options).materialize()
        log.info("filters, captions and tags done in %.1fs", time.time() - started)
        mark = time.time()
        narrow = _collect(stage_a, NARROW, NARROW_ROWS_PER_TASK)
        rejects, selection, plan, position = _decide(narrow, cfg, known)
        log.info("global decisions on %d rows (duplicates, composition) in %.1fs", len(narrow), time.time() - mark)
        mark = time.time()
        report = composition_report(
            config_name=cfg.name, config_hash=processing_hash(cfg), inputs=[store.normalize(i) for i in inputs],
            input_rows=len(narrow), rejects=rejects, selection=selection, output_rows=position,
            seed=cfg.composition.seed if cfg.composition else None,
            replace=cfg.composition.replace if cfg.composition else False)

        write.clear_outputs(out, options)
        ref = ray.put(plan)
        # Part-sized batches: a few large blocks, so the shuffle below runs a few map tasks, not
        # one per model batch (task overhead dominated this phase on 2 cores).
        selected = stage_a.map_batches(apply_decisions, fn_kwargs={"decisions_ref": [ref],
                                                                   "rows_per_part": cfg.ray.rows_per_part},
                                       batch_format="pyarrow", batch_size=cfg.ray.rows_per_part, num_cpus=0.25)
        if position:
            parts = (position + cfg.ray.rows_per_part - 1) // cfg.ray.rows_per_part
            # The task-based sort shuffle: the default hash shuffle starts aggregator actors, which
            # costs more than the shuffle itself at curate's sizes (seconds on 2 cores).
            selected.context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
            written = selected.groupby("part", num_partitions=min(parts, 64)).map_groups(
                write.write_part, fn_kwargs={"out_uri": out, "options": options,
                                             "rows_per_part": cfg.ray.rows_per_part},
                batch_format="pyarrow", num_cpus=0.5).materialize()
            entries = write.shard_entries(written.take_all())
            write_stats = written.stats()
        else:
            log.warning("no rows selected: the curated set is empty (see rejects/ and composition.json)")
            entries, write_stats = [], "nothing written"
        if sum(e.rows for e in entries) != position:
            raise RuntimeError(f"wrote {sum(e.rows for e in entries)} rows, planned {position}")
        log.info("wrote %d curated rows in %.1fs", position, time.time() - mark)
        write.write_rejects(rejects, out, options)
        write.write_text(out, f"{write.STATS_DIR}/filter_tag.txt", stage_a.stats(), options)
        write.write_text(out, f"{write.STATS_DIR}/write.txt", write_stats, options)
    report["seconds"] = round(time.time() - started, 2)
    store.write_json_atomic(store.join(out, COMPOSITION_NAME), report, options)
    manifest = build_manifest(
        kind="curated", config=cfg.model_dump(mode="json"), config_hash=report["config_hash"], shards=entries,
        totals={k: report[k] for k in ("input_rows", "kept_rows", "rejected_rows", "output_rows")},
        extra={"inputs": report["inputs"], "composition": COMPOSITION_NAME, "rejects": write.REJECTS_DIR})
    store.write_json_atomic(store.join(out, MANIFEST_NAME), manifest, options)
    log.info("curate done: %d in, %d kept, %d rejected, %d written (%.1fs)", report["input_rows"],
             report["kept_rows"], report["rejected_rows"], report["output_rows"], report["seconds"])
    return report
