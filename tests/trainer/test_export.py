"""Export: the student as a diffusers pipeline directory both Qwen-Image pipelines load and
sample with num_inference_steps=4, true_cfg_scale=1 (the student's own schedule)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from tests.trainer.dmd_world import tiny_teacher


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from fewstep.models.adapter import QwenImageAdapter
    from trainer.export import export_student

    root = tmp_path_factory.mktemp("export")
    teacher = tiny_teacher(root)
    meta_file = Path(teacher) / "fewstep_model.json"  # a trained base says how long it trained
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), "trained_steps": 123}))
    ad = QwenImageAdapter.load(teacher)
    student = copy.deepcopy(ad.transformer)
    with torch.no_grad():  # a student that differs from the teacher
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    out = export_student(student, teacher, str(root / "student"), num_steps=4, shift=3.0,
                         extra_meta={"note": "test"})
    return ad, student, out


def test_t2i_pipeline_samples_the_students_4_step_schedule(exported):
    from diffusers import QwenImagePipeline

    from fewstep.models.tokens import pack_latents

    ad, student, out = exported
    pipe = QwenImagePipeline.from_pretrained(out)
    assert pipe.scheduler.config.shift == 3.0 and not pipe.scheduler.config.use_dynamic_shifting
    result = pipe(prompt=["a red circle on a blue background"], true_cfg_scale=1.0, num_inference_steps=4,
                  height=32, width=32, generator=torch.Generator().manual_seed(7), output_type="latent")
    cond = ad.encode_prompts(["a red circle on a blue background"])
    mine = ad.sample(student, cond, None, num_steps=4, shift=3.0, height=32, width=32, seed=7)
    assert torch.allclose(pack_latents(mine), result.images, atol=1e-4)
    # ... and not the teacher's: the exported transformer is the student's.
    theirs = ad.sample(ad.transformer, cond, None, num_steps=4, shift=3.0, height=32, width=32, seed=7)
    assert not torch.allclose(pack_latents(theirs), result.images, atol=1e-3)
    images = pipe(prompt="a cat", true_cfg_scale=1.0, num_inference_steps=4, height=32, width=32).images
    assert images[0].size == (32, 32)


def test_edit_pipeline_loads_and_samples(exported):
    from diffusers import QwenImageEditPipeline
    from PIL import Image

    from fewstep.models.tokenizer import FewstepQwen2VLProcessor

    _, _, out = exported
    # transformers' stock Qwen2VLProcessor needs a video processor, i.e. torchvision, which this
    # machine cannot import; the images-only subclass is passed in its place (same files).
    processor = FewstepQwen2VLProcessor.from_pretrained(f"{out}/processor")
    pipe = QwenImageEditPipeline.from_pretrained(out, processor=processor)
    assert pipe.transformer.config.num_layers == 2
    source = Image.new("RGB", (32, 32), (200, 30, 30))
    result = pipe(image=source, prompt="make it blue", true_cfg_scale=1.0, num_inference_steps=4,
                  height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert result.images[0].size == (32, 32)


def test_metadata_tells_eval_how_to_sample(exported):
    from trainer.export import default_sampling

    ad, _, out = exported
    assert default_sampling(out) == {"role": "student", "num_steps": 4, "shift": 3.0, "cfg": 1.0}
    assert default_sampling(str(ad.source.uri))["role"] == "teacher"


def test_student_does_not_inherit_the_teachers_step_count(exported):
    _, _, out = exported
    meta = json.loads((Path(out) / "fewstep_model.json").read_text())
    assert meta["trained_steps"] is None  # unknown here; never the base's 123
