"""The run config shared by every training command (``train-teacher``, ``distill``).

One YAML file describes a run: where it goes (``run``), how it is launched (``launcher``,
``scaling``, ``deepspeed``), the loop (``train``), the data (``data``) and the objective
(``objective``: validated against the chosen objective's own ``Config``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from fewstep.config import ConfigError, StrictModel, load_config, parse_config
from fewstep.storage import join, normalize


class RunSection(StrictModel):
    name: str = Field(..., description="Run name: the run folder is <runs_dir>/<name>.")
    runs_dir: str | None = Field(
        None, description="Local path or s3:// URI holding run folders (default: FEWSTEP_RUNS_DIR).")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or "/" in value or value.startswith("."):
            raise ValueError("run.name must be a plain folder name (no '/', not starting with '.')")
        return value


class ScalingSection(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process each).")
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False


class DeepSpeedSection(StrictModel):
    enabled: bool = Field(True, description="Wrap trainable models in DeepSpeed engines.")
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage 0-3.")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload of optimiser states to CPU (builds DeepSpeed's cpu_adam).")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Extra DeepSpeed config keys merged over the generated ones.")


class TrainSection(StrictModel):
    max_steps: int = Field(..., ge=1, description="Iterations to run; a resumed run stops at the same count.")
    batch_size: int = Field(..., ge=1, description="Rows per worker per iteration.")
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = Field(10, ge=1, description="Metrics line + ray.train.report every N steps.")
    checkpoint_every: int = Field(100, ge=1, description="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="Worker-group restarts Ray Train may do.")
    max_minutes: float | None = Field(
        None, gt=0, description="Wall-clock budget from the launch (model loading and worker restarts "
        "count): one process stops at the first step past it, "
        "several ranks at the first log step past it (they agree); checkpoint and export as at "
        "max_steps. For fixed-time jobs on lent machines.")
    shuffle_buffer: int = Field(256, ge=0, description="Local shuffle buffer (rows); 0: no shuffle.")
    cpu_mmap_threshold_mb: Annotated[float, Field(gt=0)] | Literal["auto"] | None = Field(
        "auto", description="CPU workers (glibc): blocks of at least this many MiB are mapped on "
        "their own and given back to the OS when freed. glibc's default raises this threshold as "
        "large blocks are freed and then keeps them, so ZeRO-3's gather/free cycles stay resident "
        "and ZeRO-3 saves no memory. It costs speed (fresh pages for every large block: the tiny "
        "teacher trains at ~0.6x with 1 MiB). auto: 1 MiB under ZeRO-3, else off; null: off.")
    export: bool = Field(True, description="Write <run>/final (a diffusers pipeline directory).")
    progress: bool = Field(True, description="Progress bar on rank 0.")


class DataSection(StrictModel):
    uri: str | list[str] | None = Field(
        None, description="Dataset root (local or s3://) with manifest.json: precomputed shards or curated. "
                          "A list trains on the union of several roots of one kind, e.g. two corpora "
                          "precomputed separately with the same teacher (checked when the run starts).")
    tasks: list[Literal["t2i", "edit"]] | None = Field(None, description="Keep only these tasks.")
    categories: list[str] | None = Field(None, description="Keep only these categories.")
    cache_mb: float = Field(
        1024, ge=0, description="Ray launcher: after the first epoch, keep each worker's part in memory "
                                "if it fits in this many MiB (later epochs skip Ray Data); 0 streams always.")
    device_cache_mb: float = Field(
        0, ge=0, description="Local launcher: decode the whole dataset once with the objective's collate "
                             "and keep it on the training device if it fits in this many MiB; each step "
                             "then selects its rows there instead of decoding them on the host (~30 us "
                             "per row on a small CPU, time a GPU step waits for); 0 decodes every "
                             "batch. Local launcher and objectives that support it (flow_matching, vae) only: "
                             "elsewhere a config error, never silently ignored.")

    @field_validator("uri")
    @classmethod
    def _one_or_more_roots(cls, value: str | list[str] | None) -> str | list[str] | None:
        if not isinstance(value, list):
            return value
        if not value:
            raise ValueError("an empty list: give one dataset root, or several to train on their union")
        repeated = sorted({u for u in value if value.count(u) > 1})
        if repeated:
            raise ValueError(f"{repeated} listed more than once: list each dataset root once")
        return value[0] if len(value) == 1 else value

    @property
    def uris(self) -> list[str]:
        """The dataset roots, one or several (empty when unset)."""
        if self.uri is None:
            return []
        return [self.uri] if isinstance(self.uri, str) else list(self.uri)

    @property
    def primary_uri(self) -> str | None:
        """The first root: where objectives read dataset-wide files (the empty-prompt embedding);
        every other root is checked to match it when the run starts."""
        return self.uris[0] if self.uris else None


class TestingSection(StrictModel):
    """Fault injection for tests: rank ``crash_rank`` exits once at ``crash_at_step``."""

    crash_at_step: int | None = None
    crash_rank: int = 1
    crash_marker: str | None = Field(
        None, description="Local file created at the crash, so the crash happens only once.")
    crash_delay_s: float = Field(
        6.0, ge=0, description="The crashing worker waits this long first: Ray Train's controller "
                               "registers reported checkpoints when it polls (every 2 s), so a worker that "
                               "dies right after a report can lose that checkpoint.")
    step_sleep_s: float = Field(0.0, ge=0, description="Sleep per step (to make runs observable).")


class TrainConfig(StrictModel):
    run: RunSection
    launcher: Literal["ray", "local"] = Field(
        "ray", description="ray: Ray Train TorchTrainer; local: one process, no Ray.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device of the local launcher (Ray workers use GPUs if scaling.use_gpu).")
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection)
    train: TrainSection
    data: DataSection = Field(default_factory=DataSection)
    objective: dict[str, Any] = Field(..., description="name: <objective> plus that objective's keys.")
    testing: TestingSection = Field(default_factory=TestingSection)

    @model_validator(mode="after")
    def _launch_that_runs(self) -> TrainConfig:
        if self.launcher == "ray" and not self.deepspeed.enabled and self.scaling.num_workers > 1:
            # torch DDP cannot run the objectives' several forward passes (T2I, edit) before one backward.
            raise ValueError("deepspeed.enabled: false runs one process only; for data parallel use "
                             "deepspeed.enabled: true with deepspeed.zero_stage: 0, or scaling.num_workers: 1")
        owned = {"train_micro_batch_size_per_gpu": "train.batch_size", "train_batch_size": "train.batch_size",
                 "gradient_accumulation_steps": "train.batch_size", "zero_optimization.stage": "deepspeed.zero_stage",
                 "bf16": "train.precision", "fp16": "train.precision"}
        given = set(self.deepspeed.config)
        zero = self.deepspeed.config.get("zero_optimization")
        if isinstance(zero, dict) and "stage" in zero:
            given.add("zero_optimization.stage")  # ZeRO's other knobs (buckets, persistence) stay free
        taken = sorted(given & set(owned))
        if taken:
            raise ValueError(f"deepspeed.config: {taken} are set by the runtime from "
                             f"{sorted({owned[k] for k in taken})}; set those instead (an override here would "
                             "change what the run does behind the metrics' back)")
        return self

    def objective_name(self) -> str:
        return str(self.objective.get("name", ""))

    def objective_config(self) -> StrictModel:
        """The ``objective`` section validated against the objective's ``Config``."""
        from trainer.objectives.base import resolve_objective

        name = self.objective_name()
        if not name:
            raise ConfigError("objective.name: required: add the objective name (e.g. flow_matching)")
        try:
            cls = resolve_objective(name)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        body = {k: v for k, v in self.objective.items() if k != "name"}
        return parse_config(cls.Config, body, "objective")

    def run_uri(self, default_runs_dir: str | Path) -> str:
        return join(normalize(self.run.runs_dir or str(default_runs_dir)), self.run.name)


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Load and fully validate a run config, objective section included."""
    config = load_config(TrainConfig, path, overrides)
    try:
        config.objective_config()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if config.testing.crash_at_step is not None and config.testing.crash_marker is None:
        raise ConfigError(f"{path}: testing.crash_marker: required with testing.crash_at_step")
    _check_device_cache(config, path)
    return config


def _check_device_cache(config: TrainConfig, path: str | Path) -> None:
    """``data.device_cache_mb`` would otherwise be ignored without a word."""
    if config.data.device_cache_mb <= 0:
        return
    if config.launcher != "local":
        raise ConfigError(f"{path}: data.device_cache_mb: only the local launcher decodes the dataset "
                          "once; with launcher: ray use data.cache_mb (each worker keeps its part in "
                          "memory after one epoch) and set data.device_cache_mb: 0")
    from trainer.objectives.base import resolve_objective

    if not resolve_objective(config.objective_name()).selectable_batches:
        raise ConfigError(f"{path}: data.device_cache_mb: the {config.objective_name()} objective "
                          "decodes every batch itself; set data.device_cache_mb: 0")
