"""Collectives the loop and the objectives share, safe on one process without a process group."""

from __future__ import annotations

from typing import Any

import torch


def gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's ``value``, in rank order (all-gather of picklable objects; ``[value]`` on one
    process or when no process group exists)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered
