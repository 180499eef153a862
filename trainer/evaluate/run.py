"""``fewstep eval``: sample the mini benches with any set of models and judge them (Ray Data).

Work items are (model, bench, category, chunk of cases). A Ray Data actor pool samples each
item with its model (prompt encoding, ``nfe`` Euler steps with true CFG where the scale is
above 1, VAE decode), judges every image with the bench judge and returns one row per case
with its score, verdict, PNG and the measured seconds and network calls per image. The
driver streams the rows back and writes the report (see :mod:`trainer.evaluate.report`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from fewstep.storage import StorageOptions
from trainer.evaluate.config import EvalConfig, ModelEntry

log = logging.getLogger(__name__)

TEACHER_NFE, TEACHER_CFG = 80, 4.0


def resolve_model(entry: ModelEntry, storage: StorageOptions | None = None) -> dict[str, Any]:
    """Fill a model's NFE, CFG and shift from its role and its directory's metadata."""
    from fewstep.models.info import fingerprint
    from trainer.export import default_sampling

    found = default_sampling(entry.path, storage)
    role = entry.role or found["role"]
    if role == "student":
        nfe = entry.nfe or found["num_steps"] or 4
        cfg = entry.guidance_scale if entry.guidance_scale is not None else (found["cfg"] or 1.0)
    else:
        nfe = entry.nfe or TEACHER_NFE
        cfg = entry.guidance_scale if entry.guidance_scale is not None else TEACHER_CFG
    shift = entry.shift if entry.shift is not None else found["shift"]
    return {"name": entry.name, "path": entry.path, "role": role, "nfe": int(nfe),
            "guidance_scale": float(cfg), "shift": float(shift), "weights": fingerprint(entry.path, storage)}


def plan_items(config: EvalConfig, models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Work items of at most ``batch_size`` cases of one (model, bench), categories in bench order
    (large batches amortise the per-call cost of the transformer)."""
    from fewstep.bench.benches import load_bench

    items = []
    for model in models:
        cap = config.cases_per_category
        if model["nfe"] > 8 and config.teacher_cases_per_category is not None:
            cap = min(cap or config.teacher_cases_per_category, config.teacher_cases_per_category)
        for bench in config.benches:
            cases = load_bench(bench)
            draws = []
            for category in dict.fromkeys(c.category for c in cases):
                ids = [c.id for c in cases if c.category == category][:cap]
                draws += [[case_id, draw] for draw in range(config.seeds_per_case) for case_id in ids]
            for start in range(0, len(draws), config.batch_size):
                items.append({"model": model, "bench": bench, "draws": draws[start:start + config.batch_size],
                              "resolution": config.resolution})
    return items


class EvalWorker:
    """Ray Data actor: loads models on first use (at most two at a time) and the judge once."""

    def __init__(self, judge: str, threads: int, storage: StorageOptions | None):
        import torch

        from trainer.evaluate.judging import load_judge

        torch.set_num_threads(threads)
        self.storage = storage
        self.judge = load_judge(judge)
        self.models: dict[str, Any] = {}
        self.cases: dict[str, dict[str, Any]] = {}
        self._warmed: set[str] = set()

    def _adapter(self, model: dict[str, Any]):
        from fewstep.models.adapter import QwenImageAdapter

        path = model["path"]
        if path not in self.models:
            if len(self.models) >= 2:
                self.models.pop(next(iter(self.models)))
            self.models[path] = QwenImageAdapter.load(path, storage=self.storage)
        return self.models[path]

    def _case(self, bench: str, case_id: str, draw: int):
        import dataclasses

        from fewstep.bench.benches import load_bench
        from trainer.evaluate.sampling import draw_seed

        if bench not in self.cases:
            self.cases[bench] = {c.id: c for c in load_bench(bench)}
        case = self.cases[bench][case_id]
        return case if draw == 0 else dataclasses.replace(case, seed=draw_seed(case.seed, draw))

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        from trainer.evaluate.judging import judge_case
        from trainer.evaluate.sampling import prepare_cases, sample_cases

        out: dict[str, list] = {}
        for raw in batch["item"]:
            item = json.loads(raw)
            model = item["model"]
            ad = self._adapter(model)
            draws = [int(draw) for _, draw in item["draws"]]
            cases = [self._case(item["bench"], cid, draw) for cid, draw in item["draws"]]
            resolution = item["resolution"] or ad.resolution or cases[0].resolution
            inputs = prepare_cases(ad, cases, resolution, with_uncond=model["guidance_scale"] > 1)
            key = f"{model['path']}|{item['bench']}"
            if key not in self._warmed:  # first call pays one-off costs; keep them out of timings
                sample_cases(ad, ad.transformer, inputs.select(slice(0, 1)), num_steps=1,
                             guidance_scale=model["guidance_scale"], shift=model["shift"])
                self._warmed.add(key)
            result = sample_cases(ad, ad.transformer, inputs, num_steps=model["nfe"],
                                  guidance_scale=model["guidance_scale"], shift=model["shift"],
                                  batch_size=len(cases))
            n = len(cases)
            for index, (case, draw, image) in enumerate(zip(cases, draws, result.images)):
                start = time.perf_counter()
                source = inputs.sources[index] if inputs.sources else None
                judged = judge_case(self.judge, case, image, source)
                judge_s = time.perf_counter() - start
                row = {
                    "model": model["name"], "role": model["role"], "nfe": model["nfe"],
                    "guidance_scale": model["guidance_scale"], "bench": item["bench"],
                    "task": case.task, "category": case.category, "case_id": case.id,
                    "prompt": case.prompt, "seed": case.seed, "draw": draw, "score": judged["score"],
                    "verdict": json.dumps(judged["verdict"]), "details": json.dumps(judged["details"]),
                    "png": _png(image), "encode_s": inputs.encode_s / n, "sample_s": result.sample_s / n,
                    "decode_s": result.decode_s / n, "judge_s": judge_s,
                    "network_calls": result.network_calls / n, "forward_passes": result.forward_passes,
                    "batch": n,
                }
                for k, v in row.items():
                    out.setdefault(k, []).append(v)
        return out


EVAL_OUTPUTS = ("cases", "images", "grids", "tables", "report.md", "report.json")


def clear_previous_eval(output: str, options: StorageOptions | None) -> None:
    """An --out that holds an earlier eval is replaced, not merged: its cases, images, grids and
    tables would otherwise sit beside the new ones (eval-compare would read them as this run's)."""
    from fewstep import storage as stores

    if not stores.check_reachable(stores.join(output, "report.json"), options, "--out"):
        return
    log.warning("eval: %s holds an earlier eval; its results are replaced", output)
    for name in EVAL_OUTPUTS:
        stores.delete(stores.join(output, name), options, recursive=True)


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def run_eval(config: EvalConfig, output: str, storage: StorageOptions | None = None,
             ray_address: str | None = None, progress: bool = True,
             on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Sample, judge and write the report under ``output``; returns the report dict."""
    import ray
    import ray.data
    from tqdm import tqdm

    from fewstep import storage as stores
    from fewstep.models.pipeline_dir import PipelineDir
    from fewstep.raysession import ray_session
    from trainer.evaluate.report import write_report

    # Everything checkable is checked before any sampling: a late failure loses all the work.
    stores.check_output_dir(output, storage, "--out")
    for entry in config.models:
        PipelineDir(entry.path, storage).require(("transformer", "vae", "text_encoder", "tokenizer", "scheduler"))
    models = [resolve_model(m, storage) for m in config.models]
    clear_previous_eval(output, storage)
    items = plan_items(config, models)
    total = sum(len(i["draws"]) for i in items)
    threads = config.threads_per_actor or max(1, (os.cpu_count() or 1) // config.actors)
    log.info("eval: %d models x %s: %d images in %d work items, %d actor(s) x %d threads",
             len(models), config.benches, total, len(items), config.actors, threads)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    with ray_session(ray_address):
        ds = ray.data.from_items([{"item": json.dumps(i)} for i in items], override_num_blocks=len(items))
        ds = ds.map_batches(
            EvalWorker, fn_constructor_kwargs={"judge": config.judge, "threads": threads, "storage": storage},
            compute=ray.data.ActorPoolStrategy(size=config.actors), batch_size=1,
            num_cpus=config.cpus_per_actor, batch_format="numpy")
        bar = tqdm(total=total, desc="eval: sampling + judging", unit="img", disable=not progress)
        for row in ds.iter_rows():
            row = {k: (v.item() if hasattr(v, "item") and not isinstance(v, bytes) else v) for k, v in row.items()}
            rows.append(row)
            bar.update(1)
            bar.set_postfix_str(f"{row['model']} {row['bench']}/{row['category']}")
            if on_row is not None:
                on_row(row)
        bar.close()
    return write_report(config, models, rows, output, storage, wall_s=time.perf_counter() - started)
