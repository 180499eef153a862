"""Launchers: Ray Train (``TorchTrainer`` + DeepSpeed workers) or one local process, same loop.

``launch(config)`` writes ``<run>/config.yaml``, checks the data, starts the workers and
returns a :class:`RunResult`. The Ray launcher keeps checkpoints in Ray Train's storage
(``<run>/checkpoints``, local or s3://) and restarts the worker group from the latest one
when a worker dies (``train.max_failures``); a second launch of the same run name resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep import storage
from fewstep.config import ConfigError
from fewstep.settings import Settings, get_settings
from fewstep.storage import StorageOptions
from trainer.objectives.base import resolve_objective
from trainer.runtime.checkpoint import FolderStore, RayStore
from trainer.runtime.config import TrainConfig
from trainer.runtime.data import DataSource, EpochCache, LocalReader, open_source, ray_dataset
from trainer.runtime.loop import FINAL_NAME, Payload, run_worker
from trainer.runtime.metrics import MetricsFollower
from trainer.runtime.run_record import record_launch

log = logging.getLogger(__name__)

CHECKPOINTS_NAME = "checkpoints"


class RunFailedError(RuntimeError):
    """A run that failed in its workers; the message is the workers' own last error line."""

    @classmethod
    def from_ray(cls, run_uri: str, error: BaseException) -> RunFailedError:
        failures = getattr(error, "worker_failures", None) or {}
        causes = list(failures.items()) or [(None, error)]
        rank, cause = causes[0]
        lines = [line.strip() for line in str(cause).strip().splitlines() if line.strip()]
        where = f" (rank {rank})" if rank is not None else ""
        return cls(f"training run {run_uri} failed{where}: {lines[-1] if lines else type(cause).__name__}")


@dataclass
class RunResult:
    run_uri: str
    final_uri: str | None
    metrics: dict[str, Any]  # last reduced metrics (step, loss, ...)
    checkpoint_uri: str | None = None


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda requested but torch sees no GPU; use device: cpu or auto")
    return torch.device(name)


def _data_source(config: TrainConfig, options: StorageOptions | None) -> DataSource:
    cls = resolve_objective(config.objective_name())
    return open_source(config.data, cls.data_kind, cls.columns, options)


def _config_nodes(section: Any, where: str = "objective") -> Iterator[tuple[str, Any]]:
    """Every field of a config tree with its dotted path (sections, list items and leaves)."""
    from pydantic import BaseModel

    yield where, section
    if isinstance(section, BaseModel):
        for name in type(section).model_fields:
            yield from _config_nodes(getattr(section, name), f"{where}.{name}")
    elif isinstance(section, list | tuple):
        for index, item in enumerate(section):
            yield from _config_nodes(item, f"{where}.{index}")


def model_dirs(objective_config: Any) -> Iterator[tuple[str, str]]:
    """``(field, uri)`` of every pipeline directory an objective config will load: pretrained
    inits (and their ``vae``), teachers, DMD's ``init_from``."""
    from trainer.guidance import TeacherSpec
    from trainer.teachers.init import InitConfig

    for where, node in _config_nodes(objective_config):
        if isinstance(node, InitConfig) and node.source == "pretrained":
            yield from ((f"{where}.{k}", v) for k in ("path", "vae") if (v := getattr(node, k)))
        elif isinstance(node, TeacherSpec):
            yield f"{where}.path", node.path
        elif where.endswith(".init_from") and isinstance(node, str):
            yield where, node


def check_inputs(config: TrainConfig, run_uri: str, options: StorageOptions | None) -> DataSource:
    """What a launch needs, checked before a run folder or Ray exists: the dataset, every model
    directory, and a place for the run folder. Returns the opened dataset; raises ConfigError,
    FileNotFoundError or StorageError naming the field."""
    source = _data_source(config, options)
    check_model_dirs(config.objective_config(), options)
    storage.check_output_dir(run_uri, options, "run.runs_dir")
    _warn_about_schedules(config)
    return source


