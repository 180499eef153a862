"""Paired comparison of two models on the same bench cases: does A beat B case by case?

Bench means hide how often one model is better than the other; the judges' scores are small
integers, so most cases tie. This counts wins, losses and ties over the cases both models were
scored on, gives the mean paired difference with a seeded bootstrap interval, and an exact sign
test (ties dropped): ``p_better`` is the one-sided probability of at least that many wins if A
and B were equally good. A "clear" win needs ``p_better < alpha`` (0.05 by default).

An eval with ``seeds_per_case > 1`` scores each case several times from different noise. A case's
draws share its prompt, so they are not independent trials: each model's draws of a case are
averaged first and the case stays the unit of the test (more draws mean fewer ties, not more "cases").

Inside one eval the report compares every student with every teacher (``report.json`` under
``paired``). Across evals: ``fewstep eval-compare A_DIR:MODEL B_DIR:MODEL``.

Metrics: ``score`` (the judge's 1-5) or ``text_chars``: on `text` cases only, the fraction of the
asked word's characters the judge's OCR read in place (``char_accuracy``). At 64 px the tiny
teachers draw no word exactly, so every text score is 2 and the score cannot tell text models
apart; the character accuracy still can.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fewstep import storage
from fewstep.storage import StorageOptions

ALPHA = 0.05
METRICS = ("score", "text_chars")


def text_char_accuracy(details: dict[str, Any] | str | None) -> float | None:
    """The OCR character accuracy of a `text` case's verdict details (T2I: the drawn word; edit:
    the word the edit should write), or None for other cases and unreadable details."""
    if isinstance(details, str):
        details = json.loads(details)
    measurements = (details or {}).get("measurements") or {}
    if measurements.get("category") != "text":
        return None
    for part in ("core", "attribute"):
        ocr = (measurements.get(part) or {}).get("ocr") or {}
        if isinstance(ocr.get("char_accuracy"), (int, float)):
            return float(ocr["char_accuracy"])
    return None


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """One case record's value of ``metric`` (None: the metric does not apply to this case)."""
    if metric == "score":
        return float(record["score"])
    if metric == "text_chars":
        return text_char_accuracy(record.get("details"))
    raise ValueError(f"metric: {metric!r} is not one of {METRICS}")


@dataclass
class PairedResult:
    bench: str
    a: str
    b: str
    cases: int
    wins: int  # A scored higher
    losses: int
    ties: int
    mean_a: float
    mean_b: float
    mean_diff: float  # A - B
    ci_low: float  # 95% bootstrap interval of the mean difference
    ci_high: float
    p_better: float  # one-sided exact sign test: A better than B
    p_two_sided: float
    draws_a: int = 1  # draws per case averaged into A's case score (the most any case had)
    draws_b: int = 1

    def clearly_better(self, alpha: float = ALPHA) -> bool:
        return self.p_better < alpha

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "clearly_better": self.clearly_better()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PairedResult:
        """The inverse of :meth:`as_dict` (``report.json``'s ``paired`` entries)."""
        return cls(**{k: v for k, v in data.items() if k != "clearly_better"})


def sign_test(wins: int, losses: int) -> tuple[float, float]:
    """(one-sided P[X >= wins], two-sided p) for X ~ Binomial(wins + losses, 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0, 1.0
    upper = sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n
    lower = sum(math.comb(n, k) for k in range(0, wins + 1)) / 2**n
    return float(upper), float(min(1.0, 2 * min(upper, lower)))


Scores = dict[str, float | list[float]]  # case_id -> score, or the scores of its draws


def _case_means(scores: Scores, shared: list[str]) -> tuple[np.ndarray, int]:
    values = [scores[c] if isinstance(scores[c], list) else [scores[c]] for c in shared]
    return np.array([float(np.mean(v)) for v in values]), max(len(v) for v in values)


def compare_scores(bench: str, a: str, b: str, scores_a: Scores, scores_b: Scores,
                   *, resamples: int = 2000, seed: int = 0) -> PairedResult:
    """Compare two ``case_id -> score`` (or ``case_id -> [score per draw]``) maps on the cases they
    share; a case's draws are averaged before pairing."""
    shared = sorted(set(scores_a) & set(scores_b))
    if not shared:
        raise ValueError(f"{bench}: {a!r} and {b!r} share no scored case (were they run on the same bench?)")
    xa, draws_a = _case_means(scores_a, shared)
    xb, draws_b = _case_means(scores_b, shared)
    diff = xa - xb
    wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    p_better, p_two = sign_test(wins, losses)
    return PairedResult(bench=bench, a=a, b=b, cases=len(shared), wins=wins, losses=losses,
                        ties=len(shared) - wins - losses, mean_a=float(xa.mean()), mean_b=float(xb.mean()),
                        mean_diff=float(diff.mean()), ci_low=float(np.quantile(means, 0.025)),
                        ci_high=float(np.quantile(means, 0.975)), p_better=p_better, p_two_sided=p_two,
                        draws_a=draws_a, draws_b=draws_b)


