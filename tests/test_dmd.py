"""DMD gradient on Gaussians whose scores are known in closed form; stored-trajectory reuse."""

import pytest
import torch
from torch import nn

from hyperbagel.backbone.flow import add_noise, predict_x0, sampling_schedule
from hyperbagel.distillation.dmd import dmd_gradient, dmd_loss, fake_score_loss, rerun_step, roll_trajectory


def gaussian_velocity(mean: torch.Tensor | float, std: float):
    """Exact flow velocity of data N(mean, std^2 I) under `x_t = (1 - t) x0 + t eps`.

    E[x0 | x_t] = mean + (1 - t) std^2 / ((1 - t)^2 std^2 + t^2) * (x_t - (1 - t) mean),
    v = (x_t - E[x0 | x_t]) / t.
    """

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = float(t)
        gain = (1 - t) * std**2 / ((1 - t) ** 2 * std**2 + t**2)
        x0 = mean + gain * (x - (1 - t) * mean)
        return (x - x0) / t

    return velocity


def test_dmd_gradient_sign_and_per_sample_normalisation() -> None:
    torch.manual_seed(0)
    real, fake = gaussian_velocity(0.0, 1.0), gaussian_velocity(2.0, 1.0)
    x = torch.stack([torch.randn(4, 3) + 2.0, 10 * torch.randn(4, 3) + 2.0])  # two samples, two scales
    t = torch.tensor(0.5)
    x_t = add_noise(x, torch.randn_like(x), t)
    x0_real, x0_fake = predict_x0(x_t, real(x_t, t), t), predict_x0(x_t, fake(x_t, t), t)
    # equal variances: x0_fake - x0_real = (2 - 0) * t^2 / ((1-t)^2 + t^2) = 1 everywhere
    assert torch.allclose(x0_fake - x0_real, torch.ones_like(x), atol=1e-5)
    grad = dmd_gradient(x, x0_real, x0_fake)
    for b in range(2):
        scale = float((x[b] - x0_real[b]).abs().mean())
        assert torch.allclose(grad[b], torch.full_like(x[b], 1.0 / scale), rtol=1e-5)
    assert bool((grad > 0).all())  # x - grad moves toward the real mean 0 ...
    assert float(grad[1].mean()) < float(grad[0].mean())  # ... by less where the sample sits farther out


def test_dmd_loss_gradient_is_grad_over_numel() -> None:
    x = torch.randn(2, 5, 3, requires_grad=True)
    x0_real, x0_fake = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    dmd_loss(x, x0_real, x0_fake).backward()
    assert torch.allclose(x.grad, dmd_gradient(x, x0_real, x0_fake) / x.numel(), atol=1e-7)


def test_following_the_dmd_gradient_moves_a_generator_to_the_real_mean() -> None:
    """Generator x = z + b with a perfect fake score N(b, 1); real data N(-1, 1): b converges to -1."""
    torch.manual_seed(0)
    shift = nn.Parameter(torch.full((3,), 2.0))
    optimizer = torch.optim.Adam([shift], lr=0.05)
    real = gaussian_velocity(-1.0, 1.0)
    for _ in range(300):
        x = torch.randn(16, 8, 3) + shift
        t = torch.rand(()) * 0.96 + 0.02
        x_t = add_noise(x.detach(), torch.randn_like(x), t)
        fake = gaussian_velocity(shift.detach(), 1.0)
        loss = dmd_loss(x, predict_x0(x_t, real(x_t, t), t), predict_x0(x_t, fake(x_t, t), t))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.allclose(shift.detach(), torch.full((3,), -1.0), atol=0.15)


def test_fake_score_regresses_x_T_minus_x_0() -> None:
    x0, noise = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    assert float(fake_score_loss(noise - x0, noise, x0)) == 0.0
    assert float(fake_score_loss(noise, noise, x0)) == pytest.approx(float(x0.pow(2).mean()))


class LinearVelocity(nn.Module):
    """A deterministic student velocity with parameters: `x W + t c`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) * 0.3)
        self.time = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + t * self.time


def test_ode_trajectory_reuse_reruns_exactly_the_stored_step() -> None:
    torch.manual_seed(0)
    student = LinearVelocity(4)
    timesteps = sampling_schedule(7, 3.0)
    trajectory = roll_trajectory(student, torch.randn(2, 5, 4), timesteps)
    assert trajectory.num_steps == 6 and not trajectory.sample.requires_grad
    for i in range(6):
        x, t, t_next = trajectory.states[i], timesteps[i], timesteps[i + 1]
        with torch.no_grad():
            following = trajectory.states[i + 1] if i < 5 else trajectory.sample
            assert torch.equal(following, x - (t - t_next) * student(x, t))
        again = rerun_step(student, trajectory, i)
        assert again.requires_grad and torch.equal(again.detach(), trajectory.x0[i])
    assert torch.equal(trajectory.sample, trajectory.x0[-1])  # the last step lands on its x0 prediction
    rerun_step(student, trajectory, 3).sum().backward()
    assert student.weight.grad is not None and float(student.weight.grad.abs().sum()) > 0
    with pytest.raises(IndexError, match="step 6"):
        rerun_step(student, trajectory, 6)


def test_sde_trajectory_renoises_every_step_with_fresh_noise() -> None:
    torch.manual_seed(0)
    student = LinearVelocity(4)
    drawn = []

    def fresh(x):
        drawn.append(torch.randn_like(x))
        return drawn[-1]

    timesteps = sampling_schedule(4, 1.0)
    trajectory = roll_trajectory(student, torch.randn(1, 3, 4), timesteps, mode="sde", fresh_noise=fresh)
    assert len(drawn) == 3
    for i in range(2):
        expected = add_noise(trajectory.x0[i], drawn[i], timesteps[i + 1])
        assert torch.equal(trajectory.states[i + 1], expected)
    assert torch.equal(trajectory.sample, trajectory.x0[-1])  # t = 0: the fresh noise has no weight
    with pytest.raises(ValueError, match="fresh_noise"):
        roll_trajectory(student, torch.randn(1, 3, 4), timesteps, mode="sde")
