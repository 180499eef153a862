"""The benches: versioned JSONL files of fixed cases, and their loader.

``t2i-bench-mini``: 3 T2I categories x 20 cases. ``editing-bench-mini``: 6 edit
categories x 10 cases. Each case holds a held-out combination of known subjects and
attributes (``world.is_reserved``), so no corpus record shares its id, prompt or
combination.

``t2i-bench-val`` and ``editing-bench-val`` are validation benches of the same shape, drawn
from the same held-out pool with their own seed stream and no combination in common with the
mini benches. Watch a run and choose a recipe or a checkpoint on them, then report the mini
benches once: choosing on the benches you report would select on the test set.

File format (``data/<name>.v<version>.jsonl``, one case per line)::

    {"bench": "t2i-bench-mini", "version": 1, "id": "t2ib-portrait-000", "task": "t2i",
     "category": "portrait", "prompt": "...", "seed": 1234, "meta": {...},
     "reference_sha256": {"64": "..."}, "source_sha256": {"64": "..."} (edits only)}

``prompt`` is the edit instruction for edit cases; ``seed`` is the sampling seed a
generator must use for that case; ``meta`` is a T2I scene meta or an edit meta as
documented in :mod:`fewstep.bench.world`. The sha256 entries are of the PNG bytes that
``world.png_bytes`` gives for the reference (edit: target) and source renders at that
resolution; :meth:`BenchCase.verify` re-renders and compares them.

Usage::

    from fewstep.bench.benches import load_bench
    for case in load_bench("editing-bench-mini"):
        case.prompt, case.category, case.seed, case.meta
        case.source_image()      # PIL RGB (edit cases)
        case.reference_image()   # PIL RGB: the real render (T2I) / ground-truth target (edit)
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from fewstep.bench import world

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True)
class BenchSpec:
    name: str
    task: str
    version: int
    categories: tuple[str, ...]
    per_category: int
    id_prefix: str
    stream: int = 0  # seed stream of the generator; 0 is the mini benches' (kept as published)
    validates: str | None = None  # the test bench a validation bench must not overlap

    @property
    def is_validation(self) -> bool:
        return self.validates is not None

    @property
    def filename(self) -> str:
        return f"{self.name}.v{self.version}.jsonl"

    @property
    def path(self) -> Path:
        return DATA_DIR / self.filename


BENCHES: dict[str, BenchSpec] = {
    "t2i-bench-mini": BenchSpec("t2i-bench-mini", "t2i", 1, world.T2I_CATEGORIES, 20, "t2ib"),
    "editing-bench-mini": BenchSpec("editing-bench-mini", "edit", 1, world.EDIT_CATEGORIES, 10, "editb"),
    "t2i-bench-val": BenchSpec("t2i-bench-val", "t2i", 1, world.T2I_CATEGORIES, 20, "t2iv",
                               stream=1, validates="t2i-bench-mini"),
    "editing-bench-val": BenchSpec("editing-bench-val", "edit", 1, world.EDIT_CATEGORIES, 10, "editv",
                                   stream=1, validates="editing-bench-mini"),
}


class BenchError(ValueError):
    """A bench name or file that is not valid; the message names the line and the field."""


@dataclass(frozen=True)
class BenchCase:
    id: str
    bench: str
    version: int
    task: str  # "t2i" | "edit"
    category: str  # T2I category or edit category
    prompt: str  # T2I prompt or edit instruction
    seed: int
    meta: dict[str, Any] = field(repr=False, hash=False, compare=False)
    reference_sha256: dict[str, str] = field(default_factory=dict, repr=False, hash=False, compare=False)
    source_sha256: dict[str, str] = field(default_factory=dict, repr=False, hash=False, compare=False)

    @property
    def instruction(self) -> str:
        return self.prompt

    @property
    def resolution(self) -> int:
        return int(self.meta["resolution"])

    @property
    def target_attrs(self) -> dict[str, Any]:
        """Scene attrs of the reference: the T2I scene or the edit target."""
        return self.meta if self.task == "t2i" else self.meta["target"]

    def reference_image(self, resolution: int | None = None) -> Image.Image:
        """The real render of the prompt (T2I) or the ground-truth edit target."""
        return world.render_t2i(self.target_attrs, resolution or self.resolution)

    def source_image(self, resolution: int | None = None) -> Image.Image:
        """The image to edit (edit cases only)."""
        if self.task != "edit":
            raise BenchError(f"case {self.id}: source_image() exists only for edit cases")
        return world.render_t2i(self.meta["source"], resolution or self.resolution)

    def verify(self) -> list[str]:
        """Re-render at the stored resolutions; returns mismatches (empty when renders match)."""
        problems = []
        for label, hashes, render in (("reference", self.reference_sha256, self.reference_image),
                                      ("source", self.source_sha256, self.source_image)):
            for res, expected in hashes.items():
                got = hashlib.sha256(world.png_bytes(render(int(res)))).hexdigest()
                if got != expected:
                    problems.append(f"{self.id}: {label} render at {res}px differs from the bench file "
                                    "(fonts or Pillow differ from where the bench was made)")
        return problems

    def to_json(self) -> dict[str, Any]:
        record = {"bench": self.bench, "version": self.version, "id": self.id, "task": self.task,
                  "category": self.category, "prompt": self.prompt, "seed": self.seed, "meta": self.meta,
                  "reference_sha256": self.reference_sha256}
        if self.task == "edit":
            record["source_sha256"] = self.source_sha256
        return record


def bench_spec(name: str) -> BenchSpec:
    if name not in BENCHES:
        raise BenchError(f"--bench: unknown bench {name!r}; choose one of {list(BENCHES)}")
    return BENCHES[name]


def parse_case(line: str, spec: BenchSpec, where: str) -> BenchCase:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BenchError(f"{where}: not valid JSON ({exc.msg})") from None
    for key, kind in (("id", str), ("prompt", str), ("category", str), ("seed", int), ("meta", dict),
                      ("version", int)):
        if not isinstance(record.get(key), kind):
            raise BenchError(f"{where}: field {key!r} must be {kind.__name__}, got {record.get(key)!r}")
    if record.get("bench") != spec.name or record["version"] != spec.version or record.get("task") != spec.task:
        raise BenchError(f"{where}: expected bench {spec.name!r} v{spec.version} task {spec.task!r}, got "
                         f"{record.get('bench')!r} v{record.get('version')} task {record.get('task')!r}")
    if record["category"] not in spec.categories:
        raise BenchError(f"{where}: category {record['category']!r} is not one of {list(spec.categories)}")
    return BenchCase(id=record["id"], bench=spec.name, version=spec.version, task=spec.task,
                     category=record["category"], prompt=record["prompt"], seed=record["seed"],
                     meta=record["meta"], reference_sha256=record.get("reference_sha256") or {},
                     source_sha256=record.get("source_sha256") or {})


@functools.lru_cache(maxsize=8)
def _load(name: str, path: str) -> tuple[BenchCase, ...]:
    spec = bench_spec(name)
    file = Path(path)
    if not file.exists():
        raise BenchError(f"bench file {file} is missing; regenerate it with "
                         "`python -m fewstep.bench.benches.generate`")
    cases = tuple(parse_case(line, spec, f"{file.name}:{number}")
                  for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1)
                  if line.strip())
    ids = Counter(c.id for c in cases)
    if (dupes := [i for i, n in ids.items() if n > 1]):
        raise BenchError(f"{file.name}: duplicate case ids {dupes}")
    counts = Counter(c.category for c in cases)
    if any(counts.get(c, 0) != spec.per_category for c in spec.categories):
        raise BenchError(f"{file.name}: expected {spec.per_category} cases per category, got {dict(counts)}")
    return cases


def load_bench(name: str, path: str | Path | None = None) -> list[BenchCase]:
    """The cases of bench ``name`` (from its committed file, or ``path``), in file order."""
    spec = bench_spec(name)
    return list(_load(name, str(path or spec.path)))


def bench_texts() -> set[str]:
    """Every prompt and instruction of the committed benches (the corpus never emits these)."""
    texts: set[str] = set()
    for name, spec in BENCHES.items():
        if spec.path.exists():
            texts.update(c.prompt for c in load_bench(name))
    return texts
