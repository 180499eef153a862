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


def test_schedule_settings_that_would_do_nothing_or_harm_are_refused() -> None:
    with pytest.raises(ValidationError, match="decay_steps, min_lr_ratio: set, but decay is 'constant'"):
        OptimizerConfig(decay_steps=1000, min_lr_ratio=0.1)
    OptimizerConfig(decay="constant", decay_start=None, decay_steps=None)  # explicit "no decay" is fine
    for bad in ({"lr": -1.0}, {"lr": 0.0}, {"warmup_steps": -5}, {"eps": 0.0}, {"weight_decay": -0.1}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            OptimizerConfig(**bad)


def test_decay_start_holds_the_rate_then_decays_to_the_floor() -> None:
    config = OptimizerConfig(lr=1.0, decay="linear", decay_start=4, decay_steps=8, min_lr_ratio=0.0)
    lrs = _lrs(config, 10)
    assert lrs[:5] == pytest.approx([1.0] * 5)
    assert lrs[4:9] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    with pytest.raises(ValidationError, match="decay_steps.*decay_start"):
        OptimizerConfig(lr=1.0, decay="linear", decay_start=10, decay_steps=10)


def test_a_resumed_constant_run_starts_its_decay_where_it_stands() -> None:
    """An annealing phase added on resume: the restored scheduler continues on the new schedule
    from the restored step, without a jump down the curve."""
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer, scheduler = _optimizer([param], OptimizerConfig(lr=1.0), torch.device("cpu"))
    for _ in range(6):
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    saved = optimizer.state_dict(), scheduler.state_dict()

    annealed = OptimizerConfig(lr=1.0, decay="linear", decay_start=6, decay_steps=10, min_lr_ratio=0.2)
    optimizer, scheduler = _optimizer([param], annealed, torch.device("cpu"))
    optimizer.load_state_dict(saved[0])
    scheduler.load_state_dict(saved[1])
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        param.grad = torch.ones_like(param)
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2, 0.2])
