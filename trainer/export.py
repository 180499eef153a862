"""Export a distilled student as a diffusers pipeline directory.

The directory is the base teacher's pipeline with the student's transformer in place of the
teacher's and a scheduler whose shift is the student's (``use_dynamic_shifting`` off), so
``QwenImagePipeline.from_pretrained(DIR)(..., num_inference_steps=4, true_cfg_scale=1)``
follows exactly the schedule the student was trained on. Editing students load with
``QwenImageEditPipeline.from_pretrained`` from the same directory (the teacher's processor
is copied along). ``fewstep_model.json`` records the role, steps and shift for ``fewstep eval``.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)


def plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """The bare model behind wrappers (DeepSpeed engine, DDP, torch.compile)."""
    seen = 0
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module) and seen < 4:
        module = module.module
        seen += 1
    return getattr(module, "_orig_mod", module)


def export_student(
    student: torch.nn.Module,
    base_uri: str,
    out_uri: str,
    *,
    num_steps: int,
    shift: float,
    storage: StorageOptions | None = None,
    trained_steps: int | None = None,
    extra_meta: dict[str, Any] | None = None,
) -> str:
    """Write ``out_uri`` (local or s3://): student transformer + ``base_uri``'s other parts.

    ``trained_steps`` is the student's own count (None when unknown): the base teacher's is never
    carried over. The student is saved in float32 (a bf16 or GPU module is copied first, so the caller's
    module is left untouched). Returns the URI written.
    """
    from fewstep.models.adapter import QwenImageAdapter

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = QwenImageAdapter.load(base_uri, components=(), storage=storage)
    transformer = plain_module(student)
    # save_pretrained only reads the weights; copy only when a cast is needed (bf16 runs, GPU).
    if transformer.dtype != torch.float32 or transformer.device.type != "cpu":
        transformer = copy.deepcopy(transformer).to("cpu", torch.float32)
    meta = {
        "role": "student",
        "num_steps": int(num_steps),
        "true_cfg_scale": 1.0,
        "base_teacher": str(base_uri),
        "trained_steps": trained_steps,
        **(extra_meta or {}),
    }
    uri = base.save_pipeline(out_uri, transformer=transformer, scheduler_shift=float(shift),
                             num_steps_hint=int(num_steps), storage=storage, extra_meta=meta)
    log.info("exported %d-step student to %s", num_steps, uri)
    return uri


def default_sampling(pipeline_uri: str, storage: StorageOptions | None = None) -> dict[str, Any]:
    """How a pipeline directory wants to be sampled: ``{"role", "num_steps", "shift", "cfg"}``.

    Exported students carry their steps and shift; anything else is treated as a teacher
    with its scheduler's shift.
    """
    from fewstep.models.pipeline_dir import PipelineDir

    source = PipelineDir(pipeline_uri, storage)
    meta = source.meta()
    scheduler = source.read_json("scheduler/scheduler_config.json")
    shift = float(meta.get("scheduler_shift", scheduler.get("shift", 1.0)))
    if meta.get("role") == "student":
        return {"role": "student", "num_steps": int(meta.get("num_steps", meta.get("num_steps_hint", 4))),
                "shift": shift, "cfg": float(meta.get("true_cfg_scale", 1.0))}
    return {"role": "teacher", "num_steps": None, "shift": shift, "cfg": None}
