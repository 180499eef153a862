"""Flow-matching objective: the path and target, caption dropout, t sampling, and a short
local run on a tiny pipeline that lowers the loss, exports a loadable pipeline and resumes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from trainer.objectives.base import ObjectiveEnv, TrainState
from trainer.objectives.flow_matching import FlowMatchingConfig, FlowMatchingObjective, sample_t
from trainer.runtime.synthetic import ensure_tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_tiny_world(tmp_path_factory.getbasetemp() / "tiny-world")


def _rows(shards: str, n: int | None = None) -> dict:
    import pyarrow.parquet as pq

    from trainer.runtime.data import table_to_numpy

    tables = [pq.read_table(p) for p in sorted(Path(shards, "shards").glob("*.parquet"))]
    import pyarrow as pa

    table = pa.concat_tables(tables)
    # Both tasks in one batch: T2I rows first, then edit rows.
    table = table.sort_by([("task", "descending")])
    return table_to_numpy(table if n is None else table.slice(0, n))


def _objective(world, tmp_path, dropout: float) -> FlowMatchingObjective:
    pipeline, shards = world
    cfg = FlowMatchingConfig.model_validate(
        {"init": {"from": "pretrained", "path": pipeline}, "caption_dropout": dropout})
    env = ObjectiveEnv(rank=0, world_size=1, device=torch.device("cpu"), storage=None, run_uri=str(tmp_path),
                       data_uri=shards, work_dir=tmp_path)
    return FlowMatchingObjective(cfg, env)


def _state(seed: int = 0) -> TrainState:
    return TrainState(step=0, max_steps=1, rank=0, world_size=1, device=torch.device("cpu"),
                      compute_dtype=torch.float32, models={}, generator=torch.Generator().manual_seed(seed))


class Recorder(torch.nn.Module):
    """Wraps the transformer and keeps the inputs of each call."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls: list[dict] = []

    def __getattr__(self, name):  # like a DeepSpeed engine: unknown attributes from the model
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, **kwargs):
        self.calls.append({k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        return self.inner(**kwargs)


def _transformer(objective) -> torch.nn.Module:
    """The transformer as the runtime builds it from the objective's model spec."""
    (spec,) = objective.model_specs()
    return spec.build()


def test_path_target_and_loss(world, tmp_path):
    from fewstep.models.tokens import pack_latents

    objective = _objective(world, tmp_path, dropout=0.0)
    state = _state()
    objective.setup(state)
    batch = objective.collate(_rows(world[1]), torch.device("cpu"))
    assert set(batch.tasks) == {"t2i", "edit"}
    transformer = _transformer(objective)
    net = Recorder(transformer)
    loss, values = objective.loss(state, net, batch)

    # Replay the generator: t, eps, dropout draws in the objective's order.
    g = torch.Generator().manual_seed(0)
    n = len(batch)
    t = sample_t(n, objective.config.timestep, g)
    eps = torch.randn(batch.latents.shape, generator=g)
    x = batch.latents
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * eps
    t2i = [i for i, task in enumerate(batch.tasks) if task == "t2i"]
    edit = [i for i, task in enumerate(batch.tasks) if task == "edit"]
    assert len(net.calls) == 2  # one forward per task
    tokens = (x.shape[2] // 2) * (x.shape[3] // 2)
    first, second = net.calls
    assert torch.allclose(first["hidden_states"], pack_latents(z[t2i]), atol=1e-6)
    assert torch.allclose(first["timestep"], t[t2i])
    # Edit: noisy tokens first, then the source latents' tokens (Qwen-Image-Edit layout).
    assert second["hidden_states"].shape[1] == 2 * tokens
    assert torch.allclose(second["hidden_states"][:, :tokens], pack_latents(z[edit]), atol=1e-6)
    assert torch.allclose(second["hidden_states"][:, tokens:], pack_latents(batch.source_latents[edit]),
                          atol=1e-6)

    # The loss is the MSE against eps - x, weighted by the rows of each task.
    with torch.no_grad():
        from fewstep.models.tokens import PromptEmbeds

        target = eps - x
        expected = 0.0
        for idx, source in ((t2i, None), (edit, batch.source_latents[edit])):
            cond = PromptEmbeds(batch.prompt_embeds[idx], batch.prompt_mask[idx]).trimmed()
            pred = objective.adapter.predict_velocity(transformer, z[idx], t[idx], cond,
                                                      source_latents=source)
            expected += torch.nn.functional.mse_loss(pred, target[idx]).item() * len(idx) / n
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(values) == {"loss_t2i", "loss_edit"}


def test_zero_weighted_pass_when_another_rank_has_the_task(world, tmp_path):
    """Under ZeRO-3 every rank must run the same forwards: a rank without edit rows runs one
    zero-weighted edit row when another rank has some, and its loss is unchanged."""
    objective = _objective(world, tmp_path, dropout=0.0)
    rows = _rows(world[1])
    t2i_only = {k: v[[i for i, t in enumerate(rows["task"]) if t == "t2i"]] for k, v in rows.items()}
    batch = objective.collate(t2i_only, torch.device("cpu"))
    transformer = _transformer(objective)
    alone = Recorder(transformer)
    loss_alone, _ = objective.loss(_state(), alone, batch)
    state = _state()
    state.any_across_ranks = lambda flags: [True, True]  # as if another rank had edit rows
    synced = Recorder(transformer)
    loss_synced, values = objective.loss(state, synced, batch)
    assert len(alone.calls) == 1 and len(synced.calls) == 2
    assert synced.calls[1]["hidden_states"].shape[0] == 1  # one dummy row with its source tokens
    assert loss_synced.item() == pytest.approx(loss_alone.item(), rel=1e-6)
    assert "loss_edit" not in values
    loss_synced.backward()  # the dummy pass is in the graph (its gradient is zero)


def test_caption_dropout_uses_unconditional_embeddings(world, tmp_path):
    objective = _objective(world, tmp_path, dropout=1.0)
    objective.setup(_state())
    batch = objective.collate(_rows(world[1]), torch.device("cpu"))
    n = len(batch)
    kept_e, kept_m = objective._conditions(batch, torch.zeros(n, dtype=torch.bool))
    assert torch.equal(kept_e, batch.prompt_embeds)
    embeds, mask = objective._conditions(batch, torch.ones(n, dtype=torch.bool))
    empty = objective.empty
    le = int(empty.mask.sum())
    for i, task in enumerate(batch.tasks):
        valid = int(mask[i].sum())
        if task == "t2i":
            assert valid == le
            assert torch.allclose(embeds[i, :le], empty.embeds[0, :le])
        else:
            ln = int(batch.negative_mask[i].sum())
            assert valid == ln
            assert torch.allclose(embeds[i, :ln], batch.negative_embeds[i, :ln])
        assert float(embeds[i, valid:].abs().sum()) == 0.0
    # Dropping half of the rows changes exactly those rows.
    drop = torch.arange(n) % 2 == 0
    mixed_e, _ = objective._conditions(batch, drop)
    length = batch.prompt_embeds.shape[1]
    for i in range(n):
        same = torch.allclose(mixed_e[i, :length], batch.prompt_embeds[i]) and \
            float(mixed_e[i, length:].abs().sum()) == 0.0
        assert same != bool(drop[i])


def test_logit_normal_timesteps():
    from trainer.objectives.flow_matching import TimestepConfig

    g = torch.Generator().manual_seed(1)
    t = sample_t(20000, TimestepConfig(), g)
    assert float(t.min()) > 0 and float(t.max()) < 1
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean())) < 0.05 and abs(float(logit.std()) - 1.0) < 0.05
    shifted = sample_t(20000, TimestepConfig(mean=1.0), g)
    assert float(shifted.median()) > 0.65  # sigmoid(1) = 0.73: more noise-heavy steps
    uniform = sample_t(20000, TimestepConfig(sampling="uniform"), g)
    assert abs(float(uniform.mean()) - 0.5) < 0.02


def test_local_run_lowers_loss_exports_and_resumes(world, tmp_path):
    """The one-process launcher (no Ray, no DeepSpeed): same loop, same objective."""
    from diffusers import QwenImagePipeline

    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    pipeline, shards = world
    raw = {
        "run": {"name": "fm-local", "runs_dir": str(tmp_path / "runs")},
        "launcher": "local", "device": "cpu", "deepspeed": {"enabled": False},
        "train": {"max_steps": 40, "batch_size": 8, "log_every": 5, "checkpoint_every": 20,
                  "progress": False},
        "data": {"uri": shards},
        "objective": {"name": "flow_matching", "init": {"from": "pretrained", "path": pipeline},
                      "optimizer": {"lr": 2e-3}},
    }
    result = launch(TrainConfig.model_validate(raw))
    assert result.metrics["step"] == 40
    records = read_metrics(result.run_uri)
    assert [r["step"] for r in records] == list(range(5, 41, 5))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < 0.7 * first, (first, last)
    assert all(r["grad_norm"] > 0 and r["samples_per_s"] > 0 for r in records)

    loaded = QwenImagePipeline.from_pretrained(result.final_uri)
    trained = loaded.transformer.state_dict()
    init = QwenImagePipeline.from_pretrained(pipeline).transformer.state_dict()
    assert trained.keys() == init.keys()
    assert any(not torch.equal(trained[k], init[k]) for k in trained)
    image = loaded(prompt="a red square", num_inference_steps=2, height=32, width=32,
                   output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()

    # Same run name, more steps: resumes from the step-40 checkpoint, keeps metrics in order.
    raw2 = copy.deepcopy(raw)
    raw2["train"]["max_steps"] = 50
    again = launch(TrainConfig.model_validate(raw2))
    assert again.metrics["step"] == 50 and again.metrics["resumed_from"] == 40
    assert [r["step"] for r in read_metrics(result.run_uri)] == list(range(5, 51, 5))


def test_device_cache_trains_exactly_as_decoding_each_batch(world, tmp_path, caplog):
    """``data.device_cache_mb``: rows decoded once and selected per step give the same run."""
    import logging

    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    pipeline, shards = world

    def run(name: str, cache_mb: float) -> list[dict]:
        raw = {
            "run": {"name": name, "runs_dir": str(tmp_path / "runs")},
            "launcher": "local", "device": "cpu", "deepspeed": {"enabled": False},
            "train": {"max_steps": 12, "batch_size": 8, "log_every": 1, "checkpoint_every": 100,
                      "progress": False, "export": False},
            "data": {"uri": shards, "device_cache_mb": cache_mb},
            "objective": {"name": "flow_matching", "init": {"from": "pretrained", "path": pipeline},
                          "optimizer": {"lr": 2e-3}, "caption_dropout": 0.3},
        }
        return read_metrics(launch(TrainConfig.model_validate(raw)).run_uri)

    with caplog.at_level(logging.INFO, logger="trainer.runtime.data"):
        cached = run("fm-cached", 512)
    assert "decoded once" in caplog.text
    decoded = run("fm-decoded", 0)
    assert len(cached) == len(decoded) == 12
    for a, b in zip(cached, decoded):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7), (a["step"], a["loss"], b["loss"])

    # Over the limit: a clear log line, and batches are decoded each step as before.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="trainer.runtime.data"):
        small = run("fm-over-limit", 1e-4)
    assert "over data.device_cache_mb" in caplog.text
    assert [r["loss"] for r in small] == pytest.approx([r["loss"] for r in decoded], rel=1e-5, abs=1e-7)