def scores_by_case(rows: list[dict[str, Any]], model: str, bench: str) -> dict[str, list[float]]:
    """``case_id -> [score of each draw]`` of one model on one bench."""
    out: dict[str, list[float]] = {}
    for r in rows:
        if r["model"] == model and r["bench"] == bench:
            out.setdefault(r["case_id"], []).append(float(r["score"]))
    return out


def paired_within(summary: dict[str, Any], rows: list[dict[str, Any]]) -> list[PairedResult]:
    """Every student against every teacher of one eval, per bench both were run on."""
    students = [n for n, s in summary.items() if s["role"] == "student"]
    teachers = [n for n, s in summary.items() if s["role"] == "teacher"]
    results = []
    for student in students:
        for teacher in teachers:
            for bench in summary[student]["benches"]:
                if bench in summary[teacher]["benches"]:
                    results.append(compare_scores(bench, student, teacher, scores_by_case(rows, student, bench),
                                                  scores_by_case(rows, teacher, bench)))
    return results


def read_case_scores(eval_dir: str, model: str, options: StorageOptions | None = None,
                     metric: str = "score") -> dict[str, dict[str, list[float]]]:
    """``bench -> case_id -> [value of each draw]`` from an eval output's ``cases/<model>/<bench>.jsonl``
    (cases the metric does not apply to are left out)."""
    if metric not in METRICS:
        raise ValueError(f"metric: {metric!r} is not one of {METRICS}")
    root = storage.normalize(eval_dir)
    report_uri = storage.join(root, "report.json")
    if not storage.exists(report_uri, options):
        raise FileNotFoundError(f"{root}: no report.json there; give the --out folder of a finished "
                                "`fewstep eval`")
    listed = sorted(storage.read_json(report_uri, options).get("models", {}))
    if model not in listed:  # case files of other runs may sit there; only this report's count
        raise FileNotFoundError(f"{root}: {model!r} is not a model of that eval (it has {listed})")
    folder = storage.join(root, "cases", model)
    files = storage.list_files(folder, ".jsonl", options)
    if not files:
        raise FileNotFoundError(f"{folder}: no case files (is {model!r} a model of that eval?)")
    out: dict[str, dict[str, list[float]]] = {}
    for uri in files:
        for line in storage.read_bytes(uri, options).decode().splitlines():
            if line.strip():
                record = json.loads(line)
                value = metric_value(record, metric)
                if value is not None:
                    out.setdefault(record["bench"], {}).setdefault(record["case_id"], []).append(value)
    return out


def paired_table(results: list[PairedResult], alpha: float = ALPHA) -> str:
    head = ["bench", "A", "B", "cases", "draws/case", "A wins", "B wins", "ties", "mean A - B (95% CI)", "sign test p (A better)",
            f"A clearly better (p < {alpha:g})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        draws = f"{r.draws_a}" if r.draws_a == r.draws_b else f"{r.draws_a} / {r.draws_b}"
        lines.append(f"| {r.bench} | {r.a} | {r.b} | {r.cases} | {draws} | {r.wins} | {r.losses} | {r.ties} | "
                     f"{r.mean_diff:+.3f} ({r.ci_low:+.3f}, {r.ci_high:+.3f}) | {r.p_better:.3g} | "
                     f"{'yes' if r.clearly_better(alpha) else 'no'} |")
    return "\n".join(lines) + "\n"
