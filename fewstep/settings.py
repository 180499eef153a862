"""Environment settings, read in one place (``FEWSTEP_*`` variables and an optional ``.env``).

Stages never read the environment themselves: the CLI builds a :class:`Settings` once and
passes what each stage needs (storage options, Ray address) down explicitly.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from fewstep.storage import StorageOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FEWSTEP_", env_file=".env", extra="ignore")

    runs_dir: Path = Field(Path("runs"), description="Where local runs, datasets and checkpoints go.")
    database_url: str = Field("sqlite:///runs/fewstep.db", description="Control-service database.")
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("FEWSTEP_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster to join; unset starts an embedded local cluster.",
    )
    ray_num_cpus: int | None = Field(
        None, description="Logical CPUs for an embedded cluster (default: max(4, cores)).")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto, ...).")
    s3_region: str = Field("us-east-1")
    aws_access_key_id: str | None = Field(
        None, validation_alias=AliasChoices("FEWSTEP_AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: str | None = Field(
        None,
        validation_alias=AliasChoices("FEWSTEP_AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    torch_extensions_dir: Path | None = Field(
        None, description="Cache for DeepSpeed's JIT-compiled ops (reused across runs).")

    def storage_options(self) -> StorageOptions:
        return StorageOptions(
            endpoint_url=self.s3_endpoint_url,
            region=self.s3_region,
            access_key_id=self.aws_access_key_id,
            secret_access_key=self.aws_secret_access_key,
        )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