def _warn_about_schedules(config: TrainConfig) -> None:
    """A warm-up longer than the run never reaches the configured rate: say so before it runs."""
    from trainer.objectives.base import OptimizerConfig

    for where, node in _config_nodes(config.objective_config()):
        if isinstance(node, OptimizerConfig) and node.warmup_steps >= config.train.max_steps:
            log.warning("%s.warmup_steps %d >= train.max_steps %d: the run may end before its learning "
                        "rate reaches %.3g", where, node.warmup_steps, config.train.max_steps, node.lr)


def check_model_dirs(objective_config: Any, options: StorageOptions | None) -> None:
    for field, uri in model_dirs(objective_config):
        index = storage.join(uri, "model_index.json")
        if not storage.check_reachable(index, options, field):
            raise ConfigError(f"{field}: no pipeline at {uri} (no model_index.json there); give a "
                              "diffusers pipeline directory, e.g. assets/teachers/base")


def resolve_paths(config: TrainConfig) -> TrainConfig:
    """Validate the objective section and make paths absolute on the driver.

    Workers may run in another working directory; the objective's validators normalise its
    paths, so the payload carries the validated, dumped objective config.
    """
    objective = config.objective_config()
    body = {"name": config.objective_name(), **objective.model_dump(mode="json", by_alias=True)}
    data = config.data
    if data.uri:
        roots = [storage.normalize(u) for u in data.uris]
        data = data.model_copy(update={"uri": roots[0] if isinstance(data.uri, str) else roots})
    return config.model_copy(update={"objective": body, "data": data})


def launch(config: TrainConfig, settings: Settings | None = None,
           options: StorageOptions | None = None) -> RunResult:
    """Run training as the config says. ``options``: S3 connection (default: from settings)."""
    settings = settings or get_settings()
    options = options if options is not None else settings.storage_options()
    config = resolve_paths(config)
    run_uri = config.run_uri(settings.runs_dir)
    source = check_inputs(config, run_uri, options)
    record_launch(config.model_dump(mode="json"), run_uri, storage.join(run_uri, CHECKPOINTS_NAME), options)
    ext_dir = str(settings.torch_extensions_dir) if settings.torch_extensions_dir else \
        os.environ.get("TORCH_EXTENSIONS_DIR")
    max_minutes = config.train.max_minutes
    payload = Payload(config=config.model_dump(mode="json"), run_uri=run_uri, storage=options,
                      torch_extensions_dir=ext_dir,
                      deadline=time.time() + max_minutes * 60 if max_minutes else None)
    log.info("run %s: %s launcher, objective %s, %d steps", run_uri, config.launcher,
             config.objective_name(), config.train.max_steps)
    if config.launcher == "local":
        return _launch_local(config, payload, source)
    return _launch_ray(config, payload, settings, source)


# ---------------------------------------------------------------------------------------------
# Local: one process, no Ray (DeepSpeed optional)
# ---------------------------------------------------------------------------------------------


