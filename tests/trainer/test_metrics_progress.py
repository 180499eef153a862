"""The driver's progress bar shows an objective's chosen metrics, including ones logged only
on some steps (a DMD run's ``val_score``), from the run's ``metrics.jsonl``."""

from __future__ import annotations

import json

from trainer.objectives.base import resolve_objective
from trainer.runtime.metrics import METRICS_NAME, MetricsFollower


def _write(run_dir, records) -> None:
    (run_dir / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records))


def test_follower_keeps_validation_score_visible_between_validation_steps(tmp_path) -> None:
    keys = resolve_objective("dmd").progress_keys
    follower = MetricsFollower(str(tmp_path), None, total=10, description="dmd", keys=keys)
    _write(tmp_path, [{"step": 2, "dmd_loss": 0.5, "fake_loss": 0.2, "val_score": 0.41},
                      {"step": 4, "dmd_loss": 0.4, "fake_loss": 0.1}])
    follower._poll()
    bar = follower.progress.bar
    assert bar.n == 4
    assert bar.postfix is not None and "val_score=0.41" in bar.postfix and "dmd_loss=0.4" in bar.postfix
    assert "loss=" not in bar.postfix.replace("dmd_loss=", "").replace("fake_loss=", "")
    follower.progress.close()


def test_flow_matching_bar_shows_loss_and_throughput(tmp_path) -> None:
    keys = resolve_objective("flow_matching").progress_keys
    follower = MetricsFollower(str(tmp_path), None, total=10, description="fm", keys=keys)
    _write(tmp_path, [{"step": 3, "loss": 0.25, "samples_per_s": 12.0, "grad_norm": 1.5}])
    follower._poll()
    assert follower.progress.bar.n == 3
    assert "loss=0.25" in follower.progress.bar.postfix and "grad_norm" not in follower.progress.bar.postfix
    follower.progress.close()


def test_a_restart_keeps_the_lines_up_to_its_checkpoint_and_no_other(tmp_path):
    import json

    from trainer.runtime.metrics import MetricsLog

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (0, 2, 4, 6)))
    log = MetricsLog(str(run), None, tmp_path / "work", resume_step=4)  # resumed from step 4
    log.close()
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0, 2, 4]
    log = MetricsLog(str(run), None, tmp_path / "work", resume_step=0)  # no checkpoint: from scratch
    log.close()
    assert (run / "metrics.jsonl").read_text() == ""  # its step-0 record is written again, once
