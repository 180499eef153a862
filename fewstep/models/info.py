"""Describe a pipeline directory without loading its weights (configs + safetensors headers)."""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from fewstep import storage
from fewstep.models.pipeline_dir import ALL_COMPONENTS, PipelineDir
from fewstep.storage import StorageOptions


def _safetensors_params(uri: str, options: StorageOptions | None) -> int:
    """Parameter count from a safetensors header (8-byte length + JSON), reading only the header."""
    fs, path = storage.resolve(uri, options)
    with fs.open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in entry["shape"]:
            count *= dim
        total += count
    return total


def describe(uri: str, options: StorageOptions | None = None) -> dict[str, Any]:
    source = PipelineDir(uri, options)
    rows = []
    for name in ALL_COMPONENTS:
        if not source.has(name):
            continue
        folder = storage.join(source.uri, name)
        files = storage.list_files(folder, options=options)
        weights = [f for f in files if f.endswith(".safetensors")]
        rows.append({
            "name": name,
            "class": ".".join(source.model_index[name]),
            "parameters": sum(_safetensors_params(f, options) for f in weights) if weights else None,
            "bytes": sum(storage.size_of(f, options) for f in files),
        })
    vae = source.read_json("vae/config.json")
    meta = source.meta()
    scale = 2 ** len(vae["temperal_downsample"])
    resolution = meta.get("resolution")
    info: dict[str, Any] = {
        "uri": source.uri,
        "components": rows,
        "vae_scale_factor": scale,
        "latent_channels": vae["z_dim"],
        "resolution": resolution,
        "condition_image_size": meta.get("condition_image_size"),
        "scheduler": {k: v for k, v in source.read_json("scheduler/scheduler_config.json").items()
                      if k in ("shift", "use_dynamic_shifting", "num_train_timesteps")},
    }
    if resolution:
        side = 2 * (resolution // (scale * 2))
        info["latent_shape"] = [vae["z_dim"], side, side]
        info["image_tokens"] = (side // 2) ** 2
    return info


WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")


def fingerprint(uri: str, options: StorageOptions | None = None) -> dict[str, str]:
    """Per component, a short sha256 over its weight files (names and contents).

    A directory path says where a model was, not what was there: two evaluations of the "same"
    path before and after a component was replaced compare different models. Recording this beside
    the path makes such comparisons checkable (equal digests: bit-identical weights).

    Local files are hashed (about a second per GB). On ``s3://`` the objects' ETags and sizes are
    hashed instead, so a large checkpoint is not downloaded once more just to be named; those
    digests start with ``etag-`` and compare only with other ``etag-`` digests.
    """
    source = PipelineDir(uri, options)
    out: dict[str, str] = {}
    for name in WEIGHT_COMPONENTS:
        if not source.has(name):
            continue
        folder = storage.join(source.uri, name)
        digest, tagged = hashlib.sha256(), False
        for path in sorted(f for f in storage.list_files(folder, options=options) if f.endswith(".safetensors")):
            digest.update(path.rsplit("/", 1)[-1].encode())
            tag = storage.object_tag(path, options)
            tagged = tagged or tag is not None
            digest.update(tag.encode() if tag else bytes.fromhex(storage.sha256_of(path, options)))
        out[name] = ("etag-" if tagged else "") + digest.hexdigest()[:16]
    return out
