"""Score a bench: judge every case's image, then per-category and average tables.

Python API (what ``fewstep eval`` calls)::

    from fewstep.bench.scoring import score_bench
    report = score_bench("t2i-bench-mini", {case_id: PIL.Image, ...}, judge)
    report.average, report.per_category["portrait"].mean_score, report.to_markdown()

CLI: ``fewstep bench score --bench NAME --images URI --out URI`` reads ``<case_id>.png`` files
(for editing benches: the edited outputs; sources come from the bench) and writes
``cases.jsonl`` (one line per case: the paper's JSON verdict plus status and details),
``scores.json`` and ``scores.md`` (per-category and average tables).

A case without an image is reported as ``missing``; an image that does not decode as
``unreadable``; a judge that fails on a case as ``error`` (with the message). None of them
stops the run. Means are over scored cases; ``average_missing_as_1`` also counts every
unscored case as the lowest score, so skipping hard cases never raises a generator's number.
"""

from __future__ import annotations

import io
import logging
import statistics
from typing import Any, Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from tqdm import tqdm

from fewstep import storage
from fewstep.bench.judges.base import Judge, JudgeError
from fewstep.bench.judges.rubrics import EDIT_CRITERIA
from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ROLES = ("instruction", "preservation", "quality")


class CaseResult(BaseModel):
    case_id: str
    category: str
    task: str
    status: Literal["scored", "missing", "unreadable", "error"]
    score: int | None = None
    verdict: dict[str, Any] | None = None  # the paper's JSON form
    details: dict[str, Any] | None = None
    error: str | None = None


class CategorySummary(BaseModel):
    n: int
    scored: int
    missing: int
    failed: int
    mean_score: float | None
    score_histogram: dict[str, int]
    sub_scores: dict[str, float] = Field(default_factory=dict)  # edit: mean per role
    set_metrics: dict[str, float] = Field(default_factory=dict)  # e.g. kid, fid


class BenchReport(BaseModel):
    bench: str
    version: int
    task: str
    judge: dict[str, Any]
    n_cases: int
    n_scored: int
    n_missing: int
    n_failed: int
    average: float | None  # mean of the category means (categories are equal-sized)
    average_missing_as_1: float
    per_category: dict[str, CategorySummary]
    cases: list[CaseResult]

    def summary(self) -> dict[str, Any]:
        """Everything but the per-case list (what ``scores.json`` holds)."""
        return self.model_dump(mode="json", exclude={"cases"})

    def to_markdown(self) -> str:
        return render_markdown(self)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _judge_one(judge: Judge, case: Any, image: Image.Image) -> CaseResult:
    base = {"case_id": case.id, "category": case.category, "task": case.task}
    try:
        if case.task == "t2i":
            verdict = judge.judge_t2i(case, image)
            score = verdict.score
        else:
            verdict = judge.judge_edit(case, case.source_image(), image)
            score = verdict.overall_score
    except JudgeError as exc:
        log.warning("case %s: judge failed: %s", case.id, exc)
        return CaseResult(**base, status="error", error=str(exc))
    except Exception as exc:  # one odd image must not lose the other cases' scores
        log.exception("case %s: judge crashed", case.id)
        return CaseResult(**base, status="error", error=f"judge crashed: {type(exc).__name__}: {exc}")
    return CaseResult(**base, status="scored", score=score, verdict=verdict.paper_json(),
                      details=verdict.details or None)


def _category_summary(results: list[CaseResult], task: str, category: str,
                      set_metrics: dict[str, float]) -> CategorySummary:
    scored = [r for r in results if r.status == "scored"]
    hist = {str(s): sum(r.score == s for r in scored) for s in range(1, 6)}
    sub: dict[str, float] = {}
    if task == "edit" and scored:
        keys = EDIT_CRITERIA[category].keys
        for role, key in zip(ROLES, keys):
            sub[role] = round(statistics.fmean(r.verdict["sub_scores"][key] for r in scored), 3)
    return CategorySummary(
        n=len(results), scored=len(scored), missing=sum(r.status == "missing" for r in results),
        failed=sum(r.status in ("unreadable", "error") for r in results),
        mean_score=_round(statistics.fmean(r.score for r in scored)) if scored else None,
        score_histogram=hist, sub_scores=sub, set_metrics=set_metrics)


