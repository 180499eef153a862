"""DMD math on analytic Gaussians: the direction points from the fake toward the real score."""

from __future__ import annotations

import torch

from trainer.objectives.dmd_math import (
    backward_simulate,
    dmd_grad,
    dmd_loss,
    euler_step,
    flow_matching_loss,
    mix_velocities,
    renoise,
    sample_timesteps,
    x0_from_velocity,
)


def gaussian_velocity(mu: torch.Tensor, var: float):
    """Exact flow velocity for data ~ N(mu, var I) under z = (1 - t) x + t eps."""

    def velocity(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.reshape(-1, *([1] * (z.dim() - 1)))
        x0 = mu + (1 - tt) * var / ((1 - tt) ** 2 * var + tt**2) * (z - (1 - tt) * mu)
        return (z - x0) / tt

    return velocity


def test_conversions_roundtrip():
    x, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.1, 0.5, 0.9])
    z = renoise(x, t, eps)
    assert torch.allclose(x0_from_velocity(z, t, eps - x), x, atol=1e-6)
    # Euler to t=0 with the true velocity lands on the data point.
    assert torch.allclose(euler_step(z, t, torch.zeros(3), eps - x), x, atol=1e-6)


def test_backward_simulation_follows_the_students_own_steps():
    target = torch.full((1, 2, 2), 3.0)
    student = gaussian_velocity(target, 1e-8)  # a point mass: Euler lands on it in one step
    calls = []

    def counted(z, t):
        calls.append(t.clone())
        return student(z, t)

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    noise = torch.randn(4, 1, 2, 2)
    steps = torch.tensor([0, 1, 2, 3])
    z_k, t_k = backward_simulate(counted, noise, sigmas, steps)
    assert torch.equal(t_k, sigmas[steps])
    assert torch.equal(z_k[0], noise[0])  # k = 0 is pure noise
    for i in (1, 2, 3):  # each later input equals i explicit Euler steps from the same noise
        z = noise[i : i + 1]
        for j in range(i):
            z = euler_step(z, sigmas[j : j + 1], sigmas[j + 1 : j + 2], student(z, sigmas[j : j + 1]))
        assert torch.allclose(z_k[i : i + 1], z, atol=1e-5)
    assert len(calls) == 3  # max(k) passes for the whole batch, no more
    assert not z_k.requires_grad


def test_dmd_gradient_moves_student_toward_real_distribution():
    torch.manual_seed(0)
    mu_real = torch.full((1, 2, 3, 3), 1.0)
    shift = torch.zeros(1, 2, 3, 3, requires_grad=True)  # the "student": x = eps + shift
    opt = torch.optim.SGD([shift], lr=1.0)
    real = gaussian_velocity(mu_real, 1.0)
    gaps = []
    for _ in range(60):
        x = torch.randn(64, 2, 3, 3) + shift
        fake = gaussian_velocity(shift.detach(), 1.0)  # a perfect fake score of the student
        t = sample_timesteps(64, 0.02, 0.98)
        loss, stats = dmd_loss(x, t, torch.randn_like(x), fake, real)
        opt.zero_grad()
        loss.backward()
        opt.step()
        gaps.append(float((shift.detach() - mu_real).abs().mean()))
        assert torch.isfinite(loss) and stats["dmd_grad_abs"] >= 0
    assert gaps[0] > 0.9 and gaps[-1] < 0.15, gaps[::10]


def test_dmd_grad_is_zero_when_fake_equals_real_and_normalised_per_sample():
    real = gaussian_velocity(torch.zeros(1, 1, 2, 2), 1.0)
    x = torch.randn(5, 1, 2, 2)
    grad, _ = dmd_grad(x, torch.full((5,), 0.5), torch.randn_like(x), real, real)
    assert torch.count_nonzero(grad) == 0
    far = gaussian_velocity(torch.full((1, 1, 2, 2), 10.0), 1.0)
    scaled = torch.cat([x[:1], 100 * x[1:2]])  # very different magnitudes stay O(1)
    grad, _ = dmd_grad(scaled, torch.full((2,), 0.5), torch.randn_like(scaled), far, real)
    assert grad.abs().max() < 50 and torch.isfinite(grad).all()


def test_flow_matching_loss_is_minimised_by_the_true_velocity_and_masks():
    mu = torch.full((1, 1, 2, 2), 2.0)
    x = mu + 0.0 * torch.randn(256, 1, 2, 2)
    t, eps = sample_timesteps(256, 0.05, 0.95), torch.randn(256, 1, 2, 2)
    exact = flow_matching_loss(gaussian_velocity(mu, 1e-8), x, t, eps)
    wrong = flow_matching_loss(gaussian_velocity(-mu, 1e-8), x, t, eps)
    assert exact < 1e-6 < wrong
    weight = torch.zeros(256)
    assert flow_matching_loss(gaussian_velocity(-mu, 1e-8), x, t, eps, weight) == 0


def test_mix_velocities_weights_per_sample_and_skips_unused():
    a, b = torch.ones(2, 1, 2, 2), 3 * torch.ones(2, 1, 2, 2)
    w = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    out = mix_velocities([a, b], w)
    assert torch.allclose(out[0], a[0]) and torch.allclose(out[1], 2.5 * a[1])
    assert torch.equal(mix_velocities([a, None], torch.tensor([[1.0, 0.0], [1.0, 0.0]])), a)
    try:
        mix_velocities([a, None], w)
    except ValueError as exc:
        assert "not evaluated" in str(exc)
    else:
        raise AssertionError("a skipped teacher with weight must fail")
