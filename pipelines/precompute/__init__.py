"""The precompute stage: teacher text embeddings and VAE latents of a curated set, as Parquet shards.

    from pipelines.precompute import run_precompute, PrecomputeConfig
    manifest = run_precompute("configs/precompute/default.yaml", teacher, input, output)
"""

from pipelines.precompute.config import PoolConfig, PrecomputeConfig, load_precompute_config
from pipelines.precompute.plan import PrecomputeError
from pipelines.precompute.run import run_precompute

__all__ = ["PoolConfig", "PrecomputeConfig", "PrecomputeError", "load_precompute_config", "run_precompute"]
