"""DMD distillation of a few-step student (PAPER.md), as a plug-in of the one training loop.

Models of a job: ``student`` and ``fake_score`` (trainable, both initialised from the base
teacher, each with its own AdamW and learning rate) and one frozen ``teacher_<name>`` per
teacher with a non-zero weight in the lambda table.

One iteration (``train_step``):

1. ``fake_updates`` times: the student generates samples without grad (backward simulation
   to a random step k, then step k), and the fake score learns plain flow matching on them.
2. Once: the student generates ``x_theta`` (steps < k without grad, step k with grad),
   ``x_theta`` is re-noised at a random ``t``, and the student is pushed along
   ``s_fake - s_real`` where ``s_real = sum_m lambda[k, m](category) * CFG(teacher_m)``
   (editing: every network also sees the source latents, as the edit pipeline does).
   Optionally a flow-matching loss on the student's first step is added (DP-DMD).

Every rank draws the per-sample student steps from a generator seeded by (seed, step), so
all ranks run the same number of forward passes (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fewstep.models.saved import SavedModel
from trainer.guidance import scale_for
from trainer.mixture import MixtureError, MixtureScheduler, achieved_ratio
from trainer.objectives import dmd_math as M
from trainer.objectives.base import ModelSpec, Objective, ObjectiveEnv, TrainState
from trainer.objectives.dmd_config import DMDConfig
from trainer.objectives.dmd_data import (
    DMD_COLUMNS,
    DMDBatch,
    RowBlock,
    TaskBuffer,
    decode_rows,
    load_empty_prompt,
)
from trainer.objectives.dmd_validation import Validator
from trainer.runtime.collectives import gather_objects
from trainer.runtime.data import union_totals

log = logging.getLogger(__name__)


def _gather_ready(tasks: list[str], world_size: int) -> list[set[str]]:
    """Every rank's list of tasks with a full batch buffered (all-gather; no-op on one process)."""
    return [set(g) for g in gather_objects(list(tasks), world_size)]


def _saved_transformer(uri: str, storage) -> SavedModel:
    return SavedModel(uri, "transformer", storage)


