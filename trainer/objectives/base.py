"""The objective plug-in interface: what an objective gives the runtime, and what it gets back.

There is one training loop (``trainer/runtime/loop.py``). An objective is a small class, one
file each, that tells the loop *which models* a job needs and *what one training step does*.
The loop owns everything else: processes (Ray Train workers or one local process), DeepSpeed,
data streaming, checkpoints, resume, metrics, progress and export timing.

Life of an objective inside one worker process::

    obj = ObjectiveCls(config, env)            # config: ObjectiveCls.Config (a StrictModel)
    specs = obj.model_specs()                  # list[ModelSpec]: every model of the job
    # runtime builds each spec, wraps trainables (DeepSpeed engine or torch AdamW),
    # puts frozen ones on the device in eval mode without grads
    obj.setup(state)                           # state.models is ready: load side inputs
    # resume: runtime restores engines + optimisers, then obj.load_state_dict(...)
    while state.step < max_steps:
        batch = obj.collate(rows, state.device)    # rows: dict[str, np.ndarray] (columnar)
        metrics = obj.train_step(state, batch)     # the objective decides who steps when
        state.step += 1                            # the runtime counts iterations
    obj.finalize(state)                        # every rank (collectives allowed)
    obj.export(state, out_dir)                 # rank 0, with trainables gathered (ZeRO-3)

Several models per job
    ``model_specs`` returns any number of :class:`ModelSpec`. Each trainable spec gets its
    own optimiser (AdamW, its own ``lr``/betas/weight decay/clipping) and, with DeepSpeed,
    its own engine; all engines share the ZeRO stage and precision of the run. Frozen specs
    (teachers) are not wrapped: they are moved to the device in the run's compute dtype.
    DMD, for example: ``student`` (trainable, lr 2e-6), ``fake_score`` (trainable, lr 4e-6),
    ``teacher_base`` and ``teacher_text`` (frozen).

Who steps when
    ``train_step`` is one *iteration* of the run (``train.max_steps`` counts them). Inside it
    the objective calls, in any order and as often as it likes, on ``state.models[name]``:
    ``handle.net(...)`` (forward through the engine), ``handle.backward(loss)``,
    ``handle.step()`` (optimiser step + zero grad; returns ``{"grad_norm", "lr"}``) and
    ``handle.zero_grad()``. DMD updates the fake score N times, then the student once, per
    iteration. Every rank must make the same sequence of backward/step calls (they are
    collective under DeepSpeed) and, under ZeRO-3, the same forward calls on trainable models
    too (parameters are gathered per forward): when a pass depends on the local batch (say,
    only some ranks have edit rows), agree with ``state.any_across_ranks`` and run a
    zero-weighted pass on ranks that lack the rows. Extra batches inside one iteration:
    ``state.next_batch()``.

Numbers
    ``train_step`` returns a flat ``dict[str, float]`` (losses, grad norms, anything). The
    runtime averages them over ranks, adds ``step``, ``samples_per_s`` and ``lr``, writes
    ``metrics.jsonl``, calls ``ray.train.report`` and feeds the progress bar.

Precision
    Run forward passes inside ``with state.autocast():`` and cast float inputs with
    ``state.cast(tensor)``: under DeepSpeed bf16 the parameters are bf16 (cast does it,
    autocast is a no-op); in the local launcher bf16 means fp32 weights + torch autocast
    (cast is a no-op). Compute losses in fp32.

Randomness
    Use ``state.generator`` (a per-rank torch.Generator on the CPU, seeded from
    ``train.seed`` and the rank, checkpointed and restored on resume) so that a resumed run
    draws the same noise it would have drawn.

Adding an objective
    Write ``trainer/objectives/<name>.py`` with a subclass of :class:`Objective` that sets
    ``name`` and ``Config``, and add it to :data:`OBJECTIVES` (or give the config
    ``objective.name: "package.module:Class"``). The config section ``objective:`` of a run
    is validated against ``Config`` (``name`` is removed first).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
from pydantic import Field, model_validator

from fewstep.config import StrictModel
from fewstep.storage import StorageOptions
from trainer.runtime.metrics import DEFAULT_PROGRESS_KEYS

if TYPE_CHECKING:
    import torch

    from fewstep.models.saved import SavedModel

# name -> "module:Class". Imported lazily so an objective's heavy imports (or its absence
# while it is being written) never break another objective.
OBJECTIVES: dict[str, str] = {
    "flow_matching": "trainer.objectives.flow_matching:FlowMatchingObjective",
    "vae": "trainer.objectives.vae:VAEObjective",
    "dmd": "trainer.objectives.dmd:DMDObjective",
}


class OptimizerConfig(StrictModel):
    """AdamW settings of one trainable model (every model gets its own optimiser)."""

    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float | None = Field(1.0, gt=0)  # max global grad norm; null disables clipping
    warmup_steps: int = Field(0, ge=0)  # linear warm-up in optimiser steps of this model
    # Learning-rate decay from optimiser step ``decay_start`` (default: the end of warm-up) to
    # step ``decay_steps``, down to ``lr * min_lr_ratio`` (then held there). Annealing at the
    # end of a run is where a constant-rate run leaves quality on the table; ``decay_start``
    # lets a resumed run begin that phase where it stands instead of jumping down the curve.
    decay: Literal["constant", "linear", "cosine"] = "constant"
    decay_start: int | None = None
    decay_steps: int | None = None
    min_lr_ratio: float = 0.0

    @model_validator(mode="after")
    def _decay_needs_length(self) -> OptimizerConfig:
        start = self._decay_start()
        if self.decay != "constant" and (self.decay_steps is None or self.decay_steps <= start):
            raise ValueError(
                f"decay_steps: decay '{self.decay}' needs decay_steps > {start} (the larger of "
                f"warmup_steps and decay_start); set it to the run's optimiser steps (e.g. train.max_steps)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("min_lr_ratio: must be in [0, 1] (the final lr as a share of lr)")
        ignored = [k for k, unset in (("decay_start", None), ("decay_steps", None), ("min_lr_ratio", 0.0))
                   if getattr(self, k) != unset]
        if self.decay == "constant" and ignored:
            raise ValueError(f"{', '.join(ignored)}: set, but decay is 'constant', which ignores them; "
                             "set decay: linear or cosine, or remove them")
        return self

    def _decay_start(self) -> int:
        return max(0, self.warmup_steps, self.decay_start or 0)

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimiser step ``step`` (0-based): warm-up, then decay."""
        warmup = max(0, self.warmup_steps)
        if warmup and step < warmup:
            return (step + 1) / warmup
        start = self._decay_start()
        if self.decay == "constant" or self.decay_steps is None or step < start:
            return 1.0
        progress = min(1.0, (step - start) / max(1, self.decay_steps - start))
        shape = 1.0 - progress if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape


