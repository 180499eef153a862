"""DMD step throughput: Ray Train + DeepSpeed against a bare single-process torch loop.

Both run the very same DMD iteration (``DMDObjective.train_step``: ``fake_updates`` fake-score
updates then one student update, teacher CFG, backward simulation) on the same shards, batch
size, threads and number of steps, one after the other in one run:

- ``bare``: one Python process, plain ``torch.optim.AdamW`` per trainable model, rows read
  with pyarrow; no Ray, no DeepSpeed, no checkpoints.
- ``ray``: ``fewstep distill``'s runtime: a Ray Train ``TorchTrainer`` with one worker holding
  the same threads, each trainable model in a DeepSpeed engine (ZeRO-0 by default, as the
  flow-matching throughput run of ``benchmarks/trainer.py``), shards streamed, metrics and
  ``ray.train.report`` every step.

Steady-state steps/s excludes the first ``warmup`` steps of each (model loading, DeepSpeed op
builds, the first allocations). Goal: ray / bare >= 0.90. Used by ``benchmarks/trainer.py``
(its DMD section) and runnable alone; without ``--teacher``/``--data`` it builds the random
``teacher``-preset world of ``benchmarks/trainer.py``::

    python benchmarks/dmd_step.py [--teacher DIR --data SHARDS] [--steps 12 --batch-size 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def objective_body(teacher: str, fake_updates: int) -> dict[str, Any]:
    return {"name": "dmd", "guidance": {"teachers": [{"name": "base", "path": teacher}], "preset": "base"},
            "student_steps": 4, "student_shift": 3.0, "guidance_scale": 4.0, "fake_updates": fake_updates,
            "student_optimizer": {"lr": 1e-5}, "fake_optimizer": {"lr": 2e-5},
            "mixture": {"ratio": {"t2i": 1, "edit": 0}}}


class BareHandle:
    """A trainable or frozen model with plain torch AdamW: the whole 'runtime' of the bare loop."""

    def __init__(self, name: str, module, trainable: bool, lr: float):
        import torch

        self.name, self.trainable, self.module, self.net = name, trainable, module, module
        self.opt = torch.optim.AdamW(module.parameters(), lr=lr) if trainable else None
        if not trainable:
            module.requires_grad_(False).eval()
        self.steps = 0

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        import torch

        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps += 1
        return {"grad_norm": float(norm), "lr": self.opt.param_groups[0]["lr"]}

    def zero_grad(self) -> None:
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)

    @property
    def optimizer_steps(self) -> int:
        return self.steps


def bare_loop(teacher: str, data: str, *, steps: int, batch_size: int, threads: int, fake_updates: int,
              warmup: int) -> dict[str, float]:
    """steps/s of the DMD step in one process without Ray or DeepSpeed."""
    import numpy as np
    import pyarrow.dataset as pads
    import torch

    from fewstep.config import parse_config
    from trainer.objectives.base import ObjectiveEnv, TrainState
    from trainer.objectives.dmd import DMDConfig, DMDObjective
    from trainer.runtime.data import table_to_numpy

    torch.set_num_threads(threads)
    cfg = parse_config(DMDConfig, {k: v for k, v in objective_body(teacher, fake_updates).items() if k != "name"})
    env = ObjectiveEnv(rank=0, world_size=1, device=torch.device("cpu"), storage=None,
                       run_uri=tempfile.mkdtemp(prefix="bare-dmd-"), data_uri=data, work_dir=Path(tempfile.gettempdir()))
    objective = DMDObjective(cfg, env)
    handles = {}
    for spec in objective.model_specs():
        lr = spec.optimizer.lr if spec.optimizer else 0.0
        handles[spec.name] = BareHandle(spec.name, spec.build(), spec.trainable, lr)
    files = sorted(str(p) for p in Path(data, "shards").glob("part-*.parquet"))
    table = pads.dataset(files, format="parquet").to_table(columns=list(objective.columns))
    rng = np.random.default_rng(0)

    def rows():
        while True:
            order = rng.permutation(table.num_rows)
            for start in range(0, len(order) - batch_size + 1, batch_size):
                yield table_to_numpy(table.take(order[start:start + batch_size]))

    stream = rows()
    state = TrainState(step=0, max_steps=steps, rank=0, world_size=1, device=torch.device("cpu"),
                       compute_dtype=torch.float32, models=handles, generator=torch.Generator().manual_seed(0))
    state.next_batch = lambda: objective.collate(next(stream), state.device)
    objective.setup(state)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        objective.train_step(state, objective.collate(next(stream), state.device))
        state.step += 1
        times.append(time.perf_counter() - start)
    steady = times[warmup:]
    return {"steps_per_s": len(steady) / sum(steady), "seconds_per_step": float(np.median(steady)),
            "steps": len(steady)}


def ray_run(teacher: str, data: str, *, steps: int, batch_size: int, threads: int, fake_updates: int,
            warmup: int, zero_stage: int, runs_dir: str, log_every: int = 1) -> dict[str, float]:
    """steps/s of the same step under Ray Train + DeepSpeed (one worker with ``threads`` CPUs)."""
    from fewstep.config import parse_config
    from fewstep.settings import Settings
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    cfg = parse_config(TrainConfig, {
        "run": {"name": f"bench-dmd-{int(time.time())}", "runs_dir": runs_dir},
        "launcher": "ray",
        "scaling": {"num_workers": 1, "cpus_per_worker": threads},
        "deepspeed": {"enabled": True, "zero_stage": zero_stage},
        "train": {"max_steps": steps, "batch_size": batch_size, "log_every": log_every, "checkpoint_every": 10**6,
                  "export": False, "progress": False, "shuffle_buffer": 0},
        "data": {"uri": data},
        "objective": objective_body(teacher, fake_updates),
    })
    result = launch(cfg, Settings(runs_dir=runs_dir))
    records = read_metrics(result.run_uri)
    # Consecutive wall-clock stamps of the metric records (every ``log_every`` steps) give step
    # times, from the first record at or after the warm-up (the final checkpoint is written
    # after the last record, so it is not counted).
    timed = [r for r in records if r["step"] >= warmup]
    pairs = list(zip(timed, timed[1:]))
    if not pairs:
        return {"steps_per_s": float(records[-1]["steps_per_s"]), "seconds_per_step": math.nan, "steps": 0}
    import numpy as np

    counted = sum(b["step"] - a["step"] for a, b in pairs)
    per_step = [(b["time"] - a["time"]) / (b["step"] - a["step"]) for a, b in pairs]
    return {"steps_per_s": counted / (timed[-1]["time"] - timed[0]["time"]),
            "seconds_per_step": float(np.median(per_step)), "steps": counted}


def compare(teacher: str, data: str, *, steps: int = 12, batch_size: int = 8, threads: int = 1,
            fake_updates: int = 2, warmup: int = 3, zero_stage: int = 0, log_every: int = 1,
            runs_dir: str | None = None) -> dict[str, Any]:
    runs_dir = runs_dir or tempfile.mkdtemp(prefix="bench-dmd-runs-")
    common = {"steps": steps, "batch_size": batch_size, "threads": threads, "fake_updates": fake_updates,
              "warmup": warmup}
    bare = bare_loop(teacher, data, **common)
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(threads)
    ray = ray_run(teacher, data, zero_stage=zero_stage, runs_dir=runs_dir, log_every=log_every, **common)
    ratio = ray["steps_per_s"] / bare["steps_per_s"] if bare["steps_per_s"] else math.nan
    return {"bare": bare, "ray_deepspeed": ray, "ratio": ratio, "goal": 0.90, **common,
            "zero_stage": zero_stage, "log_every": log_every}


def render_markdown(result: dict[str, Any]) -> str:
    bare, ray = result["bare"], result["ray_deepspeed"]
    return "\n".join([
        f"**DMD step.** One DMD iteration ({result['fake_updates']} fake-score updates + 1 student update: "
        "backward simulation over the 4-step student, teacher with true CFG 4, DMD2 surrogate) on the "
        f"`teacher`-preset transformer (student, fake score and teacher), batch {result['batch_size']}, "
        f"{result['threads']} thread(s), {bare['steps']} timed steps after {result['warmup']} warm-up steps. "
        "Bare: the same `DMDObjective.train_step` in one process with torch AdamW and rows in memory. "
        f"Runtime: Ray Train (1 worker), DeepSpeed ZeRO-{result['zero_stage']} engines for student and fake "
        f"score, shards streamed, metrics + `ray.train.report` every {result.get('log_every', 1)} step(s).",
        "",
        "| loop | steps/s | s/step (median) |",
        "| --- | --- | --- |",
        f"| bare torch | {bare['steps_per_s']:.3f} | {bare['seconds_per_step']:.3f} |",
        f"| Ray Train + DeepSpeed | {ray['steps_per_s']:.3f} | {ray['seconds_per_step']:.3f} |",
        f"| **ratio** (goal >= 0.90) | **{result['ratio']:.3f}** | |",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="Teacher pipeline (default: a random teacher preset).")
    parser.add_argument("--data", default=None, help="Shards encoded with --teacher.")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fake-updates", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=1, help="Metrics + ray.train.report every N steps "
                        "in the Ray run (the flow-matching run of benchmarks/trainer.py uses 5).")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "dmd_step.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if (args.teacher is None) != (args.data is None):
        print("error: give both --teacher and --data, or neither", file=sys.stderr)
        return 2
    if args.teacher is None:
        from trainer.runtime.synthetic import ensure_tiny_world

        work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-dmd-"))
        args.teacher, args.data = ensure_tiny_world(work / "world", t2i_rows=max(4 * args.batch_size, 64),
                                                    edit_rows=0, preset="teacher")
    for label, path, marker in (("teacher", args.teacher, "model_index.json"), ("data", args.data, "manifest.json")):
        if not (Path(path) / marker).exists():
            print(f"error: --{label} {path} has no {marker}", file=sys.stderr)
            return 2
    result = compare(args.teacher, args.data, steps=args.steps, batch_size=args.batch_size, threads=args.threads,
                     fake_updates=args.fake_updates, warmup=args.warmup, zero_stage=args.zero_stage,
                     log_every=args.log_every)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(render_markdown(result))
    print(f"\nDMD step, batch {args.batch_size}, {args.fake_updates} fake updates, {args.threads} threads: "
          f"Ray Train + DeepSpeed / bare = {result['ratio']:.3f} (goal >= 0.90); results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
