"""Record each launch of a run folder, and refuse a launch that cannot resume what is there.

Launching a run name again resumes its latest checkpoint, with whatever settings the new launch
has: a longer schedule or another guidance scale are legitimate continuations. So the folder's
``config.yaml`` is always the latest launch's, every launch appends what it changed to
``launches.jsonl``, and a resume that changes settings says so in the log. A different objective
cannot resume another objective's checkpoints at all, so that is an error naming the fix.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import yaml

from fewstep import storage
from fewstep.config import ConfigError, changed_keys
from fewstep.storage import StorageOptions

log = logging.getLogger(__name__)

CONFIG_NAME = "config.yaml"
LAUNCHES_NAME = "launches.jsonl"
# Keys that differ between launches without changing the run (where the shell was, progress bars).
_IGNORED = ("run.runs_dir", "train.progress")


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for every setting that differs, except where the shell was."""
    return {k: v for k, v in changed_keys(old, new).items() if not k.startswith(_IGNORED)}


def record_launch(config: dict[str, Any], run_uri: str, checkpoints_uri: str,
                  options: StorageOptions | None) -> None:
    """Write the launch's config to the run folder and append the launch to ``launches.jsonl``.

    Raises ConfigError when the folder holds checkpoints of another objective.
    """
    config_uri = storage.join(run_uri, CONFIG_NAME)
    # Checkpoint files live in <checkpoints>/step-<N>/ (both stores).
    resumes = any("/step-" in f for f in storage.list_files(checkpoints_uri, options=options))
    changed: dict[str, list[Any]] = {}
    if storage.exists(config_uri, options):
        old = yaml.safe_load(storage.read_bytes(config_uri, options)) or {}
        changed = changed_settings(old, config)
        old_name = (old.get("objective") or {}).get("name")
        new_name = (config.get("objective") or {}).get("name")
        if resumes and old_name != new_name:
            run_name = (config.get("run") or {}).get("name")
            raise ConfigError(
                f"run.name: {run_name!r} ({run_uri}) holds checkpoints of a {old_name!r} run, and a "
                f"launch of the same run name resumes them; objective.name is {new_name!r}. Give "
                f"another run.name to start a new run, or delete the folder to start this one over.")
        if resumes and changed:
            shown = ", ".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in changed.items())
            log.warning("resuming %s from its checkpoints with changed settings: %s", run_uri, shown)
    storage.makedirs(run_uri, options)
    text = yaml.safe_dump(config, sort_keys=False)
    storage.write_bytes_atomic(config_uri, text.encode(), options)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumes": resumes,
              "changed": changed}
    launches_uri = storage.join(run_uri, LAUNCHES_NAME)
    previous = storage.read_bytes(launches_uri, options) if storage.exists(launches_uri, options) else b""
    storage.write_bytes_atomic(launches_uri, previous + (json.dumps(record) + "\n").encode(), options)


def read_launches(run_uri: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    uri = storage.join(run_uri, LAUNCHES_NAME)
    if not storage.exists(uri, options):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri, options).splitlines() if line.strip()]