class DMDObjective(Objective):
    name = "dmd"
    Config = DMDConfig
    data_kind = "shards"
    columns = DMD_COLUMNS
    # Point-in-time values: checks, and the mixture's running shares (a mean over a window of
    # running totals would report neither the served share nor anything else).
    snapshot_prefixes = ("val_", "mixture_")
    progress_keys = ("dmd_loss", "fake_loss", "student_grad_norm", "mixture_edit_share", "val_score",
                     "val_pixel_std")

    def __init__(self, config: DMDConfig, env: ObjectiveEnv):
        super().__init__(config, env)
        self.cfg = config
        self.table = config.table()
        self.active = self.table.active_teachers()
        self.teacher_names = [config.guidance.teachers[m].name for m in self.active]
        self._restored_rows: dict[str, Any] = {}  # this rank's buffered rows from a checkpoint

    # ------------------------------------------------------------------ models
    def model_specs(self) -> list[ModelSpec]:
        from fewstep.models.pipeline_dir import PipelineDir
        from trainer.runtime.data import check_shards_fit

        cfg, storage = self.cfg, self.env.storage
        base = cfg.base_uri()
        # Before any model is built: shards of another model fail here, by name.
        # The student's base and every teacher read the same latents and prompt embeddings.
        models = {base: f"the student's base ({base})"}
        for m in self.active:
            spec = cfg.guidance.teachers[m]
            models.setdefault(spec.path, f"teacher {spec.name!r} ({spec.path})")
        for uri, name in models.items():
            check_shards_fit(PipelineDir(uri, storage).read_json("transformer/config.json"), self.env.roots,
                             storage, name)
        student, fake = _saved_transformer(base, storage), _saved_transformer(base, storage)
        specs = [
            ModelSpec("student", student.load, True, cfg.student_optimizer, saved=student),
            ModelSpec("fake_score", fake.load, True, cfg.fake_optimizer, saved=fake),
        ]
        for m in self.active:
            teacher = _saved_transformer(cfg.guidance.teachers[m].path, storage)
            specs.append(ModelSpec(f"teacher_{cfg.guidance.teachers[m].name}", teacher.load, False))
        return specs

    def setup(self, state: TrainState) -> None:
        from fewstep.models.adapter import QwenImageAdapter

        cfg, env = self.cfg, self.env
        self.adapter = QwenImageAdapter.load(cfg.base_uri(), components=(), storage=env.storage)
        self.sigmas = self.adapter.sigmas(cfg.student_steps, cfg.student_shift)
        self.empty = load_empty_prompt(env.data_uri, env.storage).to(state.device)
        roots = env.roots
        totals = union_totals(roots, env.storage, env.data_tasks, env.data_categories)
        self.manifest_rows = int(totals.get("rows", 0))
        by_task = totals.get("by_task")
        if isinstance(by_task, dict):
            missing = [t for t in cfg.mixture.fractions() if not by_task.get(t)]
            if missing:
                kept = (f" after data.tasks {list(env.data_tasks or [])} / data.categories "
                        f"{list(env.data_categories or [])}") if env.data_tasks or env.data_categories else ""
                raise MixtureError(
                    f"objective.mixture.ratio serves {missing} but {', '.join(roots)} holds no such rows"
                    f"{kept} (rows per task: {by_task}); set its weight to 0, widen the data filter "
                    "or precompute such data")
        self.buffer: TaskBuffer | None = None
        self.mixer: MixtureScheduler | None = None
        self._restored: dict[str, Any] = {}
        validation = cfg.validation
        if validation.resolution is None and cfg.resolution is not None:  # check at the trained size
            validation = validation.model_copy(update={"resolution": cfg.resolution})
        self.validator = Validator(validation, self.adapter, cfg.base_uri(), env, cfg.student_steps,
                                   cfg.student_shift) if validation.every else None
        log.info("DMD: %d-step student (shift %g), teachers %s, lambda table %s, mixture %s",
                 cfg.student_steps, cfg.student_shift, self.teacher_names, self.table.to_dict()["tables"],
                 cfg.mixture.fractions())

    # ------------------------------------------------------------------ data
    def collate(self, rows: dict[str, np.ndarray], device: torch.device) -> RowBlock:
        return RowBlock.from_columns(rows)

    def _next_batch(self, state: TrainState, block: RowBlock) -> DMDBatch:
        """This rank's share of the step's mixture: a whole-task batch, pulling rows as needed.

        All ranks pull the same number of extra runtime batches (they reach epoch ends
        together, which Ray Data's split iterators and the collective optimiser steps need)
        and agree on one task per rank from what every rank has buffered.
        """
        if self.mixer is None or self.buffer is None:
            batch_size = max(len(block), 1)  # the runtime's train.batch_size
            self.buffer = TaskBuffer(batch_size, self.cfg.buffer_batches * batch_size)
            self.buffer.seen.update(self._restored.get("buffer_seen", {}))
            self.buffer.dropped.update(self._restored.get("buffer_dropped", {}))
            for task, rows in self._restored_rows.get("buffer_rows", {}).items():
                self.buffer.buffers.setdefault(task, deque()).extend(rows)
            self.mixer = self._make_mixer(state.world_size)
        self.buffer.push(block)
        tasks = sorted(self.mixer.fractions)
        # Strict (exact ratio) for a few pulls; then the closest the ranks' data allow.
        patience = 2 * self.cfg.buffer_batches
        limit = max(4 * self.manifest_rows // max(self.buffer.batch_size * state.world_size, 1), 64)
        pulls = 0
        while True:
            ready = _gather_ready([t for t in tasks if self.buffer.ready(t)], state.world_size)
            assignment = self.mixer.assign(ready, strict=pulls < patience)
            if assignment is not None:
                break
            if state.next_batch is None or pulls > limit:
                raise MixtureError(
                    f"mixture.ratio {self.cfg.mixture.ratio}: after {pulls} extra batches a rank still has "
                    f"no full batch of a task it can serve (rows seen here per task: {self.buffer.seen}); "
                    "set a missing task's weight to 0 or add such data")
            self.buffer.push(state.next_batch())
            pulls += 1
        self.mixer.commit(assignment, on_target=pulls < patience)
        return decode_rows(self.buffer.pop(assignment[state.rank]), state.device)

    # ------------------------------------------------------------------ networks
    def _make_mixer(self, world_size: int) -> MixtureScheduler:
        """The mixture scheduler, with the served counts of a resumed run unless
        ``mixture.counts_from`` is ``resume``."""
        fractions = self.cfg.mixture.fractions()
        served = self._restored.get("mixture_served")
        if served and self.cfg.mixture.counts_from == "resume":
            log.info("mixture: counting afresh from the resume (the run had served %s)", served)
            served = None
        elif served:
            shares = achieved_ratio(served)
            before = self._restored.get("mixture_fractions")
            # The ratio changed (checkpoints from before it was recorded: a clear drift only; a
            # few whole batches cannot match 7:3 yet and are no reason to warn).
            positive = {t: f for t, f in fractions.items() if f > 0}
            changed = (before != positive if before is not None else sum(served.values()) >= 20
                       and any(abs(shares.get(t, 0.0) - f) > 0.05 for t, f in fractions.items()))
            if changed:
                log.warning("mixture: resumed with ratio %s but the run so far served %s; the cumulative "
                            "counts now steer towards the new ratio (mixture.counts_from: resume serves it "
                            "from this step on)", self.cfg.mixture.ratio, served)
        mixer = MixtureScheduler(fractions, world_size, served)
        if served:
            mixer.off_target_steps = int(self._restored.get("mixture_off_target_steps", 0))
        return mixer

    def _velocity(self, handle, batch: DMDBatch, state: TrainState):
        ad, cond, source = self.adapter, batch.cond, batch.source_latents

        def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with state.autocast():
                v = ad.predict_velocity(handle.net, state.cast(z), state.cast(t), cond,
                                        None if source is None else state.cast(source))
            return v.float()

        return fn

    def _real(self, batch: DMDBatch, weights: torch.Tensor, state: TrainState):
        ad, cfg = self.adapter, self.cfg
        uncond = batch.negative if batch.task == "edit" else self.empty.repeat(len(batch))

        def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            velocities: list[torch.Tensor | None] = []
            for m, teacher in enumerate(cfg.guidance.teachers):
                if m not in self.active or not bool((weights[:, m] > 0).any()):
                    velocities.append(None)
                    continue
                handle = state.models[f"teacher_{teacher.name}"]
                scale = scale_for(batch.task, teacher.guidance_scale, cfg.guidance_scale)
                # The adapter casts inputs to the teacher's own dtype (bf16 or fp32).
                with torch.no_grad(), state.autocast():
                    v = ad.guided_velocity(handle.net, z, t, batch.cond, uncond, scale,
                                           batch.source_latents)
                velocities.append(v.float())
            return M.mix_velocities(velocities, weights.to(z.device))

        return fn

    def _shape(self, batch: DMDBatch) -> tuple[int, ...]:
        if self.cfg.resolution is None and batch.latents is not None:
            return tuple(batch.latents.shape[1:])
        size = self.cfg.resolution or self.adapter.resolution
        if size is None:
            raise ValueError("objective.resolution: required when shard rows carry no latents and the "
                             "teacher records no resolution")
        h, w = self.adapter.latent_hw(size, size)
        return (self.adapter.latent_channels, h, w)

    def _draw(self, state: TrainState, batch: DMDBatch, salt: int):
        """Per-sample student steps (same on every rank) and this rank's noise."""
        shared = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + state.step) * 1009 + salt)
        steps = M.sample_student_steps(len(batch), self.cfg.student_steps, shared, self.cfg.step_probs)
        noise = torch.randn((len(batch), *self._shape(batch)), generator=state.generator).to(state.device)
        return steps, noise

    # ------------------------------------------------------------------ the step
    def train_step(self, state: TrainState, block: RowBlock) -> dict[str, float]:
        cfg = self.cfg
        batch = self._next_batch(state, block)
        student, fake = state.models["student"], state.models["fake_score"]
        student_fn, fake_fn = self._velocity(student, batch, state), self._velocity(fake, batch, state)
        sigmas = self.sigmas.to(state.device)
        out: dict[str, float] = {}

        fake_before, student_before = fake.optimizer_steps, student.optimizer_steps
        fake_losses, fake_norms, fake_lr = [], [], 0.0
        for i in range(cfg.fake_updates):
            steps, noise = self._draw(state, batch, salt=1 + i)
            with torch.no_grad():
                z_k, t_k = M.backward_simulate(student_fn, noise, sigmas, steps.to(state.device))
                x, _ = M.student_x0(student_fn, z_k, t_k)
            # Trained where the student update queries it: the re-noise t is shifted by renoise_shift.
            t = M.sample_timesteps(len(batch), *cfg.fake_t, shift=cfg.renoise_shift,
                                   generator=state.generator, device=state.device)
            loss = M.flow_matching_loss(fake_fn, x, t, torch.randn(x.shape, generator=state.generator).to(x))
            fake.backward(loss)
            fake_stats = fake.step()
            fake_norms.append(fake_stats["grad_norm"])
            fake_lr = fake_stats["lr"]
            fake_losses.append(float(loss.detach()))

        steps, noise = self._draw(state, batch, salt=0)
        steps = steps.to(state.device)
        z_k, t_k = M.backward_simulate(student_fn, noise, sigmas, steps)
        x, _ = M.student_x0(student_fn, z_k, t_k)
        weights = self.table.for_samples(steps.cpu(), [f"{batch.task}:{c}" for c in batch.categories])
        t = M.sample_timesteps(len(batch), *cfg.renoise_t, shift=cfg.renoise_shift,
                               generator=state.generator, device=state.device)
        xi = torch.randn(x.shape, generator=state.generator).to(x)
        loss, stats = M.dmd_loss(x, t, xi, fake_fn, self._real(batch, weights, state))
        total = loss
        if cfg.fm_first_step_weight > 0:
            fm = self._first_step_fm(student_fn, batch, sigmas, state)
            total = total + cfg.fm_first_step_weight * fm
            out["fm_first_step_loss"] = float(fm.detach())
        student.backward(total)
        student_stats = student.step()

        shares = self.mixer.shares()
        out.update({
            "dmd_loss": float(loss.detach()),
            "fake_loss": float(np.mean(fake_losses)),
            "student_grad_norm": float(student_stats["grad_norm"]),
            "fake_grad_norm": float(np.mean(fake_norms)),
            "student_lr": float(student_stats["lr"]),
            "fake_lr": float(fake_lr),
            "dmd_grad_abs": float(stats["dmd_grad_abs"]),
            "fake_real_gap": float(stats["fake_real_gap"]),
            "x_theta_std": float(x.detach().float().std()),
            "mixture_edit_share": shares.get("edit", 0.0),
            "mixture_t2i_share": shares.get("t2i", 0.0),
            "task_edit": 1.0 if batch.task == "edit" else 0.0,
            "mixture_off_target_steps": float(self.mixer.off_target_steps),
            # Optimiser steps taken in this iteration (N fake-score updates per student update).
            "student_updates": float(student.optimizer_steps - student_before),
            "fake_updates": float(fake.optimizer_steps - fake_before),
        })
        if self.validator is not None and self.validator.due(state.step + 1, state.max_steps):
            out.update(self.validator.run(state, student, step=state.step + 1))
        return out

    def _first_step_fm(self, student_fn, batch: DMDBatch, sigmas: torch.Tensor, state: TrainState):
        """Flow matching on the student's first step (t = sigmas[0]) against the rows' latents
        (T2I images, edit targets); rows without latents get weight 0. The forward pass runs
        even then, so every rank makes the same calls (ZeRO-3)."""
        latents, mask = batch.latents, batch.latents_mask
        if latents is None or mask is None:
            latents = torch.zeros((len(batch), *self._shape(batch)), device=state.device)
            mask = torch.zeros(len(batch), device=state.device)
        t0 = sigmas[0].expand(len(batch)).to(state.device)
        eps = torch.randn(latents.shape, generator=state.generator).to(latents)
        return M.flow_matching_loss(student_fn, latents, t0, eps, weight=mask)

    # ------------------------------------------------------------------ state and export
    def log_due(self, state: TrainState) -> bool:
        return self.validator is not None and self.validator.due(state.step, state.max_steps)

    def initial_metrics(self, state: TrainState) -> dict[str, float]:
        """The student before training (= the base teacher at the student's NFE), as step 0."""
        return self.validator.run(state, state.models["student"], step=0) if self.validator else {}

    def closing_metrics(self, state: TrainState) -> dict[str, float]:
        """The student that is exported, when a time budget ended the run off the schedule."""
        if self.validator is None or self.validator.due(state.step, state.max_steps):
            return {}
        return self.validator.run(state, state.models["student"], step=state.step)

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None or self.mixer is None:
            return dict(self._restored)
        return {"buffer_seen": dict(self.buffer.seen), "buffer_dropped": dict(self.buffer.dropped),
                "mixture_served": dict(self.mixer.served),
                "mixture_fractions": dict(self.mixer.fractions),
                "mixture_off_target_steps": self.mixer.off_target_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Global served counts (same on every rank) keep the ratio on track across a resume.
        self._restored = dict(state)

    def rank_state_dict(self) -> dict[str, Any]:
        # Rows this rank has read but not trained on: a resume must serve them, as a run that
        # never stopped would, instead of reading on past them.
        if self.buffer is None:
            return dict(self._restored_rows)
        return {"buffer_rows": {task: list(rows) for task, rows in self.buffer.buffers.items() if rows}}

    def load_rank_state_dict(self, state: dict[str, Any]) -> None:
        self._restored_rows = dict(state)

    def export(self, state: TrainState, out_dir: Path) -> None:
        from trainer.export import export_student

        export_student(state.models["student"].module, self.cfg.base_uri(), str(out_dir),
                       num_steps=self.cfg.student_steps, shift=self.cfg.student_shift,
                       storage=self.env.storage, trained_steps=state.step,
                       extra_meta={"teachers": [t.name for t in self.cfg.guidance.teachers],
                                   "lambda_table": self.table.to_dict(),
                                   "mixture": self.cfg.mixture.fractions(),
                                   # base_uri() is init_from when set; the teachers' base is this one
                                   "base_teacher": self.cfg.guidance.teachers[self.cfg.guidance.base_index()].path,
                                   **({"init_from": self.cfg.init_from} if self.cfg.init_from else {}),
                                   # eval samples at the size the student trained at
                                   **({"resolution": self.cfg.resolution} if self.cfg.resolution else {})})

    def describe(self) -> str:
        return f"dmd {self.cfg.student_steps}-step student <- {'+'.join(self.teacher_names)}"
