"""DMD's periodic validation on two ranks (two real processes, gloo): cases that do not divide
evenly over the ranks are padded for sampling but scored once, so every rank reports the score of
the whole validation set, and rank 0's grid shows every case once."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch.multiprocessing as mp

from tests.trainer.dmd_world import tiny_teacher


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _validate(rank: int, world: int, port: int, teacher: str, run: str, results) -> None:
    import torch.distributed as dist

    from fewstep.models.adapter import QwenImageAdapter
    from trainer.objectives.dmd_validation import ValidationConfig, Validator

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = ValidationConfig(every=1, cases_per_category=1, resolution=32)  # 3 cases over 2 ranks
        env = SimpleNamespace(rank=rank, world_size=world, storage=None, run_uri=run)
        validator = Validator(cfg, None, teacher, env, num_steps=2, shift=3.0)
        student = QwenImageAdapter.load(teacher, components=("transformer",)).transformer
        results[rank] = validator.run(SimpleNamespace(rank=rank), SimpleNamespace(net=student), step=3)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_score_every_validation_case_once(tmp_path):
    from fewstep.models.adapter import QwenImageAdapter
    from trainer.objectives.dmd_validation import ValidationConfig, Validator

    teacher = tiny_teacher(tmp_path)
    results = mp.Manager().dict()
    mp.spawn(_validate, args=(2, _free_port(), teacher, str(tmp_path / "two"), results), nprocs=2)
    two = dict(results)
    score_keys = {k for k in two[0] if k.startswith("val_score")}
    assert {k: two[0][k] for k in score_keys} == {k: two[1][k] for k in score_keys}

    # The same cases on one rank: the same per-case scores, so the same merged metrics.
    env = SimpleNamespace(rank=0, world_size=1, storage=None, run_uri=str(tmp_path / "one"))
    one_validator = Validator(ValidationConfig(every=1, cases_per_category=1, resolution=32), None,
                              teacher, env, num_steps=2, shift=3.0)
    student = QwenImageAdapter.load(teacher, components=("transformer",)).transformer
    one = one_validator.run(SimpleNamespace(rank=0), SimpleNamespace(net=student), step=3)
    assert {k: one[k] for k in score_keys} == pytest.approx({k: two[0][k] for k in score_keys})

    from PIL import Image

    grids = [Image.open(Path(tmp_path, name, "validation", "step-000003.png")) for name in ("two", "one")]
    assert grids[0].size == grids[1].size  # three cells, not four (the pad) or two (rank 0's share)
