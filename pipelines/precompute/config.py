"""The precompute run config: what goes into the shards and how the actor pools are sized."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from fewstep.config import StrictModel, config_hash, load_config, parse_config

DType = Literal["float32", "float16", "bfloat16"]


class PoolConfig(StrictModel):
    """One actor pool (the text encoder's or the VAE's).

    ``batch_size`` is the number of rows per forward pass inside an actor. An actor is handed
    whole shards and runs the model over them in batches of this size, so a shard never leaves
    one actor half-done and the batch composition (hence the bits) is fixed by the data.
    """

    pool_size: int = Field(1, ge=1, description="Number of actors (model copies) in the pool.")
    batch_size: int = Field(8, ge=1, description="Rows per forward pass.")
    num_cpus: float = Field(
        0.5, gt=0, description="Logical CPUs per actor; keep it fractional on small machines so "
        "read and write tasks still get scheduled (a pool that takes every CPU deadlocks).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; > 0 runs the model on CUDA.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per actor (default: num_cpus rounded down, at "
        "least 1). CPU results depend on it in the last bits, so it is set the same under both "
        "executors, and the run records it: resume with the same value for the same bytes.")


class IoConfig(StrictModel):
    """The tasks that read curated rows and write shards."""

    num_cpus: float = Field(0.25, gt=0, description="Logical CPUs per read/write task.")


class PrecomputeConfig(StrictModel):
    rows_per_shard: int = Field(256, ge=1, description="Rows per output shard (the last may be short).")
    dtype: DType = Field("float32", description="Storage dtype of every tensor column.")
    model_dtype: DType = Field("float32", description="Compute dtype of the encoders.")
    resolution: int | None = Field(
        None, ge=8, description="Resize every image to this square size before the VAE; null "
        "uses the teacher's resolution (tiny teachers record one), else keeps each image's size "
        "rounded down to a multiple the VAE and the 2x2 latent packing accept.")
    condition_resolution: int | None = Field(
        None, ge=28, description="Side of the edit source image as the text encoder sees it (edit "
        "template); null uses the teacher's own setting (384 for real Qwen-Image-Edit).")
    negative_prompt: str = Field(
        "", description="The unconditional prompt: stored as empty_prompt.parquet (T2I CFG) and, "
        "with each edit source, as that row's negative embedding (edit CFG).")
    compression: Literal["zstd", "snappy", "none"] = Field("zstd", description="Parquet codec.")
    row_group_rows: int = Field(64, ge=1, description="Parquet row group size inside a shard.")
    teacher_checksum_max_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="Teacher files up to this size are checksummed for "
        "the teacher identity; larger weight files count by name and size only.")
    cpu_limit: float | None = Field(
        None, gt=0, description="Most logical CPUs this run's Ray Data plan may use (null: the whole "
        "cluster); lets precompute share a cluster, and models a small machine on a big one.")
    executor: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Data actor pools; local: the same operators in this process, "
        "one shard at a time (a single GPU box without Ray, debugging). Same output bytes (same "
        "torch_threads).")
    fuse_encoders: bool = Field(
        False, description="Run the VAE inside the text encoder's actors (one pool; text_encoder's "
        "pool_size, num_cpus, num_gpus and torch_threads apply, vae's batch_size only). Faster on "
        "small CPU machines; separate pools let each encoder have its own GPUs.")
    text_encoder: PoolConfig = Field(default_factory=PoolConfig)
    vae: PoolConfig = Field(default_factory=PoolConfig)
    io: IoConfig = Field(default_factory=IoConfig)

    def identity(self) -> dict[str, Any]:
        """The part of the config that decides the output bytes (resources excluded).

        Pool sizes, CPUs and GPUs change how fast shards are made, not what is in them, so a
        killed run may be resumed with more or fewer actors.
        """
        data = self.model_dump(mode="json")
        for pool in ("text_encoder", "vae"):
            data[pool] = {"batch_size": data[pool]["batch_size"]}
        data.pop("io")
        data.pop("fuse_encoders")
        data.pop("cpu_limit")
        data.pop("executor")
        return data

    def identity_hash(self) -> str:
        return config_hash(self.identity())

    def total_actor_cpus(self) -> float:
        text = self.text_encoder.pool_size * self.text_encoder.num_cpus
        return text if self.fuse_encoders else text + self.vae.pool_size * self.vae.num_cpus


def load_precompute_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PrecomputeConfig:
    return load_config(PrecomputeConfig, path, overrides)


def as_config(config: PrecomputeConfig | dict | str | Path | None) -> PrecomputeConfig:
    """Accept a config object, a dict, a YAML path, or None (defaults)."""
    if config is None:
        return PrecomputeConfig()
    if isinstance(config, PrecomputeConfig):
        return config
    if isinstance(config, dict):
        return parse_config(PrecomputeConfig, config, "<precompute config>")
    return load_precompute_config(config)
