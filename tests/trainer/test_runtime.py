"""The training runtime under Ray Train + DeepSpeed: a worker killed mid-run, S3 (moto) storage
with checkpoint and resume, plus the config checks that guard a launch."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

from fewstep import storage
from fewstep.config import ConfigError
from trainer.runtime.synthetic import ensure_tiny_world

REPO = Path(__file__).resolve().parents[2]
# DeepSpeed JIT-compiles its shared-memory op once; reuse the cache the Makefile points at.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return ensure_tiny_world(tmp_path_factory.getbasetemp() / "tiny-world")


def _raw(world, runs_dir: str, name: str, **train) -> dict:
    pipeline, shards = world
    return {
        "run": {"name": name, "runs_dir": runs_dir},
        "launcher": "ray",
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "deepspeed": {"enabled": True, "zero_stage": 2},
        "train": {"max_steps": 12, "batch_size": 4, "log_every": 2, "checkpoint_every": 4,
                  "progress": False, "max_failures": 1, **train},
        "data": {"uri": shards},
        "objective": {"name": "flow_matching", "init": {"from": "pretrained", "path": pipeline},
                      "optimizer": {"lr": 2e-3}},
    }


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_from_last_checkpoint(world, ray_cluster, tmp_path):
    from diffusers import QwenImagePipeline

    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    marker = tmp_path / "crashed.txt"
    raw = _raw(world, str(tmp_path / "runs"), "killed")
    raw["testing"] = {"crash_at_step": 6, "crash_rank": 1, "crash_marker": str(marker)}
    result = launch(TrainConfig.model_validate(raw))

    assert marker.exists(), "the fault was not injected"
    assert "rank 1 exited at step 6" in marker.read_text()
    assert result.metrics["step"] == 12
    assert result.metrics["resumed_from"] == 4  # the last checkpoint before the crash
    records = read_metrics(result.run_uri)
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]  # step 6 logged once, after resume
    assert records[-1]["loss"] < records[0]["loss"]
    checkpoints = Path(result.run_uri) / "checkpoints"
    assert (checkpoints / "step-00000012" / "position-rank1.json").exists()
    assert QwenImagePipeline.from_pretrained(result.final_uri).transformer is not None


@pytest.mark.slow
def test_s3_storage_checkpoints_and_resumes(world, ray_cluster, s3_bucket, s3_options, tmp_path):
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    # The shards live on S3 too: workers stream them through pyarrow's S3 filesystem.
    fs, path = storage.resolve(f"{s3_bucket}/shards", s3_options)
    fs.put(world[1].rstrip("/") + "/", path, recursive=True)
    raw = _raw((world[0], f"{s3_bucket}/shards"), f"{s3_bucket}/runs", "on-s3",
               max_steps=4, checkpoint_every=2, export=False)
    raw["deepspeed"]["zero_stage"] = 3
    # A category filter, pushed into the Ray Data read (every other T2I category + the edit rows).
    raw["data"]["categories"] = ["portrait", "text", "object"]
    first = launch(TrainConfig.model_validate(raw), options=s3_options)
    assert first.metrics["step"] == 4 and first.metrics["resumed_from"] == 0
    run = f"{s3_bucket}/runs/on-s3"
    saved = storage.list_files(storage.join(run, "checkpoints"), "position-rank1.json", s3_options)
    assert any("step-00000004" in uri for uri in saved), saved
    assert first.checkpoint_uri and first.checkpoint_uri.startswith("s3://")

    raw2 = copy.deepcopy(raw)
    raw2["train"].update(max_steps=6, export=True)
    second = launch(TrainConfig.model_validate(raw2), options=s3_options)
    assert second.metrics["step"] == 6 and second.metrics["resumed_from"] == 4
    assert [r["step"] for r in read_metrics(run, s3_options)] == [2, 4, 6]
    assert storage.exists(storage.join(run, "final", "transformer", "config.json"), s3_options)
    assert storage.exists(storage.join(run, "config.yaml"), s3_options)


def test_local_launcher_s3_folder_store(world, s3_bucket, s3_options):
    """The Ray-less launcher keeps its own checkpoints (s3 here), prunes old ones and resumes."""
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    raw = _raw(world, f"{s3_bucket}/runs", "local-s3", max_steps=4, checkpoint_every=2, log_every=1,
               keep_checkpoints=1, export=False, batch_size=8)
    raw.update(launcher="local", device="cpu")
    raw["deepspeed"]["enabled"] = False
    first = launch(TrainConfig.model_validate(raw), options=s3_options)
    assert first.metrics["step"] == 4
    root = f"{s3_bucket}/runs/local-s3/checkpoints"
    done = storage.list_files(root, "COMPLETE", s3_options)
    assert [u.rsplit("/", 2)[-2] for u in done] == ["step-00000004"]  # step 2 pruned
    raw["train"].update(max_steps=6)
    second = launch(TrainConfig.model_validate(raw), options=s3_options)
    assert second.metrics["resumed_from"] == 4 and second.metrics["step"] == 6
    assert [r["step"] for r in read_metrics(f"{s3_bucket}/runs/local-s3", s3_options)] == [1, 2, 3, 4, 5, 6]


def test_local_launcher_with_deepspeed_fp32_and_bf16(world, tmp_path):
    """One process with DeepSpeed (a process group of one), twice in the same process."""
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch

    for stage, precision in ((1, "fp32"), (2, "bf16")):
        raw = _raw(world, str(tmp_path), f"ds-{stage}-{precision}", max_steps=3, checkpoint_every=3,
                   log_every=3, batch_size=8, precision=precision)
        raw.update(launcher="local", device="cpu")
        raw["deepspeed"]["zero_stage"] = stage
        result = launch(TrainConfig.model_validate(raw))
        assert result.metrics["step"] == 3
        assert result.metrics["loss"] > 0 and result.metrics["grad_norm"] > 0
        # bf16 engines hold bf16 weights; the export is fp32 all the same.
        from safetensors.torch import load_file

        weights = load_file(next(Path(result.final_uri, "transformer").glob("*.safetensors")))
        assert {t.dtype for t in weights.values()} == {__import__("torch").float32}


def test_config_errors_name_the_field(world, tmp_path):
    from trainer.runtime.config import load_train_config

    def write(raw) -> Path:
        import yaml

        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    raw = _raw(world, str(tmp_path), "x")
    raw["objective"]["name"] = "no_such_objective"
    with pytest.raises(ConfigError, match="objective.name"):
        load_train_config(write(raw))
    raw = _raw(world, str(tmp_path), "x")
    raw["objective"]["caption_dropuot"] = 0.2
    with pytest.raises(ConfigError, match="caption_dropuot"):
        load_train_config(write(raw))
    raw = _raw(world, str(tmp_path), "x")
    raw["deepspeed"]["zero_stage"] = 4
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load_train_config(write(raw))
    raw = _raw(world, str(tmp_path), "x")
    raw["testing"] = {"crash_at_step": 3}
    with pytest.raises(ConfigError, match="crash_marker"):
        load_train_config(write(raw))
    raw = _raw(world, str(tmp_path), "x")
    raw["train"]["cpu_mmap_threshold_mb"] = 0
    with pytest.raises(ConfigError, match="train.cpu_mmap_threshold_mb.*greater than 0"):
        load_train_config(write(raw))
    raw["train"]["cpu_mmap_threshold_mb"] = "auto"
    assert load_train_config(write(raw)).train.cpu_mmap_threshold_mb == "auto"

    # The device cache: local launcher and objectives with selectable batches only, never ignored.
    raw = _raw(world, str(tmp_path), "x")
    raw["data"]["device_cache_mb"] = 512
    with pytest.raises(ConfigError, match="data.device_cache_mb: only the local launcher"):
        load_train_config(write(raw))
    raw["launcher"] = "local"
    assert load_train_config(write(raw)).data.device_cache_mb == 512
    raw["objective"] = {"name": "vae", "init": {"from": "pretrained", "path": world[0]}}
    assert load_train_config(write(raw)).data.device_cache_mb == 512  # ImageRows are selectable too
    raw["objective"] = {"name": "dmd", "guidance": {"teachers": [{"name": "base", "path": world[0]}]}}
    with pytest.raises(ConfigError, match="data.device_cache_mb: the dmd objective decodes every batch"):
        load_train_config(write(raw))


def test_data_errors_are_clear(world, tmp_path):
    from trainer.runtime.config import DataSection
    from trainer.runtime.data import LocalReader, open_source

    with pytest.raises(FileNotFoundError, match="data.uri: no manifest.json"):
        open_source(DataSection(uri=str(tmp_path)), "shards", None, None)
    with pytest.raises(ValueError, match="kind"):
        open_source(DataSection(uri=world[1]), "curated", None, None)
    source = open_source(DataSection(uri=world[1], categories=["no-such-category"]), "shards", None, None)
    with pytest.raises(ValueError, match=r"no rows left .*categories \('no-such-category',\)\); the data has \["):
        LocalReader(source, None)
    source = open_source(DataSection(uri=world[1], tasks=["edit"]), "shards", None, None)
    reader = LocalReader(source, None)
    rows = next(reader.batches(4, seed=0, epoch=0))
    assert set(rows["task"]) == {"edit"}
    # Ranks get disjoint, equal parts of an epoch.
    ids = [set(b["id"]) for r in range(2) for b in reader.batches(2, seed=0, epoch=0, rank=r, world_size=2)]
    assert sum(len(s) for s in ids) == len(set().union(*ids))


def test_a_launch_checks_its_data_and_models_before_making_a_run_folder(world, tmp_path):
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch

    no_data = _raw(world, str(tmp_path / "runs"), "no-data")
    no_data["data"]["uri"] = str(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="data.uri: no manifest.json"):
        launch(TrainConfig.model_validate(no_data))
    no_model = _raw(world, str(tmp_path / "runs"), "no-model")
    no_model["objective"]["init"]["path"] = str(tmp_path / "missing-teacher")
    with pytest.raises(ConfigError, match=r"objective.init.path: no pipeline at .*missing-teacher"):
        launch(TrainConfig.model_validate(no_model))
    assert not (tmp_path / "runs").exists()  # no run folder, and Ray was never started


def test_a_warmup_longer_than_the_run_is_reported(world, tmp_path, caplog):
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import _warn_about_schedules

    raw = _raw(world, str(tmp_path), "short")
    raw["objective"]["optimizer"]["warmup_steps"] = 500  # a preset's warm-up, on a 12-step run
    with caplog.at_level("WARNING", logger="trainer.runtime.launch"):
        _warn_about_schedules(TrainConfig.model_validate(raw))
    assert "objective.optimizer.warmup_steps 500 >= train.max_steps 12" in caplog.text


def test_one_process_stops_at_the_first_step_past_max_minutes(world, tmp_path):
    """A fixed-time job on one process stops right after its budget, not at the next log step."""
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch
    from trainer.runtime.metrics import read_metrics

    raw = _raw(world, str(tmp_path), "budget", max_steps=10_000, log_every=1000, checkpoint_every=1000,
               batch_size=4, max_minutes=0.02, export=False)  # 1.2 s of 10,000 steps
    raw.update(launcher="local", device="cpu")
    raw["deepspeed"]["enabled"] = False
    raw["testing"] = {"step_sleep_s": 0.2}
    result = launch(TrainConfig.model_validate(raw))
    assert 1 <= result.metrics["step"] < 100
    assert [r["step"] for r in read_metrics(str(tmp_path / "budget"))] == [result.metrics["step"]]


def test_a_restarted_worker_keeps_the_budget_the_run_was_launched_with(world, tmp_path):
    """Ray restarts a failed worker group with the launch's payload: the budget is the launch's
    deadline, not a fresh max_minutes, so a restart cannot stretch a fixed-time job."""
    import time

    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import _data_source, _launch_local, resolve_paths
    from trainer.runtime.loop import Payload
    from trainer.runtime.metrics import read_metrics

    raw = _raw(world, str(tmp_path), "late", max_steps=10_000, log_every=1000, checkpoint_every=1000,
               batch_size=4, max_minutes=60, export=False)
    raw.update(launcher="local", device="cpu")
    raw["deepspeed"]["enabled"] = False
    config = resolve_paths(TrainConfig.model_validate(raw))
    # As a worker group restarted 61 minutes into a 60-minute run sees it.
    payload = Payload(config=config.model_dump(mode="json"), run_uri=str(tmp_path / "late"),
                      storage=None, deadline=time.time() - 60)
    result = _launch_local(config, payload, _data_source(config, None))
    assert result.metrics["step"] == 1
    assert [r["step"] for r in read_metrics(str(tmp_path / "late"))] == [1]


def test_a_relaunch_resumes_records_what_changed_and_refuses_another_objective(world, tmp_path):
    """Launching a run name again resumes it; the run folder keeps what each launch changed, and
    checkpoints of one objective are never handed to another."""
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import CHECKPOINTS_NAME, launch
    from trainer.runtime.run_record import read_launches, record_launch

    raw = _raw(world, str(tmp_path), "again", max_steps=4, checkpoint_every=2, export=False)
    raw.update(launcher="local", device="cpu")
    raw["deepspeed"]["enabled"] = False
    launch(TrainConfig.model_validate(raw))
    longer = copy.deepcopy(raw)
    longer["train"]["max_steps"] = 6
    longer["objective"]["optimizer"]["lr"] = 1e-3
    result = launch(TrainConfig.model_validate(longer))
    assert result.metrics["resumed_from"] == 4 and result.metrics["step"] == 6

    run = str(tmp_path / "again")
    launches = read_launches(run)
    assert [entry["resumes"] for entry in launches] == [False, True]
    assert launches[1]["changed"] == {"train.max_steps": [4, 6], "objective.optimizer.lr": [2e-3, 1e-3]}

    other = TrainConfig.model_validate(longer).model_dump(mode="json")
    other["objective"] = {"name": "vae"}
    with pytest.raises(ConfigError, match=r"run.name: 'again' .* holds checkpoints of a 'flow_matching' run"):
        record_launch(other, run, storage.join(run, CHECKPOINTS_NAME), None)
    assert len(read_launches(run)) == 2  # the refused launch left the folder as it was


def test_zero3_trains_like_zero2_from_the_saved_weights(world, tmp_path):
    """Under ZeRO-3 the transformer is built partitioned (zero.Init), its saved tensors streamed in,
    and the fp32 master partitions alias the weights: training must match ZeRO-2 step for step."""
    import torch
    from safetensors.torch import load_file

    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import launch

    def weights(folder: Path) -> dict[str, torch.Tensor]:
        return load_file(next(folder.glob("*.safetensors")))

    # Saved weights that a fresh build from the config (same seed) cannot reproduce.
    import shutil

    from safetensors.torch import save_file

    pipeline = tmp_path / "pipeline"
    shutil.copytree(world[0], pipeline)
    file = next((pipeline / "transformer").glob("*.safetensors"))
    generator = torch.Generator().manual_seed(1)
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=generator, dtype=v.dtype)
               for k, v in load_file(file).items()}, file)

    exported, losses = {}, {}
    for stage in (2, 3):
        raw = _raw((str(pipeline), world[1]), str(tmp_path), f"zero{stage}", max_steps=3, checkpoint_every=3,
                   log_every=1, batch_size=8, shuffle_buffer=0)
        raw.update(launcher="local", device="cpu")
        raw["deepspeed"]["zero_stage"] = stage
        raw["objective"]["optimizer"] = {"lr": 1e-3}
        result = launch(TrainConfig.model_validate(raw))
        assert result.metrics["step"] == 3
        exported[stage] = weights(Path(result.final_uri) / "transformer")
        losses[stage] = [r["loss"] for r in __import__("trainer.runtime.metrics", fromlist=["x"]).read_metrics(
            result.run_uri)]

    initial = weights(pipeline / "transformer")
    assert exported[3].keys() == exported[2].keys() == initial.keys()
    assert losses[3] == pytest.approx(losses[2], rel=1e-4)
    moved = max((exported[2][k] - initial[k].float()).abs().max().item() for k in initial)
    assert moved > 1e-3  # the steps did train
    for name, tensor in exported[2].items():
        diff = (exported[3][name] - tensor).abs().max().item()
        assert diff < 1e-5, f"{name}: ZeRO-3 differs from ZeRO-2 by {diff}"


def test_launch_settings_that_would_fail_or_be_overridden_are_config_errors():
    from fewstep.config import ConfigError, parse_config
    from trainer.runtime.config import TrainConfig

    base = {"run": {"name": "r"}, "train": {"max_steps": 1, "batch_size": 1},
            "objective": {"name": "flow_matching"}}
    with pytest.raises(ConfigError, match="deepspeed.enabled: false runs one process only"):
        parse_config(TrainConfig, {**base, "deepspeed": {"enabled": False}, "scaling": {"num_workers": 2}})
    parse_config(TrainConfig, {**base, "deepspeed": {"enabled": False}, "scaling": {"num_workers": 1}})
    for extra, owner in (({"gradient_accumulation_steps": 2}, "train.batch_size"),
                         ({"zero_optimization": {"stage": 3}}, "deepspeed.zero_stage"),
                         ({"bf16": {"enabled": True}}, "train.precision")):
        with pytest.raises(ConfigError, match=f"deepspeed.config: .*{owner}"):
            parse_config(TrainConfig, {**base, "deepspeed": {"config": extra}})
    parse_config(TrainConfig, {**base, "deepspeed": {"config": {"zero_optimization": {"reduce_bucket_size": 1000}}}})


@pytest.mark.slow
def test_an_error_in_the_workers_reaches_the_user_as_one_clear_line(world, ray_cluster, tmp_path):
    from trainer.runtime.config import TrainConfig
    from trainer.runtime.launch import RunFailedError, launch

    # Each worker holds about half of the tiny world's 32 rows: a batch of 64 never fills.
    raw = _raw(world, str(tmp_path / "runs"), "too-big", batch_size=64, max_failures=0)
    with pytest.raises(RunFailedError, match=r"failed \(rank \d\): .*no batch") as caught:
        launch(TrainConfig.model_validate(raw))
    assert "\n" not in str(caught.value)
