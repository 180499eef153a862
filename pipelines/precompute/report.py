"""Progress summary for humans: the end-of-run table and the stats files in ``<out>/stats/``."""

from __future__ import annotations

import json

from fewstep import storage
from fewstep.storage import StorageOptions

STATS_DIR = "stats"


def write_stats(output: str, options: StorageOptions | None, ray_stats: str | None, run: dict) -> None:
    """Ray Data's per-operator stats (text) and this run's timings (JSON); not part of the data."""
    if ray_stats:
        storage.write_bytes_atomic(storage.join(output, STATS_DIR, "precompute_ray_data.txt"),
                                   ray_stats.encode("utf-8"), options)
    storage.write_json_atomic(storage.join(output, STATS_DIR, "precompute_run.json"), run, options)


def summary_table(manifest: dict, run: dict):
    """A rich Table: rows by task and category, rejects, shards made and skipped, speed."""
    from rich.table import Table

    table = Table(title=f"precompute: {run['output']}", show_lines=False)
    table.add_column("task")
    table.add_column("category")
    table.add_column("rows", justify="right")
    for key, count in sorted(manifest["totals"]["by_category"].items()):
        task, _, category = key.partition("/")
        table.add_row(task, category, str(count))
    table.add_row("[bold]all[/bold]", "", f"[bold]{manifest['totals']['rows']}[/bold]")
    rejects = manifest["totals"].get("rejects", {})
    for reason, count in sorted(rejects.items()):
        table.add_row("[red]rejected[/red]", reason, str(count))
    return table


def summary_lines(manifest: dict, run: dict) -> list[str]:
    return [
        f"shards: {len(manifest['shards'])} ({run['shards_written']} made now, {run['shards_skipped']} "
        "already done)",
        f"encoded: {run['rows_encoded']} rows in {run['encode_seconds']:.1f} s "
        f"({run['rows_per_s']:.2f} rows/s); whole run {run['seconds']:.1f} s",
        f"tensors: {manifest['dtype']}, text dim {manifest['text_embed_dim']}, latents "
        f"{manifest['latent_shapes'] or '-'}; teacher {manifest['teacher']['sha256'][:12]}",
        f"stats: {run['output']}/stats/",
    ]


def print_summary(manifest: dict, run: dict) -> None:
    from rich.console import Console

    console = Console(stderr=True)
    console.print(summary_table(manifest, run))
    for line in summary_lines(manifest, run):
        console.print(line)


def dumps(payload: dict) -> str:
    return json.dumps(payload, indent=2, sort_keys=True)
