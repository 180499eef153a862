"""Sampling benchmark: a 4-NFE student against its 80-NFE teacher with CFG, in one run.

Measures, on the same bench cases, same machine and same process, one model after the other:

- seconds per image, end to end (prompt encoding + sampling + VAE decode), and its parts;
- network calls per image (forward passes x samples; true CFG costs two per step);
- the speed-up student vs teacher (goal >= 30x), and the bound the network-call ratio and the
  measured fixed costs allow: ``(T_fixed + calls_teacher c) / (T_fixed + calls_student c)``
  with ``c`` the measured time per network call and ``T_fixed`` the measured encode + decode
  time per image. At tiny scale the VAE decode is a large share of the student's time, so the
  bound is well below the call ratio; the goal there is to reach >= 90% of the bound;
- the judge score ratio student / teacher on ``t2i-bench-mini``.

Usage (after ``make demo``, which leaves a student in runs/demo/distill/final)::

    python benchmarks/sampling.py [--teacher assets/teachers/base] [--student runs/demo/distill/final]
        [--bench t2i-bench-mini] [--cases-per-category 20] [--batch-size 20] [--repeats 1]

Prints a Markdown table for docs/performance.md and writes ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def measure(adapter, inputs, *, nfe: int, cfg: float, shift: float, batch_size: int, repeats: int) -> dict:
    from trainer.evaluate.sampling import prepare_cases, sample_cases

    # Warm-up (first-call allocations, lazy inits) outside the timings.
    sample_cases(adapter, adapter.transformer, inputs.select(slice(0, 1)), num_steps=1,
                 guidance_scale=cfg, shift=shift)
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        # Encoding is part of a call (the negative prompt only with CFG, which needs it).
        fresh = prepare_cases(adapter, inputs.cases, inputs.resolution, with_uncond=cfg > 1)
        result = sample_cases(adapter, adapter.transformer, fresh, num_steps=nfe, guidance_scale=cfg,
                              shift=shift, batch_size=batch_size)
        total = time.perf_counter() - start
        n = len(fresh)
        run = {"seconds_per_image": total / n, "encode_s": fresh.encode_s / n, "sample_s": result.sample_s / n,
               "decode_s": result.decode_s / n, "network_calls": result.network_calls / n,
               "forward_passes": result.forward_passes, "images": result.images}
        if best is None or run["seconds_per_image"] < best["seconds_per_image"]:
            best = run
    return best


def call_costs(adapter, inputs, *, batch_size: int, repeats: int = 10) -> dict:
    """Seconds per network call (per sample) of a conditional and of an unconditional forward
    pass, timed apart on one batch of the cases, interleaved so that drift hits both alike. The
    empty prompt is a few tokens long, so an unconditional call is cheaper than a conditional
    one; a CFG teacher makes both kinds, a student only conditional ones."""
    import torch

    part = inputs.select(slice(0, batch_size))
    n = len(part)
    t = torch.full((n,), 0.5)
    kinds = {"cond": part.cond, "uncond": part.uncond}
    spent = dict.fromkeys(kinds, 0.0)
    with torch.no_grad():
        for embeds in kinds.values():  # warm-up
            adapter.predict_velocity(adapter.transformer, part.noise, t, embeds, part.source_latents)
        for _ in range(repeats):
            for kind, embeds in kinds.items():
                start = time.perf_counter()
                adapter.predict_velocity(adapter.transformer, part.noise, t, embeds, part.source_latents)
                spent[kind] += time.perf_counter() - start
    return {kind: seconds / (repeats * n) for kind, seconds in spent.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=str(REPO / "assets" / "teachers" / "base"))
    parser.add_argument("--student", default=str(REPO / "runs" / "demo" / "distill" / "final"))
    parser.add_argument("--bench", default="t2i-bench-mini")
    parser.add_argument("--cases-per-category", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--teacher-nfe", type=int, default=80)
    parser.add_argument("--teacher-cfg", type=float, default=4.0)
    parser.add_argument("--student-nfe", type=int, default=None, help="Default: the student's exported steps.")
    parser.add_argument("--repeats", type=int, default=1, help="Best of N timed runs per model.")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--judge", default="offline", help="Bench judge; 'none' skips scoring.")
    parser.add_argument("--out", default=str(REPO / "runs" / "bench" / "sampling.json"))
    parser.add_argument("--doc", default=str(REPO / "docs" / "performance.md"),
                        help="Markdown file whose '## Sampling' section is replaced ('' skips).")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from fewstep.bench.benches import load_bench
    from fewstep.models.adapter import QwenImageAdapter
    from trainer.evaluate.judging import judge_case, load_judge
    from trainer.evaluate.sampling import prepare_cases
    from trainer.export import default_sampling

    if args.threads:
        torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    for label, path in (("teacher", args.teacher), ("student", args.student)):
        if not (Path(path) / "model_index.json").exists():
            print(f"error: --{label} {path} is not a pipeline directory (run `make demo` for a student)",
                  file=sys.stderr)
            return 2
    cases = load_bench(args.bench)
    chosen = []
    for category in dict.fromkeys(c.category for c in cases):
        chosen += [c for c in cases if c.category == category][: args.cases_per_category]
    student_info = default_sampling(args.student)
    teacher_info = default_sampling(args.teacher)
    plan = {
        "teacher": (args.teacher, args.teacher_nfe, args.teacher_cfg, teacher_info["shift"]),
        "student": (args.student, args.student_nfe or student_info["num_steps"] or 4,
                    student_info["cfg"] or 1.0, student_info["shift"]),
    }
    results = {}
    judge = None if args.judge == "none" else load_judge(args.judge)
    for name, (path, nfe, cfg, shift) in plan.items():
        ad = QwenImageAdapter.load(path, device=args.device)
        resolution = ad.resolution or chosen[0].resolution
        inputs = prepare_cases(ad, chosen, resolution, with_uncond=cfg > 1)
        print(f"{name}: {len(chosen)} {args.bench} cases, {nfe} NFE, CFG {cfg:g}, shift {shift:g} ...",
              flush=True)
        run = measure(ad, inputs, nfe=nfe, cfg=cfg, shift=shift, batch_size=args.batch_size,
                      repeats=args.repeats)
        if judge is not None:
            scores = [judge_case(judge, c, im)["score"] for c, im in zip(chosen, run["images"])]
            run["score"] = float(np.mean(scores))
        run.pop("images")
        run.update({"nfe": nfe, "guidance_scale": cfg, "path": path})
        if name == "teacher":
            run["call_costs"] = call_costs(ad, inputs, batch_size=args.batch_size)
        results[name] = run
        del ad

    t, s = results["teacher"], results["student"]
    speedup = t["seconds_per_image"] / s["seconds_per_image"]
    call_ratio = t["network_calls"] / s["network_calls"]
    per_call = t["sample_s"] / t["network_calls"]  # seconds per network call, from the long run
    fixed = (t["encode_s"] + t["decode_s"] + s["encode_s"] + s["decode_s"]) / 2
    bound = (fixed + t["network_calls"] * per_call) / (fixed + s["network_calls"] * per_call)
    # The same bound with each kind of call at its own cost: a CFG teacher makes one conditional
    # and one unconditional call per step, the student conditional calls only. The timed-apart
    # costs give the ratio of the two; the teacher's own run gives their level.
    costs = t["call_costs"]
    uncond_share = costs["uncond"] / costs["cond"]
    uncond_calls = t["network_calls"] / 2 if t["guidance_scale"] > 1 else 0.0
    cond_call = t["sample_s"] / (t["network_calls"] - uncond_calls + uncond_calls * uncond_share)
    bound_by_kind = (fixed + t["sample_s"]) / (fixed + s["network_calls"] * cond_call)
    summary = {
        "speedup": speedup, "network_call_ratio": call_ratio, "seconds_per_call": per_call,
        "fixed_seconds_per_image": fixed, "bound": bound, "fraction_of_bound": speedup / bound,
        "seconds_per_cond_call": costs["cond"], "seconds_per_uncond_call": costs["uncond"],
        "uncond_to_cond_call_cost": uncond_share, "seconds_per_cond_call_in_run": cond_call,
        "bound_by_call_kind": bound_by_kind, "fraction_of_bound_by_call_kind": speedup / bound_by_kind,
        "score_ratio": (s["score"] / t["score"]) if "score" in s and t.get("score") else None,
        "models": results, "bench": args.bench, "cases": len(chosen), "batch_size": args.batch_size,
        "device": args.device, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "load_avg_at_start": load_at_start,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")

    text = render(summary, args)
    print("\n" + text)
    if args.doc:
        write_section(Path(args.doc), text)
        print(f"wrote the Sampling section of {args.doc}")
    return 0


def render(summary: dict, args) -> str:
    lines = [
        "`python benchmarks/sampling.py` (one run; numbers below are from its last run).",
        "",
        f"Host: {platform.node()} ({summary['cpus']} CPUs, {summary['threads']} torch threads, "
        f"torch {summary['torch']}, device {summary['device']}); load average at start "
        f"{summary['load_avg_at_start']:.1f}. Teacher `{summary['models']['teacher']['path']}`, student "
        f"`{summary['models']['student']['path']}`; {summary['cases']} `{summary['bench']}` cases "
        f"(their own seeds), batch {summary['batch_size']}; seconds per image = prompt encoding + sampling "
        "+ VAE decode, best of the timed runs, after a warm-up call.",
        "",
        "| model | NFE | CFG | calls/img | s/img | encode | sample | decode | score |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in summary["models"].items():
        score = f"{r['score']:.2f}" if "score" in r else "-"
        lines.append(f"| {name} | {r['nfe']} | {r['guidance_scale']:g} | {r['network_calls']:.0f} | "
                     f"{r['seconds_per_image']:.4f} | {r['encode_s']:.4f} | {r['sample_s']:.4f} | "
                     f"{r['decode_s']:.4f} | {score} |")
    lines += [
        "",
        f"- Speed-up student / teacher: **{summary['speedup']:.1f}x** (goal >= 30x).",
        f"- Network-call ratio {summary['network_call_ratio']:.0f}x; {summary['seconds_per_call'] * 1000:.2f} ms "
        f"per call; fixed cost (encode + decode) {summary['fixed_seconds_per_image'] * 1000:.1f} ms per image. "
        f"Bound those allow: **{summary['bound']:.1f}x**; reached **{100 * summary['fraction_of_bound']:.0f}%** "
        "of it (goal >= 90%).",
        f"- Calls timed apart (batch {summary['batch_size']}, interleaved): conditional "
        f"{summary['seconds_per_cond_call'] * 1000:.2f} ms, unconditional (the empty prompt, a few tokens) "
        f"{summary['seconds_per_uncond_call'] * 1000:.2f} ms per sample "
        f"({summary['uncond_to_cond_call_cost']:.2f}x). The teacher makes one of each per step, the student "
        "conditional calls only; split in that proportion, the teacher's run puts a conditional call at "
        f"{summary['seconds_per_cond_call_in_run'] * 1000:.2f} ms. Bound with each kind at its own cost: "
        f"**{summary['bound_by_call_kind']:.1f}x**, reached **{100 * summary['fraction_of_bound_by_call_kind']:.0f}%**.",
    ]
    if summary["score_ratio"] is not None:
        lines.append(f"- Score ratio student / teacher on `{summary['bench']}`: **{summary['score_ratio']:.2f}**.")
    return "\n".join(lines) + "\n"


def write_section(path: Path, body: str) -> None:
    """Replace (or append) the '## Sampling' section of ``path``, keeping the others."""
    import re

    text = path.read_text() if path.exists() else "# Performance\n\nMeasured numbers; each section says how.\n"
    section = "## Sampling\n\n" + body.strip() + "\n"
    pattern = re.compile(r"^## Sampling\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


if __name__ == "__main__":
    raise SystemExit(main())