@dataclass
class ModelSpec:
    """One model of a job. ``build`` runs in every worker and returns a CPU module in fp32.

    ``saved`` (optional) names the saved model that ``build`` loads. Under ZeRO-3 the runtime then
    builds it partitioned from the start (skeleton under ``deepspeed.zero.Init``, tensors copied
    in one at a time), so that no worker ever holds the whole model.
    """

    name: str
    build: Callable[[], torch.nn.Module]
    trainable: bool = True
    optimizer: OptimizerConfig | None = None  # required when trainable
    saved: SavedModel | None = None

    def __post_init__(self) -> None:
        if self.trainable and self.optimizer is None:
            raise ValueError(f"model {self.name!r}: a trainable ModelSpec needs an optimizer config")


class ModelHandle(Protocol):
    """What ``state.models[name]`` offers (implemented in ``trainer/runtime/engines.py``)."""

    name: str
    trainable: bool
    module: torch.nn.Module  # the bare module (its parameters may be ZeRO-3 partitions)
    net: Any  # call this for forward passes: the DeepSpeed engine or the module itself

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> dict[str, float]: ...  # optimiser step + zero grad: {"grad_norm", "lr"}

    def zero_grad(self) -> None: ...

    @property
    def optimizer_steps(self) -> int: ...


@dataclass
class ObjectiveEnv:
    """Where the objective runs: given to its constructor, before any model exists."""

    rank: int
    world_size: int
    device: torch.device
    storage: StorageOptions | None
    run_uri: str  # the run folder (local path or s3://)
    data_uri: str | None  # the (first) dataset root the runtime streams (shards or curated)
    work_dir: Path  # a local scratch directory of this worker
    data_uris: tuple[str, ...] = ()  # every root, when data.uri lists several (their union is streamed)
    data_tasks: tuple[str, ...] | None = None  # data.tasks: the runtime streams only these
    data_categories: tuple[str, ...] | None = None  # data.categories: likewise

    @property
    def roots(self) -> tuple[str, ...]:
        """Every dataset root of the run (one, several, or none)."""
        return self.data_uris or ((self.data_uri,) if self.data_uri else ())


