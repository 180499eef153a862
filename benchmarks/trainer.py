"""Trainer benchmark: runtime overhead and ZeRO-3 memory savings, measured in one run.

1. Throughput: the same flow-matching step (tiny ``teacher`` preset transformer, same batch,
   same threads) as a bare single-process torch loop over batches already in memory, and
   under the runtime (Ray Train, 1 worker, DeepSpeed ZeRO-0, shard streaming, metrics and
   ``ray.train.report`` every ``log_every`` steps). Prints ``ray_steps_per_s / bare_steps_per_s``
   (goal >= 0.90).
2. Memory: per-worker peak memory (peak RSS on CPU, max allocated on GPU; the max over
   workers) of a larger transformer trained under ZeRO-3 vs ZeRO-0 at 2 workers (goal <= 0.6x).
   Also reported above the memory each worker had before its models were built, which is
   what ZeRO partitions.

Results go to ``docs/performance.md`` under ``## Trainer`` (other sections are kept).

    python benchmarks/trainer.py                     # both parts (~10 min on 2 idle cores)
    python benchmarks/trainer.py --skip-memory       # throughput only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

# A transformer big enough that model states dominate a worker's memory (~170 M parameters),
# with the teacher preset's text encoder and VAE so that the same shards fit it.
BIG_PRESET = """
name: bench-big
resolution: 64
condition_image_size: 56
vocab_size: 4096
transformer: {num_layers: 8, num_attention_heads: 12, attention_head_dim: 64, axes_dims_rope: [16, 24, 24]}
vae: {z_dim: 16, base_dim: 16, dim_mult: [1, 2, 4], num_res_blocks: 1, temperal_downsample: [false, true]}
text_encoder: {hidden_size: 128, intermediate_size: 256, num_hidden_layers: 2, num_attention_heads: 4,
               num_key_value_heads: 2, mrope_section: [4, 6, 6], vision_depth: 2, vision_hidden_size: 64,
               vision_intermediate_size: 128, vision_num_heads: 2}
