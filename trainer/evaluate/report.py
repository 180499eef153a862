"""Write an eval's results: per-case JSON, per-category tables, timings, sample grids.

Layout under the output URI (local or s3://)::

    report.json                     every number below, per model and bench, and ``paired``:
                                    each student vs each teacher case by case (compare.py);
                                    per model its path and ``weights``, a digest per component
                                    (models.info.fingerprint), so a later run can tell whether a
                                    path still holds the same model
    report.md                       the tables, readable
    tables/<bench>.md, .csv         models x categories (mean score), NFE, calls and s per image, and
                                    "text chars": the OCR character accuracy on `text` cases
    cases/<model>/<bench>.jsonl     one JSON per case and draw: prompt, seed, draw, score, verdict, timings
    images/<model>/<bench>/<id>.png the generated images (<id>-d<k>.png for draw k > 0)
    grids/<bench>/<category>.png    rows = models, columns = the first cases of the category
"""

from __future__ import annotations

import io
import json
from collections import defaultdict
from typing import Any

import numpy as np
from PIL import Image

from fewstep import storage
from fewstep.storage import StorageOptions
from trainer.evaluate.compare import paired_table, paired_within, text_char_accuracy
from trainer.evaluate.config import EvalConfig


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def summarise(models: list[dict[str, Any]], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per model: role, NFE, CFG, measured seconds and network calls per image, scores per bench."""
    out: dict[str, Any] = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model["name"]]
        if not mine:
            continue
        per_bench: dict[str, Any] = {}
        for bench in dict.fromkeys(r["bench"] for r in mine):
            bench_rows = [r for r in mine if r["bench"] == bench]
            categories = defaultdict(list)
            for r in bench_rows:
                categories[r["category"]].append(r["score"])
            chars = [v for v in (text_char_accuracy(r.get("details")) for r in bench_rows) if v is not None]
            per_bench[bench] = {
                "score": _mean([r["score"] for r in bench_rows]),
                # OCR character accuracy on the `text` cases (compare.py: the score saturates there)
                "text_chars": _mean(chars) if chars else None,
                "categories": {c: _mean(v) for c, v in categories.items()},
                "cases": len({r["case_id"] for r in bench_rows}),
                "draws_per_case": max(int(r.get("draw", 0)) for r in bench_rows) + 1,
                # This bench's own cost: edits encode a source image and are slower than prompts.
                "seconds_per_image": _mean([r["encode_s"] + r["sample_s"] + r["decode_s"] for r in bench_rows]),
                "network_calls_per_image": _mean([r["network_calls"] for r in bench_rows]),
            }
        seconds = [r["encode_s"] + r["sample_s"] + r["decode_s"] for r in mine]
        out[model["name"]] = {
            **{k: model[k] for k in ("role", "nfe", "guidance_scale", "shift", "path")},
            "weights": model.get("weights", {}),
            "images": len(mine),
            "seconds_per_image": _mean(seconds),
            "sample_seconds_per_image": _mean([r["sample_s"] for r in mine]),
            "decode_seconds_per_image": _mean([r["decode_s"] for r in mine]),
            "encode_seconds_per_image": _mean([r["encode_s"] for r in mine]),
            "network_calls_per_image": _mean([r["network_calls"] for r in mine]),
            "benches": per_bench,
        }
    return out


def bench_table(bench: str, summary: dict[str, Any], fmt: str = "md") -> str:
    """Models x categories for one bench, as Markdown or CSV."""
    names = [n for n, s in summary.items() if bench in s["benches"]]
    categories = list(dict.fromkeys(c for n in names for c in summary[n]["benches"][bench]["categories"]))
    chars = any(summary[n]["benches"][bench].get("text_chars") is not None for n in names)
    head = ["model", "role", "NFE", "CFG", "calls/img", "s/img", *categories, "overall",
            *(["text chars"] if chars else [])]
    lines = []
    for name in names:
        s, b = summary[name], summary[name]["benches"][bench]
        text_chars = b.get("text_chars")
        lines.append([name, s["role"], str(s["nfe"]), f"{s['guidance_scale']:g}",
                      f"{b['network_calls_per_image']:.0f}", f"{b['seconds_per_image']:.3f}",
                      *[f"{b['categories'].get(c, float('nan')):.2f}" for c in categories],
                      f"{b['score']:.2f}", *([f"{text_chars:.3f}" if text_chars is not None else "-"]
                                             if chars else [])])
    if fmt == "csv":
        return "\n".join(",".join(row) for row in [head, *lines]) + "\n"
    rule = ["---"] * len(head)
    return "\n".join("| " + " | ".join(row) + " |" for row in [head, rule, *lines]) + "\n"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def category_grid(rows: list[dict[str, Any]], models: list[str], limit: int) -> Image.Image:
    """One row per model, the same first ``limit`` cases in each column (their first draw)."""
    from trainer.evaluate.sampling import make_grid

    rows = [r for r in rows if int(r.get("draw", 0)) == 0]
    case_ids = list(dict.fromkeys(r["case_id"] for r in rows))[:limit]
    by_key = {(r["model"], r["case_id"]): r for r in rows}
    images, labels = [], []
    for model in models:
        for cid in case_ids:
            row = by_key.get((model, cid))
            image = Image.open(io.BytesIO(row["png"])) if row else Image.new("RGB", (8, 8), (255, 255, 255))
            images.append(image)
            labels.append(f"{model} {row['score']:.0f}" if row else f"{model} -")
    return make_grid(images, labels, columns=len(case_ids))


def write_report(config: EvalConfig, models: list[dict[str, Any]], rows: list[dict[str, Any]], output: str,
                 options: StorageOptions | None = None, wall_s: float | None = None) -> dict[str, Any]:
    from fewstep.bench.benches import load_bench

    output = storage.normalize(output)
    storage.makedirs(output, options)
    # Rows arrive in whatever order the actors finish: report in the config's bench order and
    # each bench's case order, so tables, case files and the demo summary read the same every run.
    position = {(bench, case.id): (b, i) for b, bench in enumerate(config.benches)
                for i, case in enumerate(load_bench(bench))}
    rows = sorted(rows, key=lambda r: (*position.get((r["bench"], r["case_id"]), (len(position), 0)),
                                       int(r.get("draw", 0))))
    summary = summarise(models, rows)
    for (model, bench), group in _group(rows, ("model", "bench")).items():
        lines = []
        for r in group:
            record = {k: v for k, v in r.items() if k not in ("png", "verdict", "details")}
            record["verdict"] = json.loads(r["verdict"])
            record["details"] = json.loads(r["details"])
            draw = int(r.get("draw", 0))
            record["image"] = f"images/{model}/{bench}/{r['case_id']}{f'-d{draw}' if draw else ''}.png"
            lines.append(json.dumps(record, sort_keys=True))
            storage.write_bytes_atomic(storage.join(output, record["image"]), r["png"], options)
        storage.write_bytes_atomic(storage.join(output, "cases", model, f"{bench}.jsonl"),
                                   ("\n".join(lines) + "\n").encode(), options)
    names = [m["name"] for m in models]
    grids = {}
    for (bench, category), group in _group(rows, ("bench", "category")).items():
        rel = f"grids/{bench}/{category}.png"
        storage.write_bytes_atomic(storage.join(output, rel),
                                   _png(category_grid(group, names, config.grid_cases)), options)
        grids.setdefault(bench, {})[category] = rel
    markdown = ["# fewstep eval", ""]
    for bench in config.benches:
        if not any(bench in s["benches"] for s in summary.values()):
            continue
        for fmt in ("md", "csv"):
            storage.write_bytes_atomic(storage.join(output, "tables", f"{bench}.{fmt}"),
                                       bench_table(bench, summary, fmt).encode(), options)
        markdown += [f"## {bench}", "", bench_table(bench, summary), ""]
    paired = paired_within(summary, rows)
    if paired:
        markdown += ["## Paired by case: students vs teachers", "", paired_table(paired), ""]
    report = {"output": output, "judge": config.judge, "models": summary, "grids": grids,
              "paired": [r.as_dict() for r in paired], "wall_seconds": wall_s,
              "config": config.model_dump(mode="json")}
    storage.write_bytes_atomic(storage.join(output, "report.md"), "\n".join(markdown).encode(), options)
    storage.write_json_atomic(storage.join(output, "report.json"), report, options)
    return report


def _group(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups
