"""The DMD math as pure functions over tensors and velocity callables.

Flow path (PAPER.md): ``z_t = (1 - t) x + t eps``, the network predicts ``v = eps - x``,
sampling integrates from t=1 (noise) to t=0 (data). A *velocity function* here is any
callable ``(z [B, ...], t [B]) -> v [B, ...]`` with the conditioning already bound, so this
module knows nothing about transformers, prompts or teachers and is tested on its own.

The generator update follows DMD / DMD2: the student's sample ``x`` is re-noised to
``x_t``; the direction ``s_fake - s_real`` is taken in x0 space
(``x0_fake - x0_real``), normalised per sample by ``mean |x - x0_real|`` (DMD2), and applied
through the surrogate ``0.5 * ||x - sg(x - grad)||^2`` whose gradient w.r.t. ``x`` is
``grad``. The fake score learns plain flow matching on detached student samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def expand_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``t [B]`` broadcast against ``like [B, ...]``."""
    return t.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def x0_from_velocity(z: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Clean-sample prediction ``x0 = z - t v``."""
    return z - expand_t(t, z) * v


def renoise(x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``z_t = (1 - t) x + t noise``."""
    tt = expand_t(t, x)
    return (1.0 - tt) * x + tt * noise


def euler_step(z: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One Euler step of the flow ODE from ``t`` to ``t_next`` (what the exported pipeline's
    FlowMatchEulerDiscreteScheduler does): equal to re-noising the x0 prediction with the
    predicted noise, so training and inference follow the same trajectory."""
    return z + expand_t(t_next - t, z) * v


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The SD3/Flux time shift ``s t / (1 + (s - 1) t)`` (shift 1 is the identity)."""
    if shift == 1.0:
        return t
    return shift * t / (1.0 + (shift - 1.0) * t)


def sample_timesteps(
    batch: int,
    t_min: float,
    t_max: float,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Uniform ``t`` in ``[t_min, t_max]``, then shifted (re-noise and fake-score timesteps)."""
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"timestep range must satisfy 0 <= t_min < t_max <= 1, got [{t_min}, {t_max}]")
    u = torch.rand(batch, generator=generator, device="cpu").to(device)
    return shift_timesteps(t_min + (t_max - t_min) * u, shift)


def sample_student_steps(
    batch: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    probs: Sequence[float] | None = None,
) -> torch.Tensor:
    """A random student step ``k`` in ``0..num_steps-1`` per sample (uniform by default)."""
    if probs is None:
        return torch.randint(0, num_steps, (batch,), generator=generator)
    weights = torch.tensor(list(probs), dtype=torch.float32)
    if weights.numel() != num_steps or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"step probabilities must be {num_steps} non-negative numbers, got {list(probs)}")
    return torch.multinomial(weights, batch, replacement=True, generator=generator)


def backward_simulate(
    student: VelocityFn,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Input of student step ``k`` per sample, produced by the student's own earlier steps.

    Starting from ``noise`` at ``sigmas[0]``, every sample runs the student's Euler steps
    ``0..k-1`` (no gradient: DMD2's backward simulation); a sample whose ``k`` is reached
    keeps its state while the others go on, so one pass over ``max(k)`` steps serves the
    whole batch. Returns ``(z_k [B, ...], t_k [B])``.
    """
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 entries, got {tuple(sigmas.shape)}")
    steps = steps.to(noise.device)
    sigmas = sigmas.to(noise.device, torch.float32)
    batch = noise.shape[0]
    z = noise
    max_k = int(steps.max()) if steps.numel() else 0
    with torch.no_grad():
        for j in range(max_k):
            t = sigmas[j].expand(batch)
            v = student(z, t)
            moved = euler_step(z, t, sigmas[j + 1].expand(batch), v.to(z.dtype))
            keep = expand_t((steps > j).to(z.dtype), z)
            z = keep * moved + (1.0 - keep) * z
    return z.detach(), sigmas[steps]


def student_x0(
    student: VelocityFn, z_k: torch.Tensor, t_k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student step ``k`` with gradient: ``(x_theta = z_k - t_k v, v)``."""
    v = student(z_k, t_k)
    return x0_from_velocity(z_k, t_k, v.to(z_k.dtype)), v


def dmd_grad(
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    fake: VelocityFn,
    real: VelocityFn,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The normalised DMD direction ``(x0_fake - x0_real) / mean|x - x0_real|`` (no grad).

    ``x`` is the student sample (detached here), ``t`` the re-noise level per sample.
    """
    with torch.no_grad():
        x = x.detach()
        x_t = renoise(x, t, noise)
        fake_x0 = x0_from_velocity(x_t, t, fake(x_t, t).to(x.dtype))
        real_x0 = x0_from_velocity(x_t, t, real(x_t, t).to(x.dtype))
        dims = tuple(range(1, x.dim()))
        normaliser = (x - real_x0).abs().mean(dim=dims, keepdim=True).clamp_min(eps)
        grad = torch.nan_to_num((fake_x0 - real_x0) / normaliser)
        stats = {
            "dmd_normaliser": normaliser.mean(),
            "dmd_grad_abs": grad.abs().mean(),
            "fake_real_gap": (fake_x0 - real_x0).abs().mean(),
        }
    return grad, stats


def dmd_surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``0.5 * mean ||x - sg(x - grad)||^2``: its gradient w.r.t. ``x`` is ``grad / numel``."""
    target = (x - grad).detach()
    return 0.5 * F.mse_loss(x.float(), target.float(), reduction="mean")


def dmd_loss(
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    fake: VelocityFn,
    real: VelocityFn,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DMD generator loss for student samples ``x`` (with grad) re-noised at ``t``."""
    grad, stats = dmd_grad(x, t, noise, fake, real)
    return dmd_surrogate_loss(x, grad), stats


def flow_matching_loss(
    velocity: VelocityFn,
    x: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain flow matching: ``|| v(z_t, t) - (noise - x) ||^2`` with ``x`` treated as data.

    ``weight [B]`` (optional) masks or weights samples; the mean is over weighted samples.
    """
    x = x.detach()
    z = renoise(x, t, noise)
    v = velocity(z, t)
    per_sample = (v.float() - (noise - x).float()).pow(2).flatten(1).mean(dim=1)
    if weight is None:
        return per_sample.mean()
    weight = weight.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def mix_velocities(
    velocities: Sequence[torch.Tensor | None], weights: torch.Tensor
) -> torch.Tensor:
    """``sum_m weights[:, m] * v_m`` for per-sample teacher weights ``[B, M]``.

    ``None`` marks a teacher that was not evaluated because its weight is 0 for every
    sample of the batch (saves a teacher forward pass).
    """
    total: torch.Tensor | None = None
    for m, v in enumerate(velocities):
        if v is None:
            if bool((weights[:, m] != 0).any()):
                raise ValueError(f"teacher {m} has a non-zero weight but was not evaluated")
            continue
        term = expand_t(weights[:, m].to(v.device), v) * v
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no teacher has a non-zero weight in this batch")
    return total