"""


def _run_config(name: str, runs: Path, shards: str, init: dict, *, workers: int, threads: int, stage: int,
                steps: int, batch: int, log_every: int):
    from trainer.runtime.config import TrainConfig

    return TrainConfig.model_validate({
        "run": {"name": name, "runs_dir": str(runs)},
        "launcher": "ray",
        "scaling": {"num_workers": workers, "cpus_per_worker": threads},
        "deepspeed": {"enabled": True, "zero_stage": stage},
        "train": {"max_steps": steps, "batch_size": batch, "log_every": log_every,
                  "checkpoint_every": 10**9, "progress": False, "export": False, "max_failures": 0},
        "data": {"uri": shards},
        "objective": {"name": "flow_matching", "init": init, "optimizer": {"lr": 1e-4}},
    })


def bare_loop(pipeline: str, shards: str, steps: int, warmup: int, batch: int, threads: int) -> float:
    """The same step with nothing around it: batches pre-collated in memory, torch AdamW."""
    import torch

    from trainer.objectives.base import ObjectiveEnv, TrainState
    from trainer.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective
    from trainer.runtime.config import DataSection
    from trainer.runtime.data import LocalReader, open_source

    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    cfg = FlowMatchingConfig.model_validate({"init": {"from": "pretrained", "path": pipeline},
                                             "optimizer": {"lr": 1e-4}})
    env = ObjectiveEnv(0, 1, torch.device("cpu"), None, str(work), shards, work)
    objective = FlowMatchingObjective(cfg, env)
    (spec,) = objective.model_specs()
    model = spec.build().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    state = TrainState(step=0, max_steps=steps, rank=0, world_size=1, device=torch.device("cpu"),
                       compute_dtype=torch.float32, models={}, generator=torch.Generator().manual_seed(0))
    objective.setup(state)
    source = open_source(DataSection(uri=shards), "shards", None, None)
    batches = [objective.collate(rows, torch.device("cpu"))
               for rows in LocalReader(source, None).batches(batch, seed=0, epoch=0)]
    start = None
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        loss, _ = objective.loss(state, model, batches[step % len(batches)])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps / (time.perf_counter() - start)


def runtime_rate(records: list[dict], warmup: int) -> float:
    """Steps/s between the first log at or after ``warmup`` and the last log (wall clock)."""
    after = [r for r in records if r["step"] >= warmup]
    first, last = after[0], after[-1]
    return (last["step"] - first["step"]) / (last["time"] - first["time"])


RESULTS_TAG = "<!-- trainer-results "


def previous_results(path: Path) -> dict:
    """Results embedded in the doc by the last run (so a part-only run keeps the other part)."""
    if not path.exists():
        return {}
    text = path.read_text()
    start = text.find(RESULTS_TAG)
    if start < 0:
        return {}
    end = text.find(" -->", start)
    try:
        return json.loads(text[start + len(RESULTS_TAG):end])
    except ValueError:
        return {}


def write_section(path: Path, body: str, results: dict) -> None:
    text = path.read_text() if path.exists() else "# Performance\n\nMeasured numbers; each section says how.\n"
    section = ("## Trainer\n\n" + body.strip() + "\n\n" + RESULTS_TAG
               + json.dumps(results, sort_keys=True) + " -->\n")
    pattern = re.compile(r"^## Trainer\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="Timed steps of each throughput run.")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (= CPUs of the Ray worker).")
    parser.add_argument("--mem-steps", type=int, default=3)
    parser.add_argument("--mem-batch", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    # DMD section (owned by the DMD area: benchmarks/dmd_step.py does the measuring).
    parser.add_argument("--skip-dmd", action="store_true", help="Skip the DMD step throughput part.")
    parser.add_argument("--dmd-steps", type=int, default=28, help="DMD iterations of each run (warm-up included).")
    parser.add_argument("--dmd-warmup", type=int, default=3)
    parser.add_argument("--dmd-log-every", type=int, default=5)
    parser.add_argument("--dmd-batch", type=int, default=8)
    parser.add_argument("--out", default=str(REPO / "docs" / "performance.md"))
    parser.add_argument("--workdir", default=None, help="Keep models/shards here (default: a temp dir).")
    args = parser.parse_args()

    import torch

    from fewstep.raysession import ray_init
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics
    from trainer.runtime.synthetic import ensure_tiny_world

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-trainer-"))
    runs = work / "runs"
    # 128 encoded rows, each stored 8 times: epochs of 1024 rows, as a real dataset is much
    # larger than a batch (every epoch restarts Ray Data's streaming read).
    print(f"[bench] building the teacher-preset pipeline and 128 x 8 shard rows in {work}", flush=True)
    pipeline, shards = ensure_tiny_world(work / "world-1024", t2i_rows=128, edit_rows=0, preset="teacher",
                                         repeat=8, rows_per_shard=256)
    ray_init(num_cpus=max(4, os.cpu_count() or 1))
    host = f"{platform.node()} ({os.cpu_count()} CPUs, torch {torch.__version__})"
    results: dict = {}

    if not args.skip_throughput:
        load = os.getloadavg()[0]
        print("[bench] bare torch loop", flush=True)
        bare_before = bare_loop(pipeline, shards, args.steps, args.warmup, args.batch, args.threads)
        print(f"[bench] bare: {bare_before:.3f} steps/s", flush=True)
        name = f"throughput-{int(time.time())}"
        config = _run_config(name, runs, shards, {"from": "pretrained", "path": pipeline}, workers=1,
                             threads=args.threads, stage=0, steps=args.warmup + args.steps, batch=args.batch,
                             log_every=5)
        print("[bench] Ray Train + DeepSpeed ZeRO-0, 1 worker", flush=True)
        launch(config)
        ray_rate = runtime_rate(read_metrics(str(runs / name)), args.warmup)
        print(f"[bench] runtime: {ray_rate:.3f} steps/s; bare loop again", flush=True)
        # Bare loop before and after, averaged: the machine's load drifts during the run.
        bare_after = bare_loop(pipeline, shards, args.steps, args.warmup, args.batch, args.threads)
        bare = (bare_before + bare_after) / 2
        results["throughput"] = {"bare_steps_per_s": bare, "bare_before": bare_before,
                                 "bare_after": bare_after, "ray_deepspeed_steps_per_s": ray_rate,
                                 "ratio": ray_rate / bare, "batch": args.batch, "threads": args.threads,
                                 "steps": args.steps, "host": host, "load_avg": load}
        print(f"[bench] runtime: {ray_rate:.3f} steps/s; ratio {ray_rate / bare:.3f} (goal >= 0.90)", flush=True)

    if not args.skip_memory:
        preset = work / "bench-big.yaml"
        preset.write_text(BIG_PRESET)
        # Built once here; the workers load it like any pretrained pipeline (one copy each).
        from fewstep.models.tiny import init_tiny, load_tiny_config

        big = work / "big-pipeline"
        if not (big / "model_index.json").exists():
            init_tiny(big, load_tiny_config(preset), overwrite=True)
        memory = {"host": host, "load_avg": os.getloadavg()[0], "batch": args.mem_batch}
        for stage in (0, 3):
            name = f"memory-zero{stage}-{int(time.time())}"
            config = _run_config(name, runs, shards, {"from": "pretrained", "path": str(big)},
                                 workers=2, threads=1, stage=stage, steps=args.mem_steps,
                                 batch=args.mem_batch, log_every=1)
            print(f"[bench] memory: ZeRO-{stage}, 2 workers", flush=True)
            launch(config)
            last = read_metrics(str(runs / name))[-1]
            memory[f"zero{stage}"] = {"peak_mb": last["peak_mem_mb"],
                                      "before_models_mb": last["mem_before_models_mb"]}
        z0, z3 = memory["zero0"], memory["zero3"]
        memory["ratio"] = z3["peak_mb"] / z0["peak_mb"]
        memory["ratio_above_baseline"] = ((z3["peak_mb"] - z3["before_models_mb"])
                                          / (z0["peak_mb"] - z0["before_models_mb"]))
        results["memory"] = memory
        print(f"[bench] memory ratio ZeRO-3 / ZeRO-0: {memory['ratio']:.3f} "
              f"(above baseline {memory['ratio_above_baseline']:.3f}; goal <= 0.6)", flush=True)

    if not args.skip_dmd:
        # DMD section: the same DMD iteration bare vs under the runtime (benchmarks/dmd_step.py).
        from benchmarks.dmd_step import compare

        print("[bench] DMD step: bare torch loop vs Ray Train + DeepSpeed ZeRO-0, 1 worker", flush=True)
        # Metrics + ray.train.report every 5 steps, as in the flow-matching run above (the
        # runtime's default is 10); --dmd-log-every 1 reports every step.
        results["dmd"] = compare(pipeline, shards, steps=args.dmd_steps, batch_size=args.dmd_batch,
                                 threads=args.threads, runs_dir=str(runs), log_every=args.dmd_log_every,
                                 warmup=args.dmd_warmup)
        print(f"[bench] DMD ratio {results['dmd']['ratio']:.3f} (goal >= 0.90)", flush=True)

    print(json.dumps(results, indent=2))
    merged = {**previous_results(Path(args.out)), **results}
    write_section(Path(args.out), render(merged), merged)
    print(f"[bench] wrote {args.out}")


def render(results: dict) -> str:
    lines = [
        "`python benchmarks/trainer.py` (all parts in one run; `--skip-memory` / `--skip-throughput` / `--skip-dmd` "
        "re-measure some parts and keep the others' last numbers).",
        "",
    ]
    if "throughput" in results:
        t = results["throughput"]
        lines += [
            f"Measured on {t['host']}, load average {t['load_avg']:.1f} at the start.",
            "",
            "**Runtime overhead.** Flow-matching step of the tiny `teacher` preset transformer "
            f"(64 image tokens), batch {t['batch']}, {t['threads']} thread(s), {t['steps']} timed steps after "
            "warm-up. Bare loop: one process, torch AdamW, batches already in memory. Runtime: Ray Train "
            "(1 worker), DeepSpeed ZeRO-0, shards (1,024 rows) streamed with `get_dataset_shard`, "
            "metrics + `ray.train.report` every 5 steps.",
            "",
            "| loop | steps/s |",
            "| --- | --- |",
            f"| bare torch (mean of before {t['bare_before']:.3f} and after {t['bare_after']:.3f}) "
            f"| {t['bare_steps_per_s']:.3f} |",
            f"| Ray Train + DeepSpeed | {t['ray_deepspeed_steps_per_s']:.3f} |",
            f"| **ratio** (goal >= 0.90) | **{t['ratio']:.3f}** |",
            "",
        ]
    if "memory" in results:
        m = results["memory"]
        lines += [
            f"Measured on {m['host']}, load average {m['load_avg']:.1f} at the start.",
            "",
            "**ZeRO-3 memory.** A ~170 M-parameter QwenImageTransformer2DModel (8 layers, 12 x 64 heads), "
            f"fp32 + AdamW, 2 workers, batch {m['batch']}. Peak = peak RSS of a worker process (max over "
            "workers); 'before models' = its RSS before the models were built (Python, torch, Ray, "
            "DeepSpeed), measured before the objective loads any model. Both runs use the runtime's "
            "defaults: under ZeRO-3 the model is built partitioned (`deepspeed.zero.Init`, weights "
            "streamed in per tensor) and the workers' glibc returns freed blocks of 1 MiB or more "
            "(`train.cpu_mmap_threshold_mb: auto`, on under ZeRO-3 only).",
            "",
            "| ZeRO stage | peak per worker (MiB) | before models (MiB) |",
            "| --- | --- | --- |",
            f"| 0 | {m['zero0']['peak_mb']:.0f} | {m['zero0']['before_models_mb']:.0f} |",
            f"| 3 | {m['zero3']['peak_mb']:.0f} | {m['zero3']['before_models_mb']:.0f} |",
            "",
            f"Peak ratio ZeRO-3 / ZeRO-0: **{m['ratio']:.3f}** (goal <= 0.6); above the pre-model "
            f"baseline: **{m['ratio_above_baseline']:.3f}**.",
            "",
        ]
    if "dmd" in results:  # DMD section (benchmarks/dmd_step.py)
        from benchmarks.dmd_step import render_markdown

        lines += [render_markdown(results["dmd"]), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
