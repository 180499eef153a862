"""scripts/gpu_session.py, the one-lease GPU recipe, run end to end on the CPU with tiny budgets.

A GPU lease is short and rare, so the script must not first fail there: this runs its stages in
order (anchored VAE, precompute of several curated inputs, base, text specialist) and checks what a
session brings back and what each stage must have done to the shipped base it starts from.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "assets" / "teachers" / "base"


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_gpu_session_trains_every_stage_and_brings_the_results_back(tmp_path):
    from trainer.runtime.synthetic import write_synthetic_curated

    mixed = write_synthetic_curated(str(tmp_path / "mixed"), rows=24, edit_rows=6, size=64,
                                    t2i_categories=("portrait", "text"))
    more = write_synthetic_curated(str(tmp_path / "more"), rows=8, size=64)
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, str(REPO / "scripts" / "gpu_session.py"), "--curated", mixed, more,
               "--work", str(work), "--out", str(out), "--minutes", "1.8",
               "--vae-minutes", "0.08", "0.04", "--vae-batch", "8", "--vae-curated", mixed,
               "--base-minutes", "0.1", "0.2", "--batch", "8",
               "--text-minutes", "0.05", "0.04", "--text-batch", "4",
               "--dmd-minutes", "0", "--judge", "none", "--device-cache-mb", "64"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    summary = json.loads((out / "timings.json").read_text())
    assert set(summary["done"]) == {"vae", "base", "text-specialist"}, summary
    for name in ("vae", "base", "text-specialist"):
        assert (out / f"{name}.safetensors").stat().st_size > 0
    # Two curated inputs, precomputed one by one with the new VAE, trained on as one set.
    assert all((work / f"shards-{i}" / "manifest.json").exists() for i in (0, 1))
    base_metrics = (work / "runs" / "base-stable" / "metrics.jsonl").read_text()
    # The decay is sized from the measured rate (~3 steps/s here); its budget leaves room for a slower box.
    assert base_metrics and (work / "runs" / "base-decay" / "final").exists()

    # The VAE moved, but kept the shipped base's latent statistics (keep_latent_stats).
    shipped_vae = _weights(BASE / "vae" / "diffusion_pytorch_model.safetensors")
    new_vae = _weights(Path(summary["done"]["base"]) / "vae" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(shipped_vae[k].float(), new_vae[k].float()) for k in shipped_vae)
    shipped_config = json.loads((BASE / "vae" / "config.json").read_text())
    new_config = json.loads((Path(summary["done"]["base"]) / "vae" / "config.json").read_text())
    assert new_config["latents_mean"] == shipped_config["latents_mean"]
    assert new_config["latents_std"] == shipped_config["latents_std"]

    # Base and specialist transformers both trained, the specialist from the base.
    shipped = _weights(BASE / "transformer" / "diffusion_pytorch_model.safetensors")
    base = _weights(out / "base.safetensors")
    text = _weights(out / "text-specialist.safetensors")
    assert shipped.keys() == base.keys() == text.keys()
    assert any(not torch.equal(shipped[k], base[k]) for k in shipped)
    assert any(not torch.equal(base[k], text[k]) for k in base)

    # What a lease brings back rebuilds the run: every stage's metrics and config.
    with tarfile.open(out / "runs.tar.gz") as tar:
        names = set(tar.getnames())
    for run in ("vae-stable", "base-stable", "text-stable"):
        assert {f"{run}/metrics.jsonl", f"{run}/config.yaml"} <= names, sorted(names)

    # The exported base is a whole pipeline that diffusers loads and samples.
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(summary["done"]["base"], torch_dtype=torch.float32)
    image = pipe(prompt="a red square on a blue background", negative_prompt=" ", true_cfg_scale=2.0,
                 num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
