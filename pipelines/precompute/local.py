"""Run the precompute plan in this process, without Ray: the same operators in the same order.

For a single GPU box without a Ray installation, debugging, and the data-engine benchmark's
baseline. Each shard goes through exactly the functions the Ray plan maps (load -> text encoder
-> VAE -> write), one shard at a time, so the bytes written are the same as the Ray executor's.
"""

from __future__ import annotations

import json

import pyarrow as pa

from fewstep.storage import StorageOptions
from pipelines.precompute import encode, write
from pipelines.precompute.config import PrecomputeConfig
from pipelines.precompute.plan import ShardPlan


def execute_local(cfg: PrecomputeConfig, todo: list[ShardPlan], teacher: str, input: str, output: str,
                  options: StorageOptions | None, pid: str, has_images: bool,
                  show_progress: bool) -> dict[str, dict]:
    from tqdm import tqdm

    def actor_args(pool) -> tuple:
        return encode.actor_args(cfg, pool, teacher, options)

    text = encode.TextEncodeActor(*actor_args(cfg.text_encoder), batch_size=cfg.text_encoder.batch_size,
                                  negative_prompt=cfg.negative_prompt,
                                  condition_resolution=cfg.condition_resolution)
    vae = (encode.VaeEncodeActor(*actor_args(cfg.vae), batch_size=cfg.vae.batch_size,
                                 resolution=cfg.resolution) if has_images else None)
    new: dict[str, dict] = {}
    for item in tqdm(todo, desc="precompute shards (local)", unit="shard", disable=not show_progress):
        table = encode.load_shard(pa.table({"plan": [item.to_json()]}), input_uri=input,
                                  options=options, negative_prompt=cfg.negative_prompt)
        table = text(table)
        table = vae(table) if vae is not None else encode.drop_images(table)
        summaries = write.write_shard(table, output=output, options=options, input_uri=input,
                                      dtype=cfg.dtype, compression=cfg.compression,
                                      row_group_rows=cfg.row_group_rows, plan_id=pid)
        for text_summary in summaries.column("summary").to_pylist():
            summary = json.loads(text_summary)
            new[summary["path"].rsplit("/", 1)[-1]] = summary
    return new
