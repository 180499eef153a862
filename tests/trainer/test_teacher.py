"""Teacher recipes: the shipped configs validate, ``train-teacher`` teaches and dry-runs, the VAE
objective trains and writes normalising latent statistics, and init builds the start pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from trainer.runtime.synthetic import ensure_tiny_world, write_synthetic_curated

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_tiny_world(tmp_path_factory.getbasetemp() / "tiny-world")


@pytest.mark.parametrize("name", ["vae", "vae-decoder", "vae-anchored", "base", "text-specialist"])
def test_shipped_teacher_configs_validate(name):
    from trainer.runtime.config import load_train_config

    config = load_train_config(REPO / "configs" / "teacher" / f"{name}.yaml")
    objective = config.objective_config()
    assert config.objective_name() == ("vae" if name.startswith("vae") else "flow_matching")
    if name == "vae-decoder":
        assert objective.train_encoder is False and objective.init.path.endswith("assets/teachers/base")
    if name == "vae-anchored":
        assert objective.train_encoder is True and objective.anchor_weight > 0
    if name == "text-specialist":
        assert config.data.categories == ["text"]
        assert objective.init.path.endswith("teacher-base/final")
    if name == "base":
        assert objective.init.path.endswith("teacher-vae/final") and objective.caption_dropout > 0


def test_cli_help_and_dry_run(world, tmp_path):
    from fewstep.cli import app

    runner = CliRunner()
    out = runner.invoke(app, ["train-teacher", "--help"])
    assert out.exit_code == 0 and "--config" in out.output and "vae.yaml" in out.output
    # The resolved config is shown; inputs that do not exist yet make the answer "would not start".
    out = runner.invoke(app, ["train-teacher", "--config", str(REPO / "configs/teacher/base.yaml"),
                              "--set", "train.max_steps=7", "--set", f"data.uri={tmp_path / 'none'}", "--dry-run"])
    assert out.exit_code == 2, out.output
    assert "max_steps: 7" in out.output and "teacher-vae/final" in out.output and "no manifest.json" in out.output
    pipeline, shards = world
    out = runner.invoke(app, ["train-teacher", "--config", str(REPO / "configs/teacher/base.yaml"),
                              "--set", f"data.uri={shards}", "--set", f"objective.init.path={pipeline}",
                              "--set", f"run.runs_dir={tmp_path / 'runs'}", "--dry-run"])
    assert out.exit_code == 0 and "# inputs: found" in out.output, out.output
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing
    bad = runner.invoke(app, ["train-teacher", "--config", str(REPO / "configs/teacher/base.yaml"),
                              "--set", "train.max_stesp=7", "--dry-run"])
    assert bad.exit_code == 2 and "train.max_stesp" in bad.output


def test_init_tiny_config_with_vae_from_another_pipeline(world, tmp_path):
    from trainer.teachers.init import InitConfig, prepare_pipeline_dir

    pipeline, _ = world
    vae_config = Path(pipeline, "vae", "config.json")
    marked = tmp_path / "other"
    import shutil

    shutil.copytree(pipeline, marked)
    cfg = json.loads(vae_config.read_text())
    cfg["latents_mean"] = [0.5] * len(cfg["latents_mean"])
    (marked / "vae" / "config.json").write_text(json.dumps(cfg))
    init = InitConfig.model_validate({"from": "tiny-config", "config": "tiny", "seed": 3, "vae": str(marked)})
    out = prepare_pipeline_dir(init, tmp_path / "work", None)
    assert json.loads(Path(out, "vae", "config.json").read_text())["latents_mean"][0] == 0.5
    assert Path(out, "transformer", "config.json").exists()
    with pytest.raises(ValueError, match="init.path"):
        InitConfig.model_validate({"from": "pretrained"})
    with pytest.raises(ValueError, match="model preset"):
        InitConfig.model_validate({"from": "tiny-config", "config": "no-such-preset"})


def _vae_run(tmp_path: Path, curated: str, pipeline: str, *, steps: int, log_every: int, batch_size: int,
             lr: float, cache_mb: float = 0, name: str = "vae", **objective):
    """A short local VAE run from ``pipeline`` on ``curated`` images (``objective``: extra fields)."""
    from trainer.runtime.config import TrainConfig

    return TrainConfig.model_validate({
        "run": {"name": name, "runs_dir": str(tmp_path / "runs")},
        "launcher": "local", "device": "cpu", "deepspeed": {"enabled": False},
        "train": {"max_steps": steps, "batch_size": batch_size, "log_every": log_every,
                  "checkpoint_every": steps, "progress": False},
        "data": {"uri": curated, "device_cache_mb": cache_mb},
        "objective": {"name": "vae", "init": {"from": "pretrained", "path": pipeline},
                      "optimizer": {"lr": lr}, "l2_weight": 1.0, **objective},
    })


def test_vae_run_trains_and_sets_latent_statistics(world, tmp_path):
    from diffusers import AutoencoderKLQwenImage

    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    pipeline, _ = world
    curated = write_synthetic_curated(str(tmp_path / "curated"), rows=16, edit_rows=4, size=32)
    result = launch(_vae_run(tmp_path, curated, pipeline, steps=8, log_every=4, batch_size=4, lr=2e-3, stats_batches=4))
    records = read_metrics(result.run_uri)
    assert [r["step"] for r in records] == [4, 8]
    assert all(r["loss"] > 0 and r["psnr"] > 0 and r["grad_norm"] > 0 for r in records)
    vae = AutoencoderKLQwenImage.from_pretrained(str(Path(result.final_uri, "vae")))
    init = AutoencoderKLQwenImage.from_pretrained(str(Path(pipeline, "vae")))
    trained, start = vae.state_dict(), init.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in trained), "the VAE did not change"
    mean, std = vae.config.latents_mean, vae.config.latents_std
    assert any(abs(m) > 1e-4 for m in mean) and all(s > 0 for s in std)

    # The statistics normalise the data: the training images' latents get ~zero mean, ~unit std.
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from fewstep.models.adapter import QwenImageAdapter

    table = pq.read_table(next(Path(curated, "curated").glob("*.parquet")))
    images = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    images += [Image.open(io.BytesIO(b)) for b in table.column("source_image").to_pylist() if b]
    adapter = QwenImageAdapter.load(result.final_uri, components=("vae",))
    latents = adapter.encode_images(images)
    per_channel = latents.transpose(0, 1).flatten(1)
    assert per_channel.mean(dim=1).abs().max() < 0.35, per_channel.mean(dim=1)
    assert ((per_channel.std(dim=1) > 0.6) & (per_channel.std(dim=1) < 1.5)).all(), per_channel.std(dim=1)
    # The rest of the pipeline is copied along: it still loads as a whole.
    from diffusers import QwenImagePipeline

    assert QwenImagePipeline.from_pretrained(result.final_uri).vae is not None


def test_vae_decoder_finetune_keeps_the_latent_space(tmp_path):
    """train_encoder: false sharpens what latents decode to, and nothing a transformer relies on moves.

    Starts from the shipped base teacher: its VAE is a trained one, with the narrow posterior that
    a decoder fine-tune is meant for (a random fixture VAE's posterior noise swamps its latents).
    """
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from fewstep.models.adapter import QwenImageAdapter
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    pipeline = str(REPO / "assets" / "teachers" / "base")
    curated = write_synthetic_curated(str(tmp_path / "curated"), rows=16, edit_rows=4, size=64)
    result = launch(_vae_run(tmp_path, curated, pipeline, steps=24, log_every=8, batch_size=8, lr=1e-3,
                             train_encoder=False, edge_weight=1.0))
    records = read_metrics(result.run_uri)
    assert [r["step"] for r in records] == [8, 16, 24] and all(r["edge"] > 0 for r in records)
    # A frozen encoder's KL has no gradient, so the loss carries none of it (kl stays a metric).
    for r in records:  # this run's weights: l1 1, l2 1, edge 1
        assert r["kl"] > 0 and r["loss"] == pytest.approx(r["l1"] + r["mse"] + r["edge"], rel=1e-5), r

    before = QwenImageAdapter.load(pipeline, components=("vae",))
    after = QwenImageAdapter.load(result.final_uri, components=("vae",))
    start, trained = before.vae.state_dict(), after.vae.state_dict()
    encoder = [k for k in start if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in start if k.startswith(("decoder.", "post_quant_conv."))]
    assert encoder and all(torch.equal(start[k], trained[k]) for k in encoder), "the encoder moved"
    assert any(not torch.equal(start[k], trained[k]) for k in decoder), "the decoder did not change"
    assert after.vae.config.latents_mean == before.vae.config.latents_mean
    assert after.vae.config.latents_std == before.vae.config.latents_std
    # The transformer comes along, so the output is the whole teacher with the new decoder.
    weights = sorted(Path(pipeline, "transformer").glob("*.safetensors"))
    assert weights and [p.read_bytes() for p in weights] == \
        [Path(result.final_uri, "transformer", p.name).read_bytes() for p in weights]

    table = pq.read_table(next(Path(curated, "curated").glob("*.parquet")))
    images = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    latents = before.encode_images(images)
    assert torch.equal(latents, after.encode_images(images))
    target = before.images_to_tensor(images)
    error_before = (before.decode_latents(latents) - target).abs().mean()
    error_after = (after.decode_latents(latents) - target).abs().mean()
    assert error_after < 0.8 * error_before, (float(error_before), float(error_after))

    # The pipeline keeps its role: a teacher stays one, and so does a 4-step student, which eval
    # would otherwise sample as an 80-NFE teacher with CFG.
    from trainer.export import default_sampling, export_student

    meta = json.loads(Path(result.final_uri, "fewstep_model.json").read_text())
    assert meta["role"] == json.loads(Path(pipeline, "fewstep_model.json").read_text())["role"]
    assert meta["vae_trained_steps"] == 24
    student = export_student(QwenImageAdapter.load(pipeline, components=("transformer",)).transformer,
                             pipeline, str(tmp_path / "student"), num_steps=4, shift=3.0)
    run = _vae_run(tmp_path, curated, student, steps=2, log_every=2, batch_size=4, lr=1e-4,
                   name="vae-decoder-student", train_encoder=False, edge_weight=1.0)
    sampled = default_sampling(launch(run).final_uri)
    assert (sampled["role"], sampled["num_steps"]) == ("student", 4)


def test_vae_anchor_needs_a_trained_encoder():
    from pydantic import ValidationError

    from trainer.objectives.vae import VAEConfig

    init = {"from": "pretrained", "path": "assets/teachers/base"}
    with pytest.raises(ValidationError, match="objective.anchor_weight"):
        VAEConfig.model_validate({"init": init, "train_encoder": False, "anchor_weight": 0.1})
    assert VAEConfig.model_validate({"init": init, "anchor_weight": 0.1}).anchor_weight == 0.1


def test_vae_anchor_keeps_the_latents_near_the_init_encoder(tmp_path):
    """anchor_weight lets the encoder train while its latents (in latents_std units) stay close to
    the init's, so transformers trained on the old latents still fit them."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from fewstep.models.adapter import QwenImageAdapter
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    pipeline = str(REPO / "assets" / "teachers" / "base")
    curated = write_synthetic_curated(str(tmp_path / "curated"), rows=16, edit_rows=4, size=64)
    table = pq.read_table(next(Path(curated, "curated").glob("*.parquet")))
    images = [Image.open(io.BytesIO(b)) for b in table.column("image").to_pylist()]
    before = QwenImageAdapter.load(pipeline, components=("vae",))
    start = before.vae.state_dict()
    std = torch.tensor(before.vae.config.latents_std).view(1, -1, 1, 1)

    drift = {}
    for weight in (0.0, 10.0):
        run_dir = tmp_path / f"anchor-{weight:g}"
        result = launch(_vae_run(run_dir, curated, pipeline, steps=12, log_every=6, batch_size=8, lr=1e-3,
                                 edge_weight=1.0, anchor_weight=weight, stats_batches=2,
                                 keep_latent_stats=weight > 0))
        records = read_metrics(result.run_uri)
        if weight > 0:
            assert all(r["latent_drift"] >= 0 for r in records) and records[-1]["latent_drift"] > 0
        else:
            assert "latent_drift" not in records[-1]
        after = QwenImageAdapter.load(result.final_uri, components=("vae",))
        # keep_latent_stats (the anchored run) keeps the init's normalisation; else it is re-measured.
        kept = (after.vae.config.latents_mean, after.vae.config.latents_std) == \
            (before.vae.config.latents_mean, before.vae.config.latents_std)
        assert kept == (weight > 0)
        trained = after.vae.state_dict()
        encoder = [k for k in start if k.startswith(("encoder.", "quant_conv."))]
        assert any(not torch.equal(start[k], trained[k]) for k in encoder), "the encoder did not train"
        drift[weight] = float(((_posterior_mean(after, images) - _posterior_mean(before, images)) / std)
                              .pow(2).mean())
    assert drift[10.0] < 0.5 * drift[0.0], drift


def _posterior_mean(adapter, images) -> torch.Tensor:
    """Raw (unnormalised) posterior means of ``images``, in float32."""
    x = adapter.images_to_tensor(images).to(adapter.vae.dtype)
    with torch.no_grad():
        return adapter.vae.encode(x[:, :, None]).latent_dist.mean[:, :, 0].float()


def test_vae_device_cache_trains_exactly_as_decoding_each_batch(world, tmp_path, caplog):
    """``data.device_cache_mb`` for the VAE: every image decoded once (edit rows with their source),
    each step selects its rows' images; the same run, step for step, and the same statistics."""
    import json
    import logging

    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    pipeline, _ = world
    curated = write_synthetic_curated(str(tmp_path / "curated"), rows=12, edit_rows=6, size=32)
    runs = {}
    for name, cache_mb in (("cached", 256), ("decoded", 0)):
        with caplog.at_level(logging.INFO, logger="trainer.runtime.data"):
            result = launch(_vae_run(tmp_path, curated, pipeline, steps=6, log_every=1, batch_size=4, lr=2e-3,
                                     cache_mb=cache_mb, name=name, stats_batches=3))
        runs[name] = (read_metrics(result.run_uri), json.loads(Path(result.final_uri, "vae", "config.json").read_text()))
        assert ("decoded once" in caplog.text) == (cache_mb > 0)
        caplog.clear()
    (cached, cached_vae), (decoded, decoded_vae) = runs["cached"], runs["decoded"]
    assert len(cached) == len(decoded) == 6
    for a, b in zip(cached, decoded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a["step"], a["loss"], b["loss"])
        assert a["samples_per_s"] > 0
    assert cached_vae["latents_mean"] == pytest.approx(decoded_vae["latents_mean"], rel=1e-5, abs=1e-7)


def test_kept_latent_statistics_need_an_init_that_measured_them():
    from pydantic import ValidationError

    from trainer.objectives.vae import VAEConfig

    with pytest.raises(ValidationError, match="keep_latent_stats: .* tiny-config init has none"):
        VAEConfig.model_validate({"init": {"from": "tiny-config", "config": "teacher"}, "keep_latent_stats": True})
