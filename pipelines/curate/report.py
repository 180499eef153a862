"""``composition.json`` and the end-of-run summary table."""

from __future__ import annotations

from collections import Counter

from fewstep.contract import REJECT_REASONS
from pipelines.curate.rebalance import Selection


def composition_report(*, config_name: str, config_hash: str, inputs: list[str], input_rows: int,
                       rejects: list[dict], selection: Selection, output_rows: int, seed: int,
                       replace: bool) -> dict:
    by_reason = Counter(r["reason"] for r in rejects)
    unknown = sorted(set(by_reason) - set(REJECT_REASONS))
    if unknown:
        raise RuntimeError(f"reject reasons outside the contract vocabulary: {unknown}")
    kept_rows = len(selection.copies)
    report = {
        "config": config_name,
        "config_hash": config_hash,
        "inputs": inputs,
        "input_rows": input_rows,
        "kept_rows": kept_rows,
        "output_rows": output_rows,
        "repeats": output_rows - kept_rows,
        "rejected_rows": len(rejects),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "rejected_by_stage": dict(sorted(Counter(r["stage"] for r in rejects).items())),
        "available": selection.available,
        "target": selection.targets,
        "achieved": selection.achieved,
        "target_by_task": {t: sum(c.values()) for t, c in selection.targets.items()},
        "achieved_by_task": {t: sum(c.values()) for t, c in selection.achieved.items()},
        "shortfalls": selection.shortfalls,
        "exact": not selection.shortfalls,
        "seed": seed,
        "replace": replace,
    }
    if input_rows != kept_rows + len(rejects):
        raise RuntimeError(f"counts do not reconcile: input_rows={input_rows} != kept_rows={kept_rows} + "
                           f"rejected_rows={len(rejects)} (a bug in curate: please report it)")
    return report


def summary_tables(report: dict):
    """Rich tables: totals, rejects by reason, target vs achieved by task and category."""
    from rich.table import Table

    totals = Table(title=f"curate: {report['config']} (config {report['config_hash']})")
    for name in ("input rows", "kept rows", "rejected rows", "output rows", "repeats"):
        totals.add_column(name, justify="right")
    totals.add_row(*(str(report[k]) for k in ("input_rows", "kept_rows", "rejected_rows", "output_rows",
                                              "repeats")))
    rejects = Table(title="rejected by reason")
    rejects.add_column("reason")
    rejects.add_column("rows", justify="right")
    for reason, count in report["rejected_by_reason"].items():
        rejects.add_row(reason, str(count))
    mix = Table(title="composition")
    for name in ("task", "category", "available", "target", "achieved", ""):
        mix.add_column(name, justify="right" if name in ("available", "target", "achieved") else "left")
    short = {(s["task"], s["category"]) for s in report["shortfalls"]}
    for task in sorted(set(report["target"]) | set(report["available"])):
        cats = sorted(set(report["target"].get(task, {})) | set(report["available"].get(task, {})))
        for cat in cats:
            target = report["target"].get(task, {}).get(cat)
            note = "[red]short[/red]" if (task, cat) in short else "not in composition" if target is None else ""
            mix.add_row(task, cat, str(report["available"].get(task, {}).get(cat, 0)),
                        "-" if target is None else str(target),
                        str(report["achieved"].get(task, {}).get(cat, 0)), note)
    return [totals, rejects, mix] if report["rejected_by_reason"] else [totals, mix]


def print_summary(report: dict, console=None) -> None:
    """Print the summary tables (and any shortfall) with rich."""
    from rich.console import Console

    console = console or Console()
    for table in summary_tables(report):
        console.print(table)
    if report["shortfalls"]:
        short = ", ".join(f"{s['task']}/{s['category']} ({s['achieved']}/{s['target']})" for s in report["shortfalls"])
        console.print(f"[yellow]short of target: {short}[/yellow]")
