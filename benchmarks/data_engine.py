"""Data engine benchmark: curate + precompute on Ray Data vs a bare single-process loop.

Both sides do the same work on the same bench-world corpus and the same tiny teacher: the
curate filters (images, text, NSFW, captioning if configured, tagging, dedup, rebalance) and the
precompute encoders (text encoder, VAE) with the same operator code; the bare loop just calls it
in one process, with no Ray, no actors and every core for its own torch/ONNX threads. Prints
rows/s of both, their ratio (goal >= 0.85 on 2 cores) and 1-worker vs 2-worker scaling of the Ray
pipeline (actors per pool), and appends the numbers and the command to docs/performance.md.

    python benchmarks/data_engine.py --workers 1 --threads 2 --repeats 3   # the recorded runs (~25 min)
    python benchmarks/data_engine.py --preset small                        # quick (600 rows)
    python benchmarks/data_engine.py --t2i-per-category 600 --edit-per-category 200   # 3000 rows

This is a benchmark, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

log = logging.getLogger("data_engine")


# ---------------------------------------------------------------------------
# Ray Data pipeline (the product path)
# ---------------------------------------------------------------------------

def run_pipeline(work: Path, corpus: Path, teacher: str, workers: int, cpus: int, curate_cfg: Path,
                 pre_cfg: Path) -> dict:
    from fewstep.config import load_config
    from pipelines.curate.config import CurateConfig
    from pipelines.curate.run import run_curate
    from pipelines.precompute import load_precompute_config, run_precompute

    cur_out, pre_out = work / f"ray-{workers}w-curated", work / f"ray-{workers}w-shards"
    for folder in (cur_out, pre_out):
        shutil.rmtree(folder, ignore_errors=True)
    # Actors per pool x CPUs per actor must leave room for the read/write tasks (else Ray Data
    # waits forever for a CPU): half the cluster for the actor pools of a stage, at most 0.5 each.
    ccfg = load_config(CurateConfig, curate_cfg)
    pools = 1 + int(ccfg.filters.nsfw.enabled) + int(ccfg.captioning.captioner != "none")
    ccfg = load_config(CurateConfig, curate_cfg, {"ray.actors": workers, "ray.actor_num_cpus":
                                                  min(0.5, cpus / (2 * pools * workers))})
    pcfg = load_precompute_config(pre_cfg, {"text_encoder.pool_size": workers, "vae.pool_size": workers,
                                            "text_encoder.num_cpus": min(0.5, cpus / (4 * workers)),
                                            "vae.num_cpus": min(0.5, cpus / (4 * workers))})
    started, busy = time.perf_counter(), cpu_busy_s()
    report = run_curate(ccfg, _inputs(corpus), str(cur_out))
    curated_s, curate_cpu = time.perf_counter() - started, cpu_busy_s() - busy
    started, busy = time.perf_counter(), cpu_busy_s()
    manifest = run_precompute(pcfg, teacher, str(cur_out), str(pre_out), show_progress=False)
    pre_s, pre_cpu = time.perf_counter() - started, cpu_busy_s() - busy
    return {"name": f"ray data, {workers} worker(s) per pool", "input_rows": report["input_rows"],
            "curated_rows": report["output_rows"], "shard_rows": manifest["totals"]["rows"],
            "curate_s": curated_s, "precompute_s": pre_s, "curate_cpu_s": curate_cpu,
            "precompute_cpu_s": pre_cpu, "manifest": manifest}


def cpu_busy_s() -> float:
    """Core-seconds the whole machine has spent busy (every process: Ray's too), from /proc/stat;
    NaN where there is no /proc. The difference over a phase shows what the pipeline costs in
    CPU beside what it costs in wall time."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return float("nan")
    ticks = [int(x) for x in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _inputs(corpus: Path) -> list[str]:
    return [str(corpus / "t2i"), str(corpus / "edit")]


# ---------------------------------------------------------------------------
# Bare loop: the same operators, one process, no Ray
# ---------------------------------------------------------------------------

def bare_curate(cfg, inputs: list[str], out: Path, threads: int) -> dict:
    """The curate operators in a plain loop, then the same global decisions and Parquet parts."""
    import pyarrow as pa

    from fewstep import storage
    from fewstep.contract import CURATED_SCHEMA
    from pipelines.curate import write
    from pipelines.curate.captioning import CaptionRows
    from pipelines.curate.dedup import find_duplicates
    from pipelines.curate.nsfw import NsfwFilter, nsfw_inputs_op
    from pipelines.curate.operators import images_op, text_after_caption_op, text_before_caption_op
    from pipelines.curate.read import iter_file_rows, list_inputs
    from pipelines.curate.rebalance import select
    from pipelines.curate.records import from_rows, is_kept, to_rows
    from pipelines.curate.tagging import TagRows

    files = list_inputs(inputs, cfg.read.extensions, None)
    rows = [row for f in files for row in iter_file_rows(f, None)]
    nsfw = NsfwFilter(cfg.filters.nsfw, threads) if cfg.filters.nsfw.enabled else None
    caption = CaptionRows(cfg.captioning, threads) if cfg.captioning.captioner != "none" else None
    tag = TagRows(cfg.tagging, threads)
    done = []
    size = cfg.ray.batch_size
    for start in range(0, len(rows), size):
        table = from_rows(rows[start:start + size])
        table = images_op(table, limits=cfg.filters.image, identical_pair=cfg.filters.edit_identical_pair)
        table = text_before_caption_op(table, text=cfg.filters.text, captioning=cfg.captioning)
        if nsfw is not None:
            table = nsfw(nsfw_inputs_op(table))
        if caption is not None:
            table = caption(table)
        table = text_after_caption_op(table, text=cfg.filters.text)
        done.extend(to_rows(tag(table)))
    kept = [r for r in done if is_kept(r)]
    duplicates = find_duplicates(kept, cfg.filters.dedup)
    survivors = [r for r in kept if r["order"] not in duplicates]
    known = {task: list(cats) for task, cats in cfg.tagging.categories.items()}
    selection = select(survivors, cfg.composition, known)
    records = []
    for row in sorted(survivors, key=lambda r: r["order"]):
        for k in range(selection.copies.get(row["order"], 0)):
            copy = dict(row, origin_id=row["id"])
            if k:
                copy["id"] = f"{row['id']}#rep{k}"
            records.append(write.curated_record(copy))
    per = cfg.ray.rows_per_part
    for k in range(0, len(records), per):
        table = pa.Table.from_pylist(records[k:k + per], schema=CURATED_SCHEMA)
        storage.write_bytes_atomic(str(out / f"part-{k // per:05d}.parquet"), write.parquet_bytes(table))
    return {"input_rows": len(done), "curated_rows": len(records)}


def bare_precompute(cfg, teacher: str, curated: str, out: Path, threads: int) -> int:
    """The precompute operators (same classes the actors run) over every shard, in order."""
    import pyarrow as pa

    from pipelines.precompute.encode import TextEncodeActor, VaeEncodeActor, load_shard
    from pipelines.precompute.plan import EMPTY_SHARD, ShardPlan, plan_shards, read_curated_input
    from pipelines.precompute.write import write_shard

    info = read_curated_input(curated)
    items = [ShardPlan(EMPTY_SHARD, [], 1), *plan_shards(info, cfg.rows_per_shard)]
    common = (teacher, None, cfg.model_dtype, cfg.dtype, 0.0, threads)
    text = TextEncodeActor(*common, batch_size=cfg.text_encoder.batch_size, negative_prompt=cfg.negative_prompt,
                           condition_resolution=cfg.condition_resolution)
    vae = VaeEncodeActor(*common, batch_size=cfg.vae.batch_size, resolution=cfg.resolution)
    rows = 0
    for item in items:
        table = load_shard(pa.table({"plan": [item.to_json()]}), info.uri, None, cfg.negative_prompt)
        table = vae(text(table))
        summary = write_shard(table, str(out), None, info.uri, cfg.dtype, cfg.compression, cfg.row_group_rows,
                              "bare")
        rows += json.loads(summary.column("summary")[0].as_py())["rows"] if item.index != EMPTY_SHARD else 0
    return rows


def run_bare(work: Path, corpus: Path, teacher: str, threads: int, curate_cfg: Path, pre_cfg: Path) -> dict:
    """The bare loop in a fresh process, as a plain script would run: it pays its own imports
    (torch, ONNX Runtime, transformers, diffusers) and model loads inside the timed phases, as
    each Ray actor does. In this process they would be free: the harness imported them to build
    the corpus and the tiny teacher (~1.5 core-s for curate, ~5 for precompute)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_bare_in_this_process, (work, corpus, teacher, threads, curate_cfg, pre_cfg))


def _bare_in_this_process(work: Path, corpus: Path, teacher: str, threads: int, curate_cfg: Path,
                          pre_cfg: Path) -> dict:
    from fewstep.config import load_config
    from fewstep.contract import MANIFEST_NAME, ShardEntry, build_manifest
    from fewstep.storage import write_json_atomic
    from pipelines.curate.config import CurateConfig
    from pipelines.precompute import load_precompute_config

    cur_out, pre_out = work / "bare-curated", work / "bare-shards"
    for folder in (cur_out, pre_out):
        shutil.rmtree(folder, ignore_errors=True)
    ccfg = load_config(CurateConfig, curate_cfg)
    pcfg = load_precompute_config(pre_cfg)
    started, busy = time.perf_counter(), cpu_busy_s()
    import torch

    torch.set_num_threads(threads)
    counts = bare_curate(ccfg, _inputs(corpus), cur_out / "curated", threads)
    curate_s, curate_cpu = time.perf_counter() - started, cpu_busy_s() - busy
    # A manifest so that the precompute reader accepts the folder (not timed: bookkeeping).
    import hashlib

    entries = [ShardEntry(f"curated/{p.name}", _rows_of(p), hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size)
               for p in sorted((cur_out / "curated").glob("*.parquet"))]
    write_json_atomic(str(cur_out / MANIFEST_NAME), build_manifest(kind="curated", config={}, config_hash="bare",
                                                                   shards=entries))
    started, busy = time.perf_counter(), cpu_busy_s()
    shard_rows = bare_precompute(pcfg, teacher, str(cur_out), pre_out, threads)
    pre_s, pre_cpu = time.perf_counter() - started, cpu_busy_s() - busy
    return {"name": f"bare loop, 1 process, {threads} threads", **counts, "shard_rows": shard_rows,
            "curate_s": curate_s, "precompute_s": pre_s, "curate_cpu_s": curate_cpu, "precompute_cpu_s": pre_cpu}


def _rows_of(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def _rate(result: dict) -> dict:
    total = result["curate_s"] + result["precompute_s"]
    return {"curate": result["input_rows"] / result["curate_s"],
            "precompute": result["curated_rows"] / result["precompute_s"],
            "total": result["input_rows"] / total, "total_s": total}


def render(repeats: list[dict], args, load: tuple[float, ...]) -> tuple[str, list[str]]:
    """``repeats``: one dict per repeat with ``bare`` (the fastest bare loop), ``other_bares`` and
    ``ray`` (one result per worker count), measured back to back."""
    lines = ["| run | input rows | curated rows | curate s | precompute s | curate rows/s | "
             "precompute rows/s | end-to-end rows/s | vs bare | curate CPU s | precompute CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios, scaling = [], []
    for k, rep in enumerate(repeats):
        base = _rate(rep["bare"])["total"]
        tag = f" (repeat {k + 1})" if len(repeats) > 1 else ""
        for r in [rep["bare"], *rep["other_bares"], *rep["ray"]]:
            rate = _rate(r)
            lines.append(f"| {r['name']}{tag} | {r['input_rows']} | {r['curated_rows']} | {r['curate_s']:.1f} | "
                         f"{r['precompute_s']:.1f} | {rate['curate']:.2f} | {rate['precompute']:.2f} | "
                         f"{rate['total']:.2f} | {rate['total'] / base:.2f} | {r['curate_cpu_s']:.1f} | "
                         f"{r['precompute_cpu_s']:.1f} |")
        by_workers = {r["workers"]: _rate(r)["total"] for r in rep["ray"]}
        if 1 in by_workers:
            ratios.append(by_workers[1] / base)
        if 1 in by_workers and 2 in by_workers:
            scaling.append(by_workers[2] / by_workers[1])
    notes = []
    if ratios:
        each = ", ".join(f"{r:.2f}" for r in ratios)
        notes.append(f"ratio Ray Data (1 worker per pool) / fastest bare loop: {statistics.median(ratios):.2f}"
                     + (f" (median of {len(ratios)} repeats: {each})" if len(ratios) > 1 else "")
                     + " (goal >= 0.85)")
    if scaling:
        notes.append(f"scaling 2 workers / 1 worker per pool: {statistics.median(scaling):.2f}x")
    notes.append(f"machine: {os.cpu_count()} cores, Ray with {args.cpus} logical CPUs, {platform.platform()}; "
                 f"load average before/after: {load[0]:.1f} / {load[1]:.1f}; CPU s = busy core-seconds of "
                 "the whole machine during the phase (every process); each repeat runs the bare loop, then "
                 "Ray Data on a freshly started embedded cluster")
    return "\n".join(lines), notes


def record(table: str, notes: list[str], command: str, path: Path) -> None:
    """Append a dated entry under '## Data engine' in docs/performance.md (created if missing)."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    entry = (f"\n### {stamp}\n\nCommand: `{command}`\n\n{table}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    text = path.read_text() if path.exists() else "# Performance\n"
    if "## Data engine" not in text:
        text = text.rstrip("\n") + "\n\n## Data engine\n\nRows/s of curate + precompute (benchmarks/data_engine.py) " \
            "on the bench-world corpus, Ray Data vs a bare single-process loop of the same operators.\n"
    head, _, rest = text.partition("## Data engine")
    # Insert at the end of the Data engine section (before the next '## ' heading).
    cut = rest.find("\n## ")
    section, tail = (rest, "") if cut < 0 else (rest[:cut], rest[cut:])
    path.write_text(head + "## Data engine" + section.rstrip("\n") + "\n" + entry + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default=None, help="Working folder (default: a temp dir, removed at the end).")
    parser.add_argument("--preset", default="standard",
                        help="Corpus preset (fewstep corpus build): standard (9000 rows, the corpus the shipped "
                             "teachers are curated from; the recorded runs) or small (600 rows: a quick check, "
                             "dominated by fixed start-up costs).")
    parser.add_argument("--t2i-per-category", type=int, default=None)
    parser.add_argument("--edit-per-category", type=int, default=None)
    parser.add_argument("--cpus", type=int, default=2, help="Logical CPUs of the embedded Ray cluster.")
    parser.add_argument("--threads", default=",".join(str(t) for t in sorted({1, os.cpu_count() or 1})),
                        help="torch/ONNX threads of the bare loop, comma separated: each is run and the "
                             "fastest is the baseline (2 threads lose badly on a busy machine).")
    parser.add_argument("--workers", default="1,2", help="Actors per pool to measure, comma separated.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Measure bare loop + Ray Data this many times, back to back; the ratio reported is "
                             "the median (this VM's speed drifts by 10-20%% between runs).")
    parser.add_argument("--curate-config", default=str(REPO / "configs/curate/default.yaml"))
    parser.add_argument("--precompute-config", default=str(REPO / "configs/precompute/default.yaml"))
    parser.add_argument("--record", default=str(REPO / "docs/performance.md"),
                        help="Markdown file to append the results to ('' to skip).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in ("ray", "ray.data", "pipelines", "fewstep"):
        logging.getLogger(name).setLevel(logging.WARNING)
    load_before = os.getloadavg()[0]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fewstep-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from fewstep.bench.corpus.build import build_corpus
        from fewstep.models.tiny import init_tiny, load_tiny_config
        from fewstep.raysession import ray_session

        corpus = work / "corpus"
        if not (corpus / "corpus.json").exists():
            log.info("building the bench-world corpus (%s) in %s", args.preset, corpus)
            build_corpus(str(corpus), preset=args.preset, seed=0, resolution=64, workers=1, overwrite=True,
                         options=None, t2i_per_category=args.t2i_per_category,
                         edit_per_category=args.edit_per_category)
        teacher = work / "teacher"
        if not (teacher / "model_index.json").exists():
            init_tiny(str(teacher), load_tiny_config(REPO / "configs/models/tiny.yaml"), seed=0, overwrite=True)
        repeats = []
        for repeat in range(args.repeats):
            bares = []
            for threads in [int(t) for t in args.threads.split(",")]:
                log.info("repeat %d/%d: bare loop (%d threads)", repeat + 1, args.repeats, threads)
                bares.append(run_bare(work, corpus, str(teacher), threads, Path(args.curate_config),
                                      Path(args.precompute_config)))
            bare = max(bares, key=lambda r: _rate(r)["total"])
            results = []
            with ray_session(None, args.cpus):
                for workers in [int(w) for w in args.workers.split(",")]:
                    log.info("repeat %d/%d: Ray Data pipeline, %d worker(s) per pool", repeat + 1, args.repeats,
                             workers)
                    result = run_pipeline(work, corpus, str(teacher), workers, args.cpus, Path(args.curate_config),
                                          Path(args.precompute_config))
                    result["workers"] = workers
                    results.append(result)
            for r in results:  # same operators, same input: same counts
                if (r["input_rows"], r["curated_rows"], r["shard_rows"]) != (
                        bare["input_rows"], bare["curated_rows"], bare["shard_rows"]):
                    log.warning("row counts differ from the bare loop: %s vs %s", r, bare)
            repeats.append({"bare": bare, "other_bares": [b for b in bares if b is not bare], "ray": results})
        table, notes = render(repeats, args, (load_before, os.getloadavg()[0]))
        print(table)
        for note in notes:
            print(note)
        if args.record:
            command = "python benchmarks/data_engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
            record(table, notes, command.strip(), Path(args.record))
            print(f"appended to {args.record}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
