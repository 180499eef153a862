"""init-tiny, pipeline directories (local and S3), save/load round trips and the models CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


@pytest.fixture(scope="module")
def tiny_cfg():
    from fewstep.models.tiny import load_tiny_config

    return load_tiny_config(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny_cfg) -> str:
    from fewstep.models.tiny import init_tiny

    return init_tiny(tmp_path_factory.mktemp("models") / "tiny", tiny_cfg, seed=0)


def _files(root: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


def test_init_tiny_is_deterministic(tmp_path, tiny_cfg, tiny_dir):
    from fewstep.models.tiny import init_tiny

    again = init_tiny(tmp_path / "again", tiny_cfg, seed=0)
    assert _files(again) == _files(tiny_dir)
    other = init_tiny(tmp_path / "other", tiny_cfg, seed=1)
    differ = {k for k, v in _files(other).items() if _files(tiny_dir).get(k) != v}
    assert {"transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= differ
    assert "tokenizer/tokenizer.json" not in differ
    with pytest.raises(FileExistsError, match="overwrite"):
        init_tiny(again, tiny_cfg)


def test_layout_is_stock_diffusers(tiny_dir):
    index = json.loads((Path(tiny_dir) / "model_index.json").read_text())
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    processor = json.loads((Path(tiny_dir) / "processor" / "processor_config.json").read_text())
    assert processor["processor_class"] == "Qwen2VLProcessor"
    assert (Path(tiny_dir) / "processor" / "video_preprocessor_config.json").exists()
    scheduler = json.loads((Path(tiny_dir) / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is False


def test_diffusers_t2i_pipeline_loads_and_generates(tiny_dir):
    from diffusers import QwenImagePipeline
    from PIL import Image

    pipe = QwenImagePipeline.from_pretrained(tiny_dir)
    image = pipe("a red cat", negative_prompt=" ", true_cfg_scale=4.0, height=32, width=32, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_tokenizer_template_alignment_and_special_tokens(tiny_dir):
    from transformers import Qwen2_5_VLConfig, Qwen2Tokenizer

    from fewstep.models.templates import EDIT_DROP, EDIT_TEMPLATE, T2I_DROP, T2I_TEMPLATE, template_prefix
    from fewstep.models.tokenizer import special_token_ids

    tok = Qwen2Tokenizer.from_pretrained(str(Path(tiny_dir) / "tokenizer"))
    # Like the real Qwen tokenizer, the system prefix is exactly the pipelines' drop index long.
    assert len(tok(template_prefix(T2I_TEMPLATE)).input_ids) == T2I_DROP
    assert len(tok(template_prefix(EDIT_TEMPLATE)).input_ids) == EDIT_DROP
    text = "a woman climbing: medium-light skin tone, writes HELLO 42 ünïcode 🙂"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: every string round-trips
    ids = special_token_ids(tok)
    config = Qwen2_5_VLConfig.from_pretrained(str(Path(tiny_dir) / "text_encoder"))
    assert config.image_token_id == ids["<|image_pad|>"]
    assert config.vision_start_token_id == ids["<|vision_start|>"]
    assert config.text_config.vocab_size == len(tok)


def test_load_only_requested_components(tiny_dir):
    from fewstep.models.adapter import QwenImageAdapter

    ad = QwenImageAdapter.load(tiny_dir, components=("transformer",))
    assert ad.transformer is not None and ad.vae is None and ad.text_encoder is None and ad.tokenizer is None
    assert ad.latent_channels == 4 and ad.vae_scale_factor == 4  # from configs, no weights needed
    with pytest.raises(RuntimeError, match="text_encoder was not loaded"):
        ad.encode_prompts(["x"])
    with pytest.raises(ValueError, match="unknown components"):
        QwenImageAdapter.load(tiny_dir, components=("unet",))


def test_not_a_pipeline_dir_gives_clear_error(tmp_path):
    from fewstep.models.adapter import NotAPipelineError, QwenImageAdapter

    (tmp_path / "random.txt").write_text("hi")
    with pytest.raises(NotAPipelineError, match="model_index.json is missing.*init-tiny"):
        QwenImageAdapter.load(tmp_path)
    with pytest.raises(NotAPipelineError, match="model_index.json is missing"):
        QwenImageAdapter.load(tmp_path / "does-not-exist")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", "unet": []}))
    with pytest.raises(NotAPipelineError, match="not a Qwen-Image style pipeline"):
        QwenImageAdapter.load(tmp_path)


def test_save_load_round_trip_is_bit_exact(tiny_dir, tmp_path):
    from diffusers import QwenImagePipeline

    from fewstep.models.adapter import QwenImageAdapter
    from fewstep.models.tokens import pack_latents

    ad = QwenImageAdapter.load(tiny_dir)
    out = ad.save_pipeline(str(tmp_path / "saved"))
    back = QwenImageAdapter.load(out)
    for name in ("transformer", "vae", "text_encoder"):
        a, b = getattr(ad, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    prompts = ["a red cat", "two blue dogs"]
    assert torch.equal(ad.encode_prompts(prompts).embeds, back.encode_prompts(prompts).embeds)

    # A new transformer and a shift: diffusers' pipeline on the export samples exactly like `sample`,
    # even when the source scheduler is configured like real Qwen-Image's (dynamic shift, terminal).
    ad.scheduler_config.update(use_dynamic_shifting=True, shift_terminal=0.02, time_shift_type="exponential",
                               base_shift=0.5, max_shift=0.9, max_image_seq_len=8192)
    student = type(ad.transformer).from_config(ad.transformer.config)
    student.load_state_dict({k: v + 0.01 for k, v in ad.transformer.state_dict().items()})
    exported = ad.save_pipeline(str(tmp_path / "student"), transformer=student.eval(), scheduler_shift=3.0,
                                num_steps_hint=4)
    meta = json.loads((Path(exported) / "fewstep_model.json").read_text())
    assert meta["scheduler_shift"] == 3.0 and meta["num_steps_hint"] == 4
    pipe = QwenImagePipeline.from_pretrained(exported)
    ref = pipe(prompts, height=32, width=32, num_inference_steps=4, generator=torch.Generator().manual_seed(1),
               output_type="latent").images
    ours = ad.sample(student, ad.encode_prompts(prompts), None, num_steps=4, shift=3.0, height=32, width=32, seed=1)
    assert torch.equal(pack_latents(ours), ref)
    with pytest.raises(FileExistsError):
        ad.save_pipeline(exported)


def test_fp16_save(tiny_dir, tmp_path):
    from fewstep.models.adapter import QwenImageAdapter

    ad = QwenImageAdapter.load(tiny_dir, components=("transformer",))
    out = ad.save_pipeline(str(tmp_path / "half"), fp16=True)
    assert next(ad.transformer.parameters()).dtype == torch.float32  # the caller's model is untouched
    half = QwenImageAdapter.load(out, components=("transformer", "vae"), dtype=torch.float16)
    assert next(half.transformer.parameters()).dtype == torch.float16
    size = (Path(out) / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    full = (Path(tiny_dir) / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size < 0.6 * full
    # Components that were not loaded are copied from the source directory.
    assert (Path(out) / "text_encoder" / "model.safetensors").exists()


def test_s3_init_load_and_save(s3_options, s3_bucket, tiny_cfg, tmp_path):
    from fewstep import storage
    from fewstep.models.adapter import QwenImageAdapter
    from fewstep.models.tiny import init_tiny

    uri = init_tiny(f"{s3_bucket}/models/tiny", tiny_cfg, seed=0, storage_options=s3_options)
    ad = QwenImageAdapter.load(uri, components=("transformer", "vae"), storage=s3_options, cache_dir=tmp_path)
    assert ad.vae_scale_factor == 4 and ad.transformer is not None
    assert ad.condition_image_size == 56  # fewstep_model.json read from S3
    out = ad.save_pipeline(f"{s3_bucket}/exports/a", scheduler_shift=2.0, storage=s3_options)
    assert storage.exists(storage.join(out, "model_index.json"), s3_options)
    assert storage.exists(storage.join(out, "text_encoder", "model.safetensors"), s3_options)
    assert storage.read_json(storage.join(out, "scheduler", "scheduler_config.json"), s3_options)["shift"] == 2.0
    with pytest.raises(FileExistsError, match="exists and is not empty"):  # as for a local folder
        ad.save_pipeline(f"{s3_bucket}/exports/a", scheduler_shift=3.0, storage=s3_options)
    assert storage.read_json(storage.join(out, "scheduler", "scheduler_config.json"), s3_options)["shift"] == 2.0
    with pytest.raises(Exception, match="model_index.json is missing"):
        QwenImageAdapter.load(f"{s3_bucket}/nothing", storage=s3_options, cache_dir=tmp_path)


def test_teacher_preset_fits_budget():
    """The shipped teacher architecture: 64 px, latents 16x16x16, 64 tokens, < 18 MB in fp16."""
    from fewstep.models.tiny import build_components, load_tiny_config

    cfg = load_tiny_config(CONFIGS / "teacher.yaml")
    parts = build_components(cfg, seed=0)
    counts = {n: sum(p.numel() for p in parts[n].parameters()) for n in ("transformer", "vae", "text_encoder")}
    assert 4_000_000 <= counts["transformer"] <= 5_500_000
    assert sum(counts.values()) * 2 < 18_000_000
    assert 2 ** len(parts["vae"].temperal_downsample) == 4 and parts["vae"].config.z_dim == 16
    side = cfg.resolution // 4
    assert side == 16 and (side // 2) ** 2 == 64


def test_config_errors_name_the_field(tmp_path):
    from fewstep.config import ConfigError
    from fewstep.models.tiny import load_tiny_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("transformer:\n  attention_head_dim: 16\n  axes_dims_rope: [4, 4, 4]\n")
    with pytest.raises(ConfigError, match="transformer.*axes_dims_rope"):
        load_tiny_config(bad)
    bad.write_text("resolution: 30\n")
    with pytest.raises(ConfigError, match="multiple of"):
        load_tiny_config(bad)
    bad.write_text("vae:\n  z_dims: 4\n")
    with pytest.raises(ConfigError, match="z_dims: unknown key"):
        load_tiny_config(bad)


def test_cli_init_tiny_and_info(tmp_path):
    from fewstep.models.cli import app

    runner = CliRunner()
    out = tmp_path / "cli-tiny"
    result = runner.invoke(app, ["init-tiny", "--out", str(out), "--config", "tiny", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert (out / "model_index.json").exists()
    result = runner.invoke(app, ["info", str(out)])
    assert result.exit_code == 0, result.output
    assert "latent_shape: [4, 8, 8]" in result.output and "transformer" in result.output
    result = runner.invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 1 and "model_index.json is missing" in result.output
    result = runner.invoke(app, ["init-tiny", "--out", str(out)])
    assert result.exit_code == 1 and "overwrite" in result.output


def test_a_broken_model_record_names_its_file(tmp_path):
    import shutil

    from fewstep.models.pipeline_dir import NotAPipelineError, PipelineDir

    source = Path(__file__).resolve().parents[2] / "assets" / "teachers" / "base"
    copy = tmp_path / "base"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    (copy / "fewstep_model.json").write_text("{role: student")
    with pytest.raises(NotAPipelineError, match=r"fewstep_model.json is not valid JSON"):
        PipelineDir(str(copy)).meta()
