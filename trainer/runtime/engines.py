"""Wrap the models of a job: DeepSpeed engines, plain torch (optionally DDP), or frozen.

Every handle offers the same small API to objectives (``trainer.objectives.base.ModelHandle``):
``net`` for forward passes, ``backward``, ``step`` and ``zero_grad``, plus checkpoint
save/load and ``gathered()`` (full parameters for export under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from trainer.objectives.base import ModelSpec, OptimizerConfig
from trainer.runtime.config import TrainConfig


def compute_dtype(config: TrainConfig) -> torch.dtype:
    """Dtype of trainable parameters: bf16 only under DeepSpeed bf16 (else autocast handles it)."""
    if config.deepspeed.enabled and config.train.precision == "bf16":
        return torch.bfloat16
    return torch.float32


def frozen_dtype(config: TrainConfig) -> torch.dtype:
    return torch.bfloat16 if config.train.precision == "bf16" else torch.float32


def deepspeed_config(config: TrainConfig, spec: ModelSpec, n_params: int) -> dict[str, Any]:
    """The DeepSpeed config of one engine (all engines share stage and precision).

    Bucket sizes scale with the model: DeepSpeed's defaults (5e8 elements per reduce bucket,
    1e9 live parameters and optimiser sub-groups of 1e9 under ZeRO-3) allocate gigabytes and,
    below a billion parameters, keep every gathered ZeRO-3 parameter alive and step the whole
    partition at once, which would undo the partitioning. Keys under
    ``deepspeed.config`` override these.
    """
    opt = spec.optimizer or OptimizerConfig()
    stage = config.deepspeed.zero_stage
    zero: dict[str, Any] = {"stage": stage}
    bucket = int(min(5e8, max(1e6, n_params // 8)))
    if stage in (1, 2):
        zero.update({"overlap_comm": False, "contiguous_gradients": True,
                     "reduce_bucket_size": bucket, "allgather_bucket_size": bucket})
    if stage == 3:
        # Gathered parameters, prefetch and gradient buckets are transient full-size copies on
        # top of this rank's partition: keep them a small share of the model.
        live = int(min(1e9, max(1e6, n_params // 16)))
        zero.update({"overlap_comm": False, "contiguous_gradients": True,
                     "reduce_bucket_size": int(min(5e8, max(1e6, n_params // 32))),
                     "stage3_prefetch_bucket_size": int(min(5e7, max(1e6, n_params // 32))),
                     "stage3_max_live_parameters": live, "stage3_max_reuse_distance": live,
                     "stage3_param_persistence_threshold": int(min(1e5, max(1e3, n_params // 1000))),
                     # The optimiser steps one sub-group at a time: AdamW's temporaries are the size
                     # of a sub-group, not of the whole partition.
                     "sub_group_size": int(min(1e9, max(1e6, n_params // 16)))})
    if config.deepspeed.offload_optimizer:
        if stage == 0:
            raise ValueError("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
        zero["offload_optimizer"] = {"device": "cpu"}
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.train.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(opt.grad_clip or 0.0),
        "zero_optimization": zero,
        "bf16": {"enabled": config.train.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, copy.deepcopy(config.deepspeed.config))


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _optimizer(params: list[torch.nn.Parameter], opt: OptimizerConfig, device: torch.device):
    kwargs: dict[str, Any] = {"lr": opt.lr, "betas": opt.betas, "weight_decay": opt.weight_decay,
                              "eps": opt.eps}
    if device.type == "cuda":
        kwargs["fused"] = True
    optimizer = torch.optim.AdamW(params, **kwargs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: opt.lr_factor(step))
    return optimizer, scheduler


class _Handle:
    name: str
    trainable: bool
    module: torch.nn.Module
    net: Any

    def backward(self, loss: torch.Tensor) -> None:
        raise RuntimeError(f"model {self.name!r} is frozen: it has no backward/step")

    def step(self) -> dict[str, float]:
        raise RuntimeError(f"model {self.name!r} is frozen: it has no backward/step")

    def zero_grad(self) -> None:
        pass

    @property
    def optimizer_steps(self) -> int:
        return 0

    def save(self, directory: Path) -> None:
        pass

    def load(self, directory: Path) -> None:
        pass

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        yield self.module


class FrozenHandle(_Handle):
    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype):
        self.name, self.trainable = spec.name, False
        module = spec.build()
        module.requires_grad_(False)
        self.module = module.to(device=device, dtype=dtype).eval()
        self.net = self.module


class TorchHandle(_Handle):
    """Plain torch AdamW (optionally DDP across ranks): the launcher without DeepSpeed."""

    replicated = True  # every rank holds the full model and optimiser state

    def __init__(self, spec: ModelSpec, device: torch.device, world_size: int):
        self.name, self.trainable = spec.name, True
        self.opt_config = spec.optimizer or OptimizerConfig()
        self.module = spec.build().to(device).train()
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {spec.name!r}: trainable but has no parameter with requires_grad")
        self.params = params
        self.optimizer, self.scheduler = _optimizer(params, self.opt_config, device)
        self.net = self.module
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None)
        self._steps = 0

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> dict[str, float]:
        clip = self.opt_config.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip if clip else math.inf)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._steps += 1
        return {"grad_norm": float(norm), "lr": float(lr)}

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def optimizer_steps(self) -> int:
        return self._steps

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "steps": self._steps},
                   directory / "torch_state.pt")

    def load(self, directory: Path) -> None:
        state = torch.load(directory / "torch_state.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._steps = int(state["steps"])


class DeepSpeedHandle(_Handle):
    """A DeepSpeed engine with a client AdamW (so no fused/cpu Adam op has to be compiled)."""

    TAG = "engine"

    def __init__(self, spec: ModelSpec, config: TrainConfig, device: torch.device):
        import deepspeed

        self.name, self.trainable = spec.name, True
        self.opt_config = spec.optimizer or OptimizerConfig()
        self.stage = config.deepspeed.zero_stage
        if self.stage == 3 and spec.saved is not None:
            module, self.ds_config = _build_partitioned(spec, config)
        else:
            module = spec.build()
            self.ds_config = deepspeed_config(config, spec, sum(p.numel() for p in module.parameters()
                                                                  if p.requires_grad))
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {spec.name!r}: trainable but has no parameter with requires_grad")
        optimizer, scheduler = _optimizer(params, self.opt_config, torch.device("cpu"))
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler,
            model_parameters=params, config=self.ds_config)
        self.engine = engine
        if self.stage == 3:
            _alias_fp32_master(engine.optimizer)
        self.module = engine.module
        self.net = engine
        self.device = device

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> dict[str, float]:
        norm = None
        if self.stage == 0:
            # Stage 0 keeps full (already all-reduced) grads but does not always report their
            # norm; measure it before the step, as the ZeRO optimisers do.
            norm = _grad_norm(self.engine.module.parameters())
        lr = self.engine.get_lr()[0]
        self.engine.step()
        if norm is None:
            norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            norm = norm.item()
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": float(lr)}

    def zero_grad(self) -> None:
        self.engine.zero_grad()

    @property
    def optimizer_steps(self) -> int:
        return int(self.engine.global_steps)

    def save(self, directory: Path) -> None:
        # Collective: every rank writes its own partition files into its local directory;
        # Ray Train merges the ranks' directories into one checkpoint.
        self.engine.save_checkpoint(str(directory), tag=self.TAG)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.TAG)
        if path is None:
            raise RuntimeError(f"model {self.name!r}: no DeepSpeed checkpoint under {directory}")

    @contextlib.contextmanager
    def gathered(self) -> Iterator[torch.nn.Module]:
        if self.stage == 3:
            import deepspeed

            # Collective on all ranks; every rank then holds full parameters (read-only).
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                yield self.module
        else:
            yield self.module


def _build_partitioned(spec: ModelSpec, config: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Build ``spec.saved`` already partitioned across ranks (ZeRO-3) and copy its weights in.

    The skeleton is constructed under ``deepspeed.zero.Init``, which partitions each parameter
    as soon as its module is built; then each saved tensor is written through a gather that
    only rank 0 modifies. At no point does a rank hold more than one full parameter, so a
    worker's peak is its share of the model states rather than the whole model.
    """
    import deepspeed

    saved = spec.saved
    assert saved is not None
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with saved.tensors() as reader:
        ds_config = deepspeed_config(config, spec, reader.num_elements())
        build = saved.skeleton_factory()
        # No `dtype=`: the config's bf16 flag sets it. DeepSpeed 0.19 ignores an explicit dtype on
        # accelerators without fp16 (the CPU) and silently builds bf16 parameters.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            module = build()
        params = dict(module.named_parameters())
        buffers = dict(module.named_buffers())
        names = reader.names()
        missing = sorted(set(params) - set(names))
        unexpected = sorted(set(names) - set(params) - set(buffers))
        if missing or unexpected:
            raise ValueError(f"model {spec.name!r}: {saved} does not match its config "
                             f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
        for name in names:  # the same order on every rank: each gather is a collective
            if name in buffers:
                buffers[name].data.copy_(reader.get(name))
                continue
            param = params[name]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if rank == 0:
                    param.data.copy_(reader.get(name))
    return module, ds_config


def _alias_fp32_master(zero_optimizer: Any) -> int:
    """Drop ZeRO-3's second copy of fp32 weights when the weights already are fp32.

    DeepSpeed's stage-3 optimiser means to alias its fp32 "master" partitions to the parameter
    partitions when their dtype and device match, but it compares ``tensor.device`` with a
    device *name* (a string), which is never equal, so it keeps a full copy of this rank's
    weights. Called before the first step (no optimiser state yet), this makes them the aliases
    DeepSpeed intends; the step then copies each into itself. Returns the bytes freed.
    """
    low = getattr(zero_optimizer, "fp16_partitioned_groups_flat", None)
    high = getattr(zero_optimizer, "fp32_partitioned_groups_flat", None)
    if not low or not high or getattr(zero_optimizer, "offload_optimizer", False):
        return 0
    if getattr(zero_optimizer, "optimizer", None) is None or zero_optimizer.optimizer.state:
        return 0
    freed = 0
    for i, (params, master) in enumerate(zip(low, high)):
        if (params is None or master is params or params.dtype != master.dtype
                or params.device != master.device or params.numel() != master.numel()):
            continue
        params.ds_id = getattr(master, "ds_id", None)
        params.requires_grad = True
        high[i] = params
        freed += master.numel() * master.element_size()
    return freed


def _grad_norm(params) -> float:
    total = 0.0
    for p in params:
        if p.grad is not None:
            total += float(p.grad.detach().float().pow(2).sum())
    return math.sqrt(total)


def build_handles(specs: list[ModelSpec], config: TrainConfig, device: torch.device,
                  world_size: int) -> dict[str, _Handle]:
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"objective model names must be unique, got {names}")
    handles: dict[str, _Handle] = {}
    for spec in specs:
        if not spec.trainable:
            handles[spec.name] = FrozenHandle(spec, device, frozen_dtype(config))
        elif config.deepspeed.enabled:
            handles[spec.name] = DeepSpeedHandle(spec, config, device)
        else:
            handles[spec.name] = TorchHandle(spec, device, world_size)
    return handles


@contextlib.contextmanager
def all_gathered(handles: dict[str, _Handle]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for handle in handles.values():
            stack.enter_context(handle.gathered())
        yield
