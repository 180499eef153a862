"""Learning-rate schedules of the per-model optimisers: warm-up, then constant or decay."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from trainer.objectives.base import OptimizerConfig
from trainer.runtime.engines import _optimizer


def _lrs(config: OptimizerConfig, steps: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = _optimizer([param], config, torch.device("cpu"))
    seen = []
    for _ in range(steps):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    return seen


def test_constant_after_warmup_is_the_default() -> None:
    lrs = _lrs(OptimizerConfig(lr=1.0, warmup_steps=4), 10)
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4:] == pytest.approx([1.0] * 6)


def test_linear_decay_reaches_the_floor_at_decay_steps_and_stays() -> None:
    config = OptimizerConfig(lr=1.0, warmup_steps=2, decay="linear", decay_steps=12, min_lr_ratio=0.1)
    lrs = _lrs(config, 16)
    assert lrs[2] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(lrs[2:12], lrs[3:13]))
    assert lrs[12:] == pytest.approx([0.1] * 4)
    assert lrs[7] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay


def test_cosine_decay_is_half_way_at_the_midpoint() -> None:
    config = OptimizerConfig(lr=2.0, decay="cosine", decay_steps=10)
    lrs = _lrs(config, 11)
    assert lrs[0] == pytest.approx(2.0)
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(0.0)


def test_a_decay_without_its_length_names_the_field_and_the_fix() -> None:
    with pytest.raises(ValidationError, match="decay_steps.*train.max_steps"):
        OptimizerConfig(lr=1.0, decay="cosine")
    with pytest.raises(ValidationError, match="min_lr_ratio"):
        OptimizerConfig(lr=1.0, decay="linear", decay_steps=10, min_lr_ratio=2.0)
