"""Train the shipped tiny teachers in one process: VAE -> precompute -> base -> text specialist
(-> optionally a fine-tune of their shared VAE decoder, `--decoder-steps`).

The same stages as the CLI (`fewstep train-teacher`, `fewstep precompute`) with the same configs
(configs/teacher/*.yaml, configs/precompute/default.yaml), run with the local launcher and the
local precompute executor, so that one GPU box without Ray or DeepSpeed trains them in minutes.
The input is a curate output (e.g. of the bench world's `standard` corpus):

    fewstep corpus build --out runs/corpus/standard --preset standard
    fewstep curate --config configs/curate/default.yaml --input runs/corpus/standard \
        --output runs/curated/standard --set filters.nsfw.enabled=false
    python scripts/train_teachers.py --curated runs/curated/standard --device cuda \
        --work runs/teachers --out runs/teachers/export   # assets/teachers replaces the shipped ones

Each stage has a step count and a wall-clock budget (minutes); the first reached ends it.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train_stage(config: Path, overrides: dict, runs_dir: Path) -> tuple[str, dict, float]:
    """One training run (any objective's config): its final URI, last metrics and wall seconds."""
    from fewstep.settings import Settings
    from trainer.runtime.config import load_train_config
    from trainer.runtime.launch import launch

    started = time.monotonic()
    result = launch(load_train_config(config, overrides), Settings(runs_dir=runs_dir))
    seconds = time.monotonic() - started
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    logging.info("%s (%s): %.0f s, %s", config.name, overrides.get("run.name"), seconds, json.dumps(metrics))
    return result.final_uri, metrics, seconds


def _train(config_name: str, overrides: dict, runs_dir: Path) -> str:
    return train_stage(ROOT / "configs" / "teacher" / config_name, overrides, runs_dir)[0]


def precompute_shards(teacher: str, curated: str, shards: str, device: str, batch_size: int) -> None:
    """The data engine's precompute on one box (local executor; the GPU when ``device`` is cuda)."""
    from pipelines.precompute import load_precompute_config, run_precompute

    gpu = 1 if device == "cuda" else 0
    config = load_precompute_config(
        ROOT / "configs" / "precompute" / "default.yaml",
        {"executor": "local", "text_encoder.num_gpus": gpu, "vae.num_gpus": gpu,
         "text_encoder.batch_size": batch_size, "vae.batch_size": batch_size})
    run_precompute(config, teacher, curated, shards)


def _vae_init(path: str | None) -> dict:
    if path is None:
        return {}
    from fewstep.storage import normalize

    # A continued run needs no warm-up: the optimiser state is new, the weights are not.
    return {"objective.init": {"from": "pretrained", "path": normalize(path)},
            "objective.optimizer.warmup_steps": 20}


def _export_fp16(src: str, dst: Path) -> None:
    import torch

    from fewstep.models.adapter import QwenImageAdapter

    adapter = QwenImageAdapter.load(src, components=("text_encoder", "vae", "transformer"),
                                    dtype=torch.float32)
    if dst.exists():
        shutil.rmtree(dst)
    adapter.save_pipeline(dst, fp16=True)


def _publish(src: str, out: Path | None, name: str, tar_to: Path | None) -> None:
    if out is None:
        return
    _export_fp16(src, out / name)
    if tar_to is not None:
        import tarfile

        tar_to.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar_to / f"{name}.tar", "w") as tar:
            tar.add(out / name, arcname=name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--curated", required=True, help="curate output (URI) with images")
    parser.add_argument("--work", default="runs/teachers", help="run folders and shards")
    parser.add_argument("--out", default=None, help="write fp16 teachers here (base, text-specialist)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=128, help="rows per step (transformer)")
    parser.add_argument("--vae-batch", type=int, default=64)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--base-steps", type=int, default=6000)
    parser.add_argument("--text-steps", type=int, default=1500)
    parser.add_argument("--vae-minutes", type=float, default=None)
    parser.add_argument("--vae-init", default=None,
                        help="continue training this pipeline's VAE (e.g. an earlier run's final/) "
                             "instead of starting from random weights")
    parser.add_argument("--base-minutes", type=float, default=None)
    parser.add_argument("--text-minutes", type=float, default=None)
    parser.add_argument("--decoder-steps", type=int, default=0,
                        help="last, fine-tune the VAE decoder both teachers share (configs/teacher/"
                             "vae-decoder.yaml: encoder and latents unchanged) for this many steps, "
                             "the last third a linear decay; 0 skips it")
    parser.add_argument("--decoder-minutes", type=float, default=None)
    parser.add_argument("--decoder-batch", type=int, default=32)
    parser.add_argument("--tar-to", default=None,
                        help="also pack each exported teacher as <dir>/<name>.tar as soon as it exists")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device-cache-mb", type=float, default=None,
                        help="data.device_cache_mb of the transformer stages (default: 4096 on cuda, "
                             "else 0): decode the shards once onto the device")
    args = parser.parse_args()
    if args.decoder_steps < 0:
        parser.error(f"--decoder-steps: {args.decoder_steps} is negative; give 0 to skip the decoder stage")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from fewstep.storage import normalize
    work = Path(args.work).resolve()
    runs = work / "runs"
    on_gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    cache_mb = args.device_cache_mb if args.device_cache_mb is not None else (4096 if on_gpu else 0)
    common = {"launcher": "local", "device": args.device, "deepspeed.enabled": False,
              "train.progress": True, "train.log_every": 50}
    timings: dict[str, float] = {}

    started = time.perf_counter()
    vae_final = _train("vae.yaml", {**common, "run.name": "teacher-vae",
                                    "data.uri": normalize(args.curated),
                                    "train.batch_size": args.vae_batch,
                                    "train.max_steps": args.vae_steps,
                                    "train.max_minutes": args.vae_minutes,
                                    "train.checkpoint_every": args.vae_steps,
                                    **_vae_init(args.vae_init)}, runs)
    timings["vae_s"] = time.perf_counter() - started

    started = time.perf_counter()
    shards = str(work / "shards")
    precompute_shards(vae_final, normalize(args.curated), shards, args.device, batch_size=128)
    timings["precompute_s"] = time.perf_counter() - started

    started = time.perf_counter()
    base_final = _train("base.yaml", {**common, "run.name": "teacher-base", "data.uri": shards,
                                      "data.device_cache_mb": cache_mb,
                                      "objective.init.path": vae_final,
                                      "train.batch_size": args.batch,
                                      "train.precision": args.precision,
                                      "train.max_steps": args.base_steps,
                                      "train.max_minutes": args.base_minutes,
                                      "train.checkpoint_every": args.base_steps}, runs)
    timings["base_s"] = time.perf_counter() - started
    out = Path(args.out) if args.out else None
    tar_to = Path(args.tar_to) if args.tar_to else None
    # Published now, so that a run cut short (a lease ending) still leaves the base; a decoder stage
    # below publishes it again with the new decoder.
    _publish(base_final, out, "base", tar_to)

    started = time.perf_counter()
    text_final = _train("text-specialist.yaml", {**common, "run.name": "teacher-text",
                                                 "data.uri": shards, "data.device_cache_mb": cache_mb,
                                                 "objective.init.path": base_final,
                                                 "train.batch_size": args.batch,
                                                 "train.precision": args.precision,
                                                 "train.max_steps": args.text_steps,
                                                 "train.max_minutes": args.text_minutes,
                                                 "train.checkpoint_every": args.text_steps}, runs)
    timings["text_s"] = time.perf_counter() - started

    if args.decoder_steps > 0:
        started = time.perf_counter()
        steps = args.decoder_steps
        warmup = min(50, steps // 10)
        decoder_final = _train("vae-decoder.yaml", {
            **common, "run.name": "teacher-vae-decoder", "data.uri": normalize(args.curated),
            "objective.init.path": base_final, "train.batch_size": args.decoder_batch,
            "train.max_steps": steps, "train.max_minutes": args.decoder_minutes,
            "train.checkpoint_every": steps, "objective.optimizer.warmup_steps": warmup,
            "objective.optimizer.decay": "linear", "objective.optimizer.decay_start": max(warmup, (2 * steps) // 3),
            "objective.optimizer.decay_steps": steps}, runs)
        timings["decoder_s"] = time.perf_counter() - started
        # The decoder run's output is the base with the new decoder; the specialist shares the VAE.
        base_final = decoder_final
        shutil.copytree(Path(decoder_final) / "vae", Path(text_final) / "vae", dirs_exist_ok=True)
        _publish(base_final, out, "base", tar_to)

    _publish(text_final, out, "text-specialist", tar_to)
    summary = {"timings": timings, "vae": vae_final, "base": base_final, "text": text_final,
               "args": vars(args)}
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