def score_bench(bench_name: str, images: dict[str, Image.Image | None], judge: Judge, *,
                problems: dict[str, str] | None = None, set_metrics: bool = True,
                progress: bool = True) -> BenchReport:
    """Judge ``images`` (case id -> image; absent or None = missing) on every case of the bench.

    ``problems`` maps case ids to why their image could not be read (status ``unreadable``).
    ``set_metrics`` adds the judge's per-category set distances (KID/FID for the offline judge).
    """
    from fewstep.bench.benches import bench_spec, load_bench

    spec = bench_spec(bench_name)
    cases = load_bench(bench_name)
    known = {c.id for c in cases}
    unknown = sorted(set(images) - known)
    if unknown:
        log.warning("%d image(s) match no case of %s and are ignored: %s", len(unknown), bench_name,
                    ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    problems = problems or {}
    results: list[CaseResult] = []
    judge.prepare([(c, images[c.id]) for c in cases if images.get(c.id) is not None and c.id not in problems])
    for case in tqdm(cases, desc=f"judge {bench_name}", unit="case", disable=not progress):
        base = {"case_id": case.id, "category": case.category, "task": case.task}
        image = images.get(case.id)
        if case.id in problems:
            results.append(CaseResult(**base, status="unreadable", error=problems[case.id]))
        elif image is None:
            results.append(CaseResult(**base, status="missing", error=f"no image for case {case.id}"))
        else:
            results.append(_judge_one(judge, case, image))

    per_category: dict[str, CategorySummary] = {}
    for category in spec.categories:
        subset = [r for r in results if r.category == category]
        metrics: dict[str, float] = {}
        if set_metrics:
            present = [images[r.case_id] for r in subset if r.status == "scored"]
            key = category if spec.task == "t2i" else f"edit:{category}"
            try:
                metrics = judge.set_summary(key, present)
            except Exception as exc:  # set metrics are diagnostics: never lose the scores over them
                log.warning("set metrics for %s failed: %s", category, exc)
        per_category[category] = _category_summary(subset, spec.task, category, metrics)

    means = [s.mean_score for s in per_category.values() if s.mean_score is not None]
    strict = statistics.fmean(r.score if r.status == "scored" else 1 for r in results) if results else 1.0
    return BenchReport(
        bench=spec.name, version=spec.version, task=spec.task, judge=judge.describe(),
        n_cases=len(results), n_scored=sum(r.status == "scored" for r in results),
        n_missing=sum(r.status == "missing" for r in results),
        n_failed=sum(r.status in ("unreadable", "error") for r in results),
        average=_round(statistics.fmean(means)) if means else None, average_missing_as_1=round(strict, 3),
        per_category=per_category, cases=results)


def render_markdown(report: BenchReport) -> str:
    lines = [f"# {report.bench} v{report.version}", "",
             f"Judge: `{report.judge.get('judge')}`"
             + (f" (formula v{report.judge['formula_version']})" if "formula_version" in report.judge else ""),
             "", f"Cases: {report.n_cases}, scored {report.n_scored}, missing {report.n_missing}, "
             f"failed {report.n_failed}.", ""]
    edit = report.task == "edit"
    head = ["category", "n", "scored", "mean score"]
    if edit:
        head += list(ROLES)
    head += ["1", "2", "3", "4", "5", "KID", "FID"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(value: Any) -> str:
        return "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else str(value))

    for category, s in report.per_category.items():
        row = [category, s.n, s.scored, fmt(s.mean_score)]
        if edit:
            row += [fmt(s.sub_scores.get(role)) for role in ROLES]
        row += [s.score_histogram.get(str(k), 0) for k in range(1, 6)]
        row += [fmt(s.set_metrics.get("kid")), fmt(s.set_metrics.get("fid"))]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    lines += ["", f"**Average** (mean of category means): {fmt(report.average)}; "
              f"counting unscored cases as 1: {fmt(report.average_missing_as_1)}", ""]
    unscored = [r for r in report.cases if r.status != "scored"]
    if unscored:
        lines += ["## Not scored", "", "| case | status | why |", "|---|---|---|"]
        lines += [f"| {r.case_id} | {r.status} | {(r.error or '').replace('|', '/')} |" for r in unscored]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Files: images in, reports out (URIs through fewstep.storage)
# ---------------------------------------------------------------------------------------------


def load_images(uri: str, case_ids: list[str], options: StorageOptions | None = None
                ) -> tuple[dict[str, Image.Image], dict[str, str]]:
    """``<case_id>.<png|jpg|jpeg|webp>`` files directly in ``uri`` -> (images, problems by case id)."""
    if not storage.exists(uri, options):
        raise FileNotFoundError(f"--images {uri}: no such directory")
    wanted = set(case_ids)
    images: dict[str, Image.Image] = {}
    problems: dict[str, str] = {}
    top = storage.normalize(uri).rstrip("/")
    for file in storage.list_files(uri, options=options):
        parent, _, name = file.rpartition("/")
        if parent.rstrip("/") != top:
            continue  # only the directory itself: e.g. bench-refs puts edit sources in sources/
        stem, dot, suffix = name.rpartition(".")
        if not dot or f".{suffix.lower()}" not in IMAGE_SUFFIXES or stem not in wanted or stem in images:
            continue
        try:
            data = storage.read_bytes(file, options)
            with Image.open(io.BytesIO(data)) as handle:
                handle.load()
                images[stem] = handle.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            problems[stem] = f"{name}: cannot decode image ({type(exc).__name__}: {exc})"
    return images, problems


def write_report(report: BenchReport, out_uri: str, options: StorageOptions | None = None) -> dict[str, str]:
    """Write ``cases.jsonl``, ``scores.json`` and ``scores.md`` under ``out_uri``; returns their URIs."""
    import json

    storage.makedirs(out_uri, options)
    paths = {name: storage.join(out_uri, name) for name in ("cases.jsonl", "scores.json", "scores.md")}
    lines = "".join(json.dumps(r.model_dump(mode="json"), sort_keys=True, default=str) + "\n" for r in report.cases)
    storage.write_bytes_atomic(paths["cases.jsonl"], lines.encode("utf-8"), options)
    storage.write_json_atomic(paths["scores.json"], report.summary(), options)
    storage.write_bytes_atomic(paths["scores.md"], report.to_markdown().encode("utf-8"), options)
    return paths
