"""The training loop: one for every objective and both launchers (Ray Train worker or local).

``run_worker`` builds the objective's models, wraps the trainable ones, restores the latest
checkpoint, streams batches, calls ``objective.train_step`` until ``train.max_steps``,
logs metrics, checkpoints every ``train.checkpoint_every`` steps and exports at the end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from fewstep import storage
from fewstep.storage import StorageOptions
from trainer.objectives.base import ObjectiveEnv, TrainState, resolve_objective
from trainer.runtime.checkpoint import Position, read_checkpoint, write_checkpoint
from trainer.runtime.collectives import gather_objects
from trainer.runtime.config import TrainConfig
from trainer.runtime.engines import all_gathered, build_handles, compute_dtype
from trainer.runtime.metrics import MetricsLog, Progress

log = logging.getLogger(__name__)

FINAL_NAME = "final"


@dataclass
class Payload:
    """Everything a worker needs; plain data so it pickles to Ray workers."""

    config: dict[str, Any]
    run_uri: str
    storage: StorageOptions | None
    torch_extensions_dir: str | None = None
    # train.max_minutes as a wall-clock time (time.time()) fixed at launch, so a worker group that
    # Ray restarts after a failure keeps the run's budget instead of starting a fresh one.
    deadline: float | None = None


class WorkerContext(Protocol):
    rank: int
    world_size: int
    device: torch.device
    store: Any  # RayStore | FolderStore

    def preload(self, collate: Callable[[dict[str, np.ndarray]], Any]) -> None: ...

    def epoch_batches(self, epoch: int) -> Iterator[Any]: ...


# Reduced with max over ranks (the worst worker is what runs out of memory), not the mean.
MAX_KEYS = ("peak_mem_mb", "mem_before_models_mb")


def _reduce_metrics(values: dict[str, float], world_size: int) -> dict[str, float]:
    """Mean of each metric over the ranks that reported it (ranks may report different keys)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return values
    gathered = gather_objects(values, world_size)
    keys = sorted({k for g in gathered for k in g})
    out = {}
    for key in keys:
        items = [g[key] for g in gathered if key in g and g[key] is not None]
        if key in MAX_KEYS:
            out[key] = float(max(items)) if items else float("nan")
        else:
            out[key] = float(sum(items) / len(items)) if items else float("nan")
    return out


