"""Where a teacher run starts: a fresh tiny pipeline from a preset, or an existing pipeline dir.

``init: {from: tiny-config, config: teacher}`` writes a random pipeline of the preset
(``configs/models/<name>.yaml``) into the worker's scratch folder; every rank builds the same
weights from the same seed. ``vae: DIR`` then puts the VAE of another pipeline directory in
(the base teacher takes the VAE trained by the VAE run). ``init: {from: pretrained, path: DIR}``
starts from a finished pipeline (the text specialist starts from the base teacher).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from fewstep import storage
from fewstep.config import StrictModel
from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)

REPO_MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


class InitConfig(StrictModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    source: Literal["tiny-config", "pretrained"] = Field(
        ..., alias="from", description="tiny-config: fresh random pipeline; pretrained: a pipeline dir.")
    config: str | None = Field(
        None, description="tiny-config: architecture preset, a YAML path or a name (tiny, teacher).")
    path: str | None = Field(None, description="pretrained: pipeline directory (local or s3://).")
    vae: str | None = Field(None, description="Take vae/ from this pipeline directory instead.")
    seed: int = Field(0, description="tiny-config: seed of the random weights.")

    @field_validator("path", "vae")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        # Resolved on the driver, so workers with another working directory find it too.
        return storage.normalize(value) if value else value

    @field_validator("config")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        if value is None:
            return value
        path = Path(value)
        for candidate in (path, REPO_MODEL_CONFIGS / f"{value}.yaml", REPO_MODEL_CONFIGS / path.name):
            if candidate.is_file():
                return str(candidate.resolve())
        raise ValueError(f"no such model preset {value!r} (a YAML path or a name in {REPO_MODEL_CONFIGS})")

    @model_validator(mode="after")
    def _needs(self):
        if self.source == "tiny-config" and not self.config:
            raise ValueError("init.config: required with from: tiny-config (e.g. config: teacher)")
        if self.source == "pretrained" and not self.path:
            raise ValueError("init.path: required with from: pretrained (a pipeline directory)")
        return self


def prepare_pipeline_dir(init: InitConfig, work_dir: Path, options: StorageOptions | None) -> str:
    """The pipeline directory this run starts from (a URI; built locally for tiny-config)."""
    if init.source == "pretrained" and not init.vae:
        return storage.normalize(init.path)
    out = work_dir / "init-pipeline"
    if out.exists():
        shutil.rmtree(out)
    if init.source == "tiny-config":
        from fewstep.models.tiny import init_tiny, load_tiny_config

        init_tiny(out, load_tiny_config(init.config), seed=init.seed)
    else:
        storage.download_dir(init.path, out, options) if storage.is_s3(init.path) else \
            shutil.copytree(init.path, out)
    if init.vae:
        _replace_vae(out, init.vae, options)
    return str(out)


def _replace_vae(pipeline: Path, vae_source: str, options: StorageOptions | None) -> None:
    src = storage.join(vae_source, "vae")
    if not storage.exists(storage.join(src, "config.json"), options):
        raise FileNotFoundError(f"init.vae: {vae_source} has no vae/config.json (not a pipeline directory)")
    target = pipeline / "vae"
    shutil.rmtree(target, ignore_errors=True)
    if storage.is_s3(src):
        storage.download_dir(src, target, options)
    else:
        shutil.copytree(src, target)
    import json

    z_dim = json.loads((target / "config.json").read_text())["z_dim"]
    in_channels = json.loads((pipeline / "transformer" / "config.json").read_text())["in_channels"]
    if in_channels != 4 * z_dim:
        raise ValueError(f"init.vae: {vae_source} has z_dim {z_dim}, but the transformer expects "
                         f"{in_channels // 4} latent channels; use a VAE trained from the same preset")
    log.info("init: vae/ taken from %s", vae_source)