@dataclass
class TrainState:
    """Live state handed to every ``train_step``."""

    step: int  # iterations completed before this one
    max_steps: int
    rank: int
    world_size: int
    device: torch.device
    compute_dtype: torch.dtype  # dtype of trainable parameters (bf16 under DeepSpeed bf16)
    models: dict[str, ModelHandle]
    generator: torch.Generator
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    next_batch: Callable[[], Any] | None = None  # pulls one more collated batch
    extra: dict[str, Any] = field(default_factory=dict)

    def any_across_ranks(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR of ``flags`` over all ranks (one small all-reduce; all ranks must call).

        Under ZeRO-3 every forward and backward through a trainable engine is collective, so
        all ranks must make the same calls: agree on optional passes with this (e.g. "does
        any rank have edit rows in this batch?") and run a zero-weighted pass where needed.
        """
        import torch

        if self.world_size == 1 or not torch.distributed.is_initialized():
            return list(flags)
        value = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return [bool(v) for v in value.tolist()]

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Move to the device; floating tensors to the compute dtype."""
        if tensor.is_floating_point():
            return tensor.to(self.device, self.compute_dtype)
        return tensor.to(self.device)


class Objective(ABC):
    """Base class of training objectives. See the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[StrictModel]]
    # Which dataset kind this objective trains from: "shards" (precomputed latents and
    # embeddings) or "curated" (images). The runtime checks the data manifest against it.
    data_kind: ClassVar[str] = "shards"
    # Columns the objective needs (None: all). Saves reading image bytes it never uses.
    columns: ClassVar[tuple[str, ...] | None] = None
    # Whether ``collate`` of the whole dataset gives a batch with ``select(index)`` and ``len``,
    # and ``collate`` passes such a batch through (the local launcher's ``data.device_cache_mb``).
    selectable_batches: ClassVar[bool] = False
    # Metrics shown beside the progress bar (their latest logged values).
    progress_keys: ClassVar[tuple[str, ...]] = DEFAULT_PROGRESS_KEYS
    # Prefixes of point-in-time checks (a periodic evaluation): a log record keeps the latest
    # value of its window, not the mean of the checks that fell in it.
    snapshot_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: StrictModel, env: ObjectiveEnv):
        self.config = config
        self.env = env

    @abstractmethod
    def model_specs(self) -> list[ModelSpec]:
        """Every model of the job, trainable or frozen."""

    def setup(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        """Called once the models exist (before resume): load side inputs such as embeddings."""

    @abstractmethod
    def collate(self, rows: dict[str, np.ndarray], device: torch.device) -> Any:
        """Turn one columnar batch of dataset rows into the objective's batch on ``device``."""

    @abstractmethod
    def train_step(self, state: TrainState, batch: Any) -> dict[str, float]:
        """One iteration: forward, backward and optimiser steps. Returns scalar metrics."""

    def initial_metrics(self, state: TrainState) -> dict[str, float]:
        """Metrics of the models before the first update of a fresh run (logged as step 0).

        Every rank calls it; under ZeRO-3 forward passes here must be the same on every rank."""
        return {}

    def log_due(self, state: TrainState) -> bool:
        """Whether ``state.step`` must be a log step whatever ``train.log_every`` says (a periodic
        check ran there: its values would otherwise be filed under a later step, or replaced)."""
        return False

    def closing_metrics(self, state: TrainState) -> dict[str, float]:
        """Metrics of the final model when ``train.max_minutes`` stops a run before ``max_steps``
        (checks the schedule would have run at the last step), merged into the last record.

        Every rank calls it, at the same step; the same rule as :meth:`initial_metrics` applies."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Objective state beyond model weights and optimisers (counters, EMA, ...)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Inverse of :meth:`state_dict`, called on resume."""

    def rank_state_dict(self) -> dict[str, Any]:
        """State of this rank alone (e.g. rows read but not yet trained on), saved per rank."""
        return {}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Inverse of :meth:`rank_state_dict` ({} when the run resumes with another world size)."""

    def finalize(self, state: TrainState) -> None:  # noqa: B027 - optional hook
        """After the last step, on every rank (collectives allowed), before ``export``."""

    def export(self, state: TrainState, out_dir: Path) -> None:  # noqa: B027 - optional hook
        """Write the final artefact (a diffusers pipeline directory) to a local ``out_dir``.

        Called on rank 0 only, after training, with ZeRO-3 parameters gathered. The runtime
        uploads ``out_dir`` to ``<run>/final`` when the run folder is on S3.
        """

    def describe(self) -> str:
        """One line for logs: what this objective trains."""
        return self.name


def resolve_objective(name: str) -> type[Objective]:
    """Find an objective class by registry name or ``package.module:Class``."""
    target = OBJECTIVES.get(name, name)
    if ":" not in target:
        known = ", ".join(sorted(OBJECTIVES))
        raise ValueError(f"objective.name: unknown objective {name!r}; use one of {known} "
                         "or 'package.module:Class'")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"objective.name: {name!r} needs module {module_name!r}, which cannot be "
                         f"imported ({exc})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise ValueError(f"objective.name: {target!r} is not an Objective subclass")
    return cls


def iter_columns(rows: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    """Row view of a columnar numpy batch (helper for ``collate``)."""
    names = list(rows)
    count = len(rows[names[0]]) if names else 0
    for index in range(count):
        yield {name: rows[name][index] for name in names}