def _rss_mb() -> float:
    """Resident memory of this process now (Linux), in MiB."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return float("nan")


def _mmap_threshold_mb(config: TrainConfig) -> float | None:
    value = config.train.cpu_mmap_threshold_mb
    if value == "auto":
        return 1.0 if config.deepspeed.enabled and config.deepspeed.zero_stage == 3 else None
    return value


def _return_freed_memory(threshold_mb: float | None) -> bool:
    """Fix glibc's mmap threshold (and so switch off its growth) for this process's allocations."""
    if threshold_mb is None:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's mallopt parameter numbers
        size = int(threshold_mb * 2**20)
        return bool(libc.mallopt(m_mmap_threshold, size)) and bool(libc.mallopt(m_trim_threshold, size))
    except (OSError, AttributeError):  # not glibc (musl, macOS): leave the allocator alone
        return False


def _peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this worker: GPU allocations on CUDA, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _barrier(world_size: int) -> None:
    if world_size > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _autocast_factory(config: TrainConfig, device: torch.device):
    if config.train.precision == "bf16" and not config.deepspeed.enabled:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _crash_hook(config: TrainConfig, rank: int, step: int) -> None:
    """Fault injection for tests: one worker process dies once, abruptly, at a given step."""
    testing = config.testing
    if testing.crash_at_step != step or testing.crash_rank != rank or not testing.crash_marker:
        return
    marker = Path(testing.crash_marker)
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"rank {rank} exited at step {step} (pid {os.getpid()})\n")
    log.warning("testing.crash_at_step: rank %d exits at step %d in %.0f s", rank, step,
                testing.crash_delay_s)
    time.sleep(testing.crash_delay_s)
    os._exit(1)


def _export(objective, state: TrainState, handles: dict, payload: Payload, work_dir: Path) -> str:
    final_uri = storage.join(payload.run_uri, FINAL_NAME)
    with all_gathered(handles):
        if state.rank == 0:
            out = work_dir / FINAL_NAME
            if out.exists():
                shutil.rmtree(out)
            objective.export(state, out)
            if out.exists():
                storage.publish_dir(out, final_uri, payload.storage)
                log.info("exported %s", final_uri)
    _barrier(state.world_size)
    return final_uri


def run_worker(payload: Payload, ctx: WorkerContext) -> dict[str, Any]:
    """The loop. Returns the last reduced metrics (every rank returns the same)."""
    config = TrainConfig.model_validate(payload.config)
    train = config.train
    rank, world, device = ctx.rank, ctx.world_size, ctx.device
    torch.manual_seed(train.seed * 7919 + rank)
    work_dir = Path(tempfile.mkdtemp(prefix=f"fewstep-rank{rank}-"))
    try:
        return _run(config, payload, ctx, rank, world, device, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _run(config: TrainConfig, payload: Payload, ctx: WorkerContext, rank: int, world: int,
         device: torch.device, work_dir: Path) -> dict[str, Any]:
    train = config.train
    objective_cls = resolve_objective(config.objective_name())
    env = ObjectiveEnv(rank=rank, world_size=world, device=device, storage=payload.storage,
                       run_uri=payload.run_uri, data_uri=config.data.primary_uri,
                       data_uris=tuple(config.data.uris), work_dir=work_dir,
                       data_tasks=tuple(config.data.tasks) if config.data.tasks else None,
                       data_categories=tuple(config.data.categories) if config.data.categories else None)
    if device.type == "cpu":
        _return_freed_memory(_mmap_threshold_mb(config))
    # Before the objective loads anything: the worker's own footprint (Python, torch, Ray).
    mem_before_models = _rss_mb() if device.type != "cuda" else torch.cuda.memory_allocated(device) / 2**20
    objective = objective_cls(config.objective_config(), env)
    handles = build_handles(objective.model_specs(), config, device, world)
    generator = torch.Generator().manual_seed(train.seed * 1_000_003 + rank)
    state = TrainState(step=0, max_steps=train.max_steps, rank=rank, world_size=world, device=device,
                       compute_dtype=compute_dtype(config), models=handles, generator=generator,
                       autocast=_autocast_factory(config, device))
    objective.setup(state)
    if objective.selectable_batches:
        ctx.preload(lambda rows: objective.collate(rows, device))

    position = Position()
    with ctx.store.latest() as ckpt_dir:
        if ckpt_dir is not None:
            position, objective_state, rank_state = read_checkpoint(ckpt_dir, rank=rank, handles=handles,
                                                                    generator=generator)
            objective.load_state_dict(objective_state)
            objective.load_rank_state_dict(rank_state)
            log.info("rank %d resumed from step %d (%s)", rank, position.step, ckpt_dir)
    state.step = position.step
    start_step = position.step

    metrics_log = MetricsLog(payload.run_uri, payload.storage, work_dir, position.step) if rank == 0 else None
    progress = Progress(train.progress and rank == 0, train.max_steps, position.step,
                        f"{objective.describe()} (rank 0 of {world})", objective_cls.progress_keys)

    if start_step == 0:
        _log_initial(objective.initial_metrics(state), world, metrics_log, progress)

    stream = _batch_stream(ctx, position)
    state.next_batch = lambda: objective.collate(next(stream), device)
    window: dict[str, list[float]] = {}
    window_start, window_steps = time.monotonic(), 0
    last: dict[str, Any] = {"step": position.step}
    deadline = _monotonic_deadline(payload.deadline)
    try:
        while state.step < train.max_steps:
            rows = next(stream)
            batch = objective.collate(rows, device)
            values = objective.train_step(state, batch)
            state.step += 1
            position.step = state.step
            window_steps += 1
            for key, value in values.items():
                window.setdefault(key, []).append(float(value))
            if config.testing.step_sleep_s:
                time.sleep(config.testing.step_sleep_s)
            _crash_hook(config, rank, state.step)

            is_log = (state.step % train.log_every == 0 or state.step == train.max_steps
                      or objective.log_due(state))
            # One process may stop at any step; several agree only at log steps (one all-reduce).
            is_log = is_log or (world == 1 and deadline is not None and time.monotonic() > deadline)
            is_ckpt = state.step % train.checkpoint_every == 0 or state.step == train.max_steps
            if not (is_log or is_ckpt):
                continue
            elapsed = max(time.monotonic() - window_start, 1e-9)
            local = window_values(window, objective_cls.snapshot_prefixes)
            local["samples_per_s"] = window_steps * train.batch_size / elapsed
            local["peak_mem_mb"] = _peak_mem_mb(device)
            local["mem_before_models_mb"] = mem_before_models
            if deadline is not None:
                local["time_up"] = float(time.monotonic() > deadline)
            reduced = _reduce_metrics(local, world)
            # Any rank past the budget stops every rank at this same step.
            time_up = reduced.pop("time_up", 0.0) > 0
            is_ckpt = is_ckpt or time_up
            if time_up:  # every rank agrees, so collective checks of the final model are safe
                reduced.update(_reduce_metrics(objective.closing_metrics(state), world))
            reduced["samples_per_s"] *= world  # every rank saw its own batches
            reduced["steps_per_s"] = window_steps / elapsed
            last = {"step": state.step, "epoch": position.epoch, "time": time.time(),
                    "resumed_from": start_step, **reduced}
            progress.update(window_steps, reduced)
            window, window_start, window_steps = {}, time.monotonic(), 0
            if metrics_log is not None:
                metrics_log.write(last)
            ckpt_dir = None
            if is_ckpt:
                ckpt_dir = work_dir / f"ckpt-{state.step:08d}"
                write_checkpoint(ckpt_dir, rank=rank, handles=handles,
                                 objective_state=objective.state_dict(), position=position,
                                 generator=generator, rank_state=objective.rank_state_dict())
                if metrics_log is not None:
                    metrics_log.flush()
            ctx.store.report(_finite(last), ckpt_dir, state.step)
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            if time_up:
                log.info("train.max_minutes reached at step %d of %d: stopping", state.step,
                         train.max_steps)
                break
    finally:
        progress.close()
        if metrics_log is not None:
            metrics_log.close()

    objective.finalize(state)
    if train.export:
        last["final_uri"] = _export(objective, state, handles, payload, work_dir)
    return last


def _monotonic_deadline(wall_deadline: float | None) -> float | None:
    """The launch's wall-clock deadline on this process's monotonic clock (immune to clock steps)."""
    if wall_deadline is None:
        return None
    return time.monotonic() + (wall_deadline - time.time())


def window_values(window: dict[str, list[float]], snapshot_prefixes: tuple[str, ...]) -> dict[str, float]:
    """One log record from a window of steps: means, except point-in-time checks (their latest)."""
    return {k: float(v[-1]) if k.startswith(snapshot_prefixes) else float(np.mean(v))
            for k, v in window.items()}


def _log_initial(initial: dict[str, float], world: int, metrics_log: MetricsLog | None,
                 progress: Progress) -> None:
    """The model before its first update (a ``step: 0`` record), kept apart from step 1's window."""
    if not initial:  # the same on every rank: it depends on the config only
        return
    record = {"step": 0, "epoch": 0, "time": time.time(), "resumed_from": 0,
              **_reduce_metrics({k: float(v) for k, v in initial.items()}, world)}
    progress.update(0, record)
    if metrics_log is not None:
        metrics_log.write(record)


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items()
            if not (isinstance(v, float) and not math.isfinite(v))}


def _batch_stream(ctx: WorkerContext, position: Position) -> Iterator[Any]:
    """Endless batches, epoch after epoch, starting where ``position`` says; keeps it current.

    On resume the consumed batches of the current epoch are skipped. Under Ray the order
    within an epoch is not bit-identical across runs, so resume restores *how much* data was
    seen, not which rows exactly.
    """
    first = True
    while True:
        skip = position.batch_in_epoch if first else 0
        seen = 0
        for index, rows in enumerate(ctx.epoch_batches(position.epoch)):
            seen += 1
            if index < skip:
                continue
            position.batch_in_epoch = index + 1
            position.samples += _row_count(rows)
            yield rows
        if seen == 0:
            raise ValueError(
                "data: an epoch yielded no batch: each worker needs at least train.batch_size rows "
                "(lower train.batch_size or scaling.num_workers, or add data)")
        first = False
        position.epoch += 1
        position.batch_in_epoch = 0


def _row_count(rows: Any) -> int:
    """Rows of a columnar batch, or of an already collated one (the local device cache)."""
    if isinstance(rows, dict):
        return len(next(iter(rows.values()))) if rows else 0
    return len(rows)
