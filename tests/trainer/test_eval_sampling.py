"""Pieces shared by eval, validation and the sampling benchmark (no models needed)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from trainer.evaluate.sampling import case_noise, count_calls, image_stats, make_grid
from trainer.objectives.dmd_validation import _rank_share, merge_scored, pick_cases


def test_count_calls_counts_samples_per_forward_pass():
    class Net(torch.nn.Module):
        def forward(self, hidden_states, timestep=None):
            return hidden_states

    net = Net()
    with count_calls(net) as counter:
        net(hidden_states=torch.zeros(3, 4))
        net(torch.zeros(2, 4))
    net(hidden_states=torch.zeros(5, 4))  # outside the block: not counted
    assert (counter.calls, counter.sample_evals) == (2, 5)


def test_case_noise_is_the_pipelines_noise_for_the_seed():
    expected = torch.randn((1, 1, 4, 8, 8), generator=torch.Generator().manual_seed(123))[:, 0]
    assert torch.equal(case_noise(123, 4, 8, 8), expected)
    assert not torch.equal(case_noise(124, 4, 8, 8), expected)


def test_collapse_indicators():
    flat = [Image.new("RGB", (16, 16), (120, 30, 30))] * 3
    stats = image_stats(flat)
    assert stats == pytest.approx({"pixel_std": 0.0, "diversity": 0.0, "border_mode_share": 1.0}, abs=1e-6)
    rng = torch.Generator().manual_seed(0)
    noisy = [Image.fromarray((torch.rand(16, 16, 3, generator=rng) * 255).byte().numpy()) for _ in range(3)]
    varied = image_stats(noisy)
    assert varied["pixel_std"] > 0.2 and varied["diversity"] > 0.2


def test_validation_cases_are_split_evenly_over_ranks():
    shares = [pick_cases("t2i-bench-mini", 1, rank, 2) for rank in range(2)]
    assert [len(s) for s in shares] == [2, 2]  # 3 cases padded to 4
    assert {c.category for s in shares for c in s} == {"portrait", "landscape", "text"}
    assert len(pick_cases("editing-bench-mini", 2, 0, 1)) == 12


def test_padded_repeats_are_marked_so_each_case_is_scored_once():
    shares = [_rank_share("t2i-bench-mini", 1, rank, 2) for rank in range(2)]
    positions = [i for share in shares for _, i in share]
    assert sorted(p for p in positions if p is not None) == [0, 1, 2] and positions.count(None) == 1
    assert all(i is not None for _, i in _rank_share("t2i-bench-mini", 1, 0, 1))


def test_merged_scores_count_each_case_once_whatever_the_split():
    # Three cases over two ranks: rank 0 scored two, rank 1 one (its pad is not a record).
    parts = [[(0, "t2i", "portrait", 1.0), (2, "t2i", "text", 2.0)], [(1, "t2i", "landscape", 5.0)]]
    merged = merge_scored(parts)
    assert merged["val_score"] == pytest.approx(8 / 3)  # a mean of rank means would say 3.25
    assert merged == merge_scored([parts[1], parts[0]])
    assert {k: merged[k] for k in ("val_score_portrait", "val_score_landscape")} == \
        {"val_score_portrait": 1.0, "val_score_landscape": 5.0}
    both = merge_scored([[(0, "t2i", "text", 2.0), (1, "edit", "edit_text", 4.0), (2, "edit", "edit_text", 2.0)]])
    assert both["val_score_t2i"] == 2.0 and both["val_score_edit"] == 3.0 and both["val_score"] == pytest.approx(8 / 3)


def test_grid_shape():
    grid = make_grid([Image.new("RGB", (8, 8))] * 5, ["a"] * 5, columns=2, cell=10)
    assert grid.size == (20, 3 * (10 + 12))


def test_border_mode_share_flags_one_background_for_every_prompt():
    def framed(background, subject=(250, 200, 30)):
        image = Image.new("RGB", (32, 32), background)
        image.paste(subject, (10, 10, 22, 22))
        return image

    palette = [(30, 80, 200), (200, 30, 30), (40, 160, 60), (250, 250, 250), (20, 20, 20), (140, 40, 170)]
    varied = image_stats([framed(c) for c in palette])
    assert varied["border_mode_share"] == pytest.approx(1 / 6)
    drifted = image_stats([framed(palette[0])] * 5 + [framed(palette[1])])
    assert drifted["border_mode_share"] == pytest.approx(5 / 6)


def test_validation_watches_t2i_and_edit_benches(tmp_path):
    """A DMD run can validate on both validation benches: one score per task and per category (edit
    categories prefixed, as both tasks have a "text" category), and a grid of every image."""
    from types import SimpleNamespace

    from fewstep.bench.world import EDIT_CATEGORIES, T2I_CATEGORIES
    from fewstep.models.adapter import QwenImageAdapter
    from tests.trainer.dmd_world import tiny_teacher
    from trainer.objectives.dmd_validation import ValidationConfig, Validator

    teacher = tiny_teacher(tmp_path)
    assert ValidationConfig().benches == ["t2i-bench-val"]  # never the reported benches by default
    with pytest.raises(ValueError, match="benches"):
        ValidationConfig(benches=["t2i-bench-huge"])
    cfg = ValidationConfig(every=1, benches=["t2i-bench-val", "editing-bench-val"], cases_per_category=1,
                           resolution=32)
    env = SimpleNamespace(rank=0, world_size=1, storage=None, run_uri=str(tmp_path / "run"))
    validator = Validator(cfg, None, teacher, env, num_steps=2, shift=3.0)
    assert len(validator.cases) == len(T2I_CATEGORIES) + len(EDIT_CATEGORIES)
    student = QwenImageAdapter.load(teacher, components=("transformer",)).transformer
    out = validator.run(SimpleNamespace(rank=0), SimpleNamespace(net=student), step=5)
    assert {"val_score", "val_score_t2i", "val_score_edit", "val_pixel_std", "val_diversity"} <= set(out)
    assert {f"val_score_{c}" for c in T2I_CATEGORIES} <= set(out)
    assert {f"val_score_edit_{c}" for c in EDIT_CATEGORIES} <= set(out)
    n_t2i, n_edit = len(T2I_CATEGORIES), len(EDIT_CATEGORIES)
    assert out["val_score"] == pytest.approx((out["val_score_t2i"] * n_t2i + out["val_score_edit"] * n_edit)
                                             / (n_t2i + n_edit))
    assert (tmp_path / "run" / "validation" / "step-000005.png").stat().st_size > 0
