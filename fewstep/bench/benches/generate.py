"""Regenerate the bench files (mini and validation) from the world's hold-out rule.

    python -m fewstep.bench.benches.generate [--check]

Cases are drawn with a fixed seed and kept only when their combination is reserved
(``world.is_reserved``), so the corpus, which skips reserved combinations, never holds
them. A validation bench draws from its own seed stream and skips every combination of the
test bench it validates. ``--check`` compares the generated cases with the committed files and exits 1 on
any difference: change the world, bump ``BenchSpec.version`` in ``__init__.py`` and
regenerate, never edit a published version in place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys

import numpy as np

from fewstep.bench import world
from fewstep.bench.benches import BENCHES, BenchCase, BenchSpec
from fewstep.bench.corpus import sample

BENCH_SEED = 20260603
BENCH_RESOLUTION = 64


def _sha(image) -> str:
    return hashlib.sha256(world.png_bytes(image)).hexdigest()


def case_key(case: BenchCase) -> tuple:
    """The held-out combination a case states (two cases with one key share their text)."""
    return world.combo_key(case.meta) if case.task == "t2i" else world.edit_key(case.meta)


def generate_cases(spec: BenchSpec, resolution: int = BENCH_RESOLUTION) -> list[BenchCase]:
    cases: list[BenchCase] = []
    taken = {case_key(c) for c in generate_cases(BENCHES[spec.validates], resolution)} if spec.validates else set()
    for ci, category in enumerate(spec.categories):
        entropy = [BENCH_SEED, spec.version, 0 if spec.task == "t2i" else 1, ci] + ([spec.stream] if spec.stream else [])
        rng = np.random.default_rng(entropy)
        seen: set = set(taken)
        tries = 0
        while sum(c.category == category for c in cases) < spec.per_category:
            tries += 1
            if tries > 100_000:
                raise RuntimeError(f"{spec.name}/{category}: too few reserved combinations in the world")
            if spec.task == "t2i":
                meta, text = sample.draw_t2i(category, rng, resolution)
                key = world.combo_key(meta)
            else:
                meta, text = sample.draw_edit(category, rng, resolution)
                key = world.edit_key(meta)
            # Distinct reserved keys: no two cases share an instruction or a combination.
            if not world.is_reserved(key) or key in seen:
                continue
            seen.add(key)
            index = sum(c.category == category for c in cases)
            case = BenchCase(id=f"{spec.id_prefix}-{category}-{index:03d}", bench=spec.name,
                             version=spec.version, task=spec.task, category=category, prompt=text,
                             seed=int(rng.integers(2**31)), meta=meta)
            refs = {str(resolution): _sha(case.reference_image())}
            srcs = {str(resolution): _sha(case.source_image())} if spec.task == "edit" else {}
            cases.append(BenchCase(**{**case.__dict__, "reference_sha256": refs, "source_sha256": srcs}))
    return cases


def dumps(cases: list[BenchCase]) -> str:
    return "".join(json.dumps(c.to_json(), sort_keys=True) + "\n" for c in cases)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    args = parser.parse_args(argv)
    status = 0
    for spec in BENCHES.values():
        text = dumps(generate_cases(spec))
        if args.check:
            same = spec.path.exists() and spec.path.read_text(encoding="utf-8") == text
            print(f"{spec.filename}: {'up to date' if same else 'DIFFERS from the world'}")
            status |= 0 if same else 1
        else:
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            spec.path.write_text(text, encoding="utf-8")
            print(f"wrote {spec.path} ({text.count(chr(10))} cases)")
    return status


if __name__ == "__main__":
    sys.exit(main())