class LocalContext:
    def __init__(self, config: TrainConfig, payload: Payload, device: torch.device, source: DataSource):
        self.rank, self.world_size, self.device = 0, 1, device
        self.config = config
        self.reader = LocalReader(source, payload.storage)
        self.store = FolderStore(storage.join(payload.run_uri, CHECKPOINTS_NAME), payload.storage,
                                 config.train.keep_checkpoints, Path(tempfile.gettempdir()))

        self.decoded: Any = None

    def preload(self, collate: Callable[[dict[str, np.ndarray]], Any]) -> None:
        """``data.device_cache_mb``: decode every row once; batches are then selected from it."""
        if self.config.data.device_cache_mb > 0:
            self.decoded = self.reader.collate_all(collate, self.config.data.device_cache_mb)

    def epoch_batches(self, epoch: int) -> Iterator[Any]:
        train = self.config.train
        if self.decoded is not None:
            indices = self.reader.epoch_indices(train.batch_size, train.seed, epoch,
                                                shuffle=train.shuffle_buffer > 0)
            return (self.decoded.select(index) for index in indices)
        return self.reader.batches(train.batch_size, train.seed, epoch, shuffle=train.shuffle_buffer > 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_local(config: TrainConfig, payload: Payload, source: DataSource) -> RunResult:
    if payload.torch_extensions_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = payload.torch_extensions_dir
    device = _pick_device(config.device)
    if config.deepspeed.enabled and not torch.distributed.is_initialized():
        # DeepSpeed needs a process group, even of one. It stays for the life of the process:
        # DeepSpeed caches its groups, so a second run in the same process must reuse it.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for key in ("RANK", "LOCAL_RANK"):
            os.environ.setdefault(key, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        torch.distributed.init_process_group(
            backend="nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    ctx = LocalContext(config, payload, device, source)
    metrics = run_worker(payload, ctx)
    return RunResult(run_uri=payload.run_uri, final_uri=metrics.get("final_uri"), metrics=metrics,
                     checkpoint_uri=storage.join(payload.run_uri, CHECKPOINTS_NAME))


# ---------------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------------


class RayContext:
    def __init__(self, config: TrainConfig):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.config = config
        self.shard = ray.train.get_dataset_shard("train")
        self.store = RayStore()
        train = config.train
        self.cache = EpochCache(config.data.cache_mb, train.batch_size, train.seed, self.rank,
                                self.world_size, self.device)

    def preload(self, collate: Callable[[dict[str, np.ndarray]], Any]) -> None:
        """Ray workers stream their part; ``data.cache_mb`` keeps it in memory after one epoch."""

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        train = self.config.train
        if self.cache.ready:
            return self.cache.batches(epoch, shuffle=train.shuffle_buffer > 0)
        buffer = train.shuffle_buffer if train.shuffle_buffer > 0 else None
        stream = iter(self.shard.iter_batches(
            batch_size=train.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=(train.seed * 1000 + epoch) * 1000 + self.rank if buffer else None))
        return self.cache.collect(stream)


def ray_worker_main(payload_dict: dict[str, Any]) -> None:
    """Entry point of every Ray Train worker (module level so workers can import it)."""
    payload = Payload(**payload_dict)
    if isinstance(payload.storage, dict):  # dataclasses.asdict flattened it for the trip
        payload.storage = StorageOptions(**payload.storage)
    if payload.torch_extensions_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = payload.torch_extensions_dir
    # The driver shows progress (MetricsFollower); a bar in a worker's log file is noise.
    payload.config = {**payload.config, "train": {**payload.config["train"], "progress": False}}
    config = TrainConfig.model_validate(payload.config)
    if not config.scaling.use_gpu:
        torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_worker(payload, RayContext(config))


def _launch_ray(config: TrainConfig, payload: Payload, settings: Settings, source: DataSource) -> RunResult:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from fewstep.raysession import ray_init

    ray_init(settings.ray_address, settings.ray_num_cpus)
    dataset = ray_dataset(source, payload.storage,
                          shuffle_seed=config.train.seed if config.train.shuffle_buffer > 0 else None)
    fs, path = storage.pyarrow_filesystem(payload.run_uri, payload.storage)
    scaling = config.scaling
    trainer = TorchTrainer(
        ray_worker_main,
        train_loop_config=dataclasses.asdict(payload),
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}),
        run_config=RunConfig(
            name=CHECKPOINTS_NAME, storage_path=path, storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=config.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=config.train.keep_checkpoints)),
        datasets={"train": dataset},
    )
    follower = contextlib.nullcontext()
    if config.train.progress:
        follower = MetricsFollower(payload.run_uri, payload.storage, config.train.max_steps,
                                   f"{config.objective_name()} ({scaling.num_workers} Ray workers)",
                                   keys=resolve_objective(config.objective_name()).progress_keys)
    from ray.train import TrainingFailedError

    try:
        with follower:
            result = trainer.fit()
    except TrainingFailedError as exc:  # Ray Train 2.x raises a worker's error instead of returning it
        raise RunFailedError.from_ray(payload.run_uri, exc) from exc
    if result.error is not None:
        raise RunFailedError.from_ray(payload.run_uri, result.error) from result.error
    metrics = dict(result.metrics or {})
    final_uri = storage.join(payload.run_uri, FINAL_NAME)
    has_final = config.train.export and storage.exists(final_uri, payload.storage)
    checkpoint_uri = None
    if result.checkpoint is not None:
        checkpoint_uri = result.checkpoint.path
        if storage.is_s3(payload.run_uri):
            checkpoint_uri = f"s3://{checkpoint_uri}"
    return RunResult(run_uri=payload.run_uri, final_uri=final_uri if has_final else None,
                     metrics=metrics, checkpoint_uri=checkpoint_uri)
