"""The demo's one-screen summary: teacher vs student with NFE, measured speed-up and scores."""

from __future__ import annotations

from typing import Any

from fewstep import storage


def short_composition(composition: dict) -> str:
    counts = composition.get("counts") or composition.get("selected") or composition
    text = str(counts)
    return text if len(text) < 300 else text[:297] + "..."


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: per model its role, NFE, seconds per image and mean score per bench."""
    models = {}
    for name, m in report["models"].items():
        models[name] = {
            "role": m["role"], "nfe": m["nfe"], "guidance_scale": m["guidance_scale"],
            "seconds_per_image": m["seconds_per_image"],
            "network_calls_per_image": m["network_calls_per_image"],
            "decode_seconds_per_image": m["decode_seconds_per_image"],
            "scores": {bench: b["score"] for bench, b in m["benches"].items()},
            "cases": {bench: b["cases"] for bench, b in m["benches"].items()},
        }
    teachers = [m for m in models.values() if m["role"] == "teacher"]
    students = [m for m in models.values() if m["role"] == "student"]
    speedup = None
    if teachers and students and students[0]["seconds_per_image"] > 0:
        speedup = teachers[0]["seconds_per_image"] / students[0]["seconds_per_image"]
    return {"models": models, "speedup": speedup}


def print_summary(summary: dict[str, Any], run_dir: str, seconds: dict[str, float]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    benches = list(dict.fromkeys(b for m in summary["models"].values() for b in m["scores"]))
    table = Table(title="fewstep demo: teacher vs student (judge scores 1-5, higher is better)")
    short = {"t2i-bench-mini": "T2I score", "editing-bench-mini": "Edit score"}
    for column in ("model", "role", "NFE", "calls/img", "s/img", *[short.get(b, b) for b in benches]):
        table.add_column(column, justify="left" if column in ("model", "role") else "right")
    for name, m in summary["models"].items():
        table.add_row(name, m["role"], str(m["nfe"]), f"{m['network_calls_per_image']:.0f}",
                      f"{m['seconds_per_image']:.3f}",
                      *[f"{m['scores'].get(b, float('nan')):.2f} ({m['cases'].get(b, 0)})" for b in benches])
    console.print(table)
    if summary["speedup"]:
        console.print(f"measured speed-up, student vs teacher: {summary['speedup']:.1f}x per image "
                      "(encode + sampling + decode)")
    console.print("(n) after a score: cases judged. Stage times: "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    console.print(f"report: {storage.join(run_dir, 'eval', 'report.md')}   "
                  f"summary: {storage.join(run_dir, 'summary.json')}")
