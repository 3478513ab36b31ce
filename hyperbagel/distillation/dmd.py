"""Distribution matching distillation along the student's own ODE trajectory (DMDO).

DMD (DMD2) moves a few-step generator's samples along the difference of two denoisers: the teacher's ("real")
and one trained on the generator's own samples ("fake"). DMDO keeps the generator an ODE sampler: the
student's 6-step ODE trajectory (Euler, or the solver it is deployed with) from noise x_T is rolled once and
stored; the fake model learns the velocity `x_T - x_0` on straight interpolations between x_T and the
trajectory's end x_0; the generator re-runs one stored step with gradients, interpolates its x0 prediction
with the same x_T at a fresh time, and follows the DMD gradient there. The SDE-style variant (standard DMD /
consistency multistep sampling) re-noises every step and every interpolation with fresh noise instead.

Conventions are BAGEL's (`hyperbagel.backbone.flow`): `x_t = (1 - t) x0 + t eps`, `v = eps - x0`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyperbagel.backbone.flow import add_noise, predict_x0, solve, velocity_target

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]
TRAJECTORY_MODES = ("ode", "sde")


@dataclass
class Trajectory:
    """A stored student rollout: `states[i]` is the input of step i at `timesteps[i]`, `x0[i]` its clean
    prediction; `sample` is the end point; `noise` the starting x_T. All detached."""

    noise: torch.Tensor
    timesteps: torch.Tensor
    states: list[torch.Tensor]
    x0: list[torch.Tensor]
    sample: torch.Tensor
    mode: str

    @property
    def num_steps(self) -> int:
        return len(self.states)


@torch.no_grad()
def roll_trajectory(
    velocity: Velocity,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    mode: str = "ode",
    fresh_noise: NoiseFn | None = None,
    solver: str = "euler",
) -> Trajectory:
    """Run the student from `noise` over `timesteps` (1 -> 0) and keep every step's input and x0.

    "ode": the ODE solver's steps (`flow.solve`: Euler `x <- x - (t_i - t_{i+1}) v`, or UniPC, whose
    stored inputs are the states its velocities are computed at). "sde": `x <- (1 - t_{i+1}) x0_i +
    t_{i+1} eps` with `eps = fresh_noise(x)` drawn anew at every step (no solver).
    """
    if mode not in TRAJECTORY_MODES:
        raise ValueError(f"trajectory mode must be one of {TRAJECTORY_MODES}, got {mode!r}")
    if mode == "sde" and fresh_noise is None:
        raise ValueError("an SDE-style trajectory needs fresh_noise")
    if mode == "sde" and solver != "euler":
        raise ValueError(f"an SDE-style trajectory re-noises each step: no ODE solver, got {solver!r}")
    grid = timesteps.to(torch.float32)
    if grid.ndim != 1 or grid.numel() < 2 or float(grid[-1]) != 0.0:
        raise ValueError(f"timesteps must be a 1-D grid ending at 0, got {grid.tolist()}")
    states, x0s = [], []

    def keep(i: int, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> None:
        states.append(x)
        x0s.append(predict_x0(x, v, t))

    if mode == "ode":
        x = solve(solver, lambda x, t, i: velocity(x, t), noise, grid, keep)
    else:
        x = noise
        for i in range(grid.numel() - 1):
            keep(i, grid[i], x, velocity(x, grid[i]))
            x = add_noise(x0s[-1], fresh_noise(x), grid[i + 1])
    return Trajectory(noise=noise, timesteps=grid, states=states, x0=x0s, sample=x, mode=mode)


def rerun_step(velocity: Velocity, trajectory: Trajectory, index: int) -> torch.Tensor:
    """The student's x0 prediction of stored step `index`, recomputed with gradients."""
    if not 0 <= index < trajectory.num_steps:
        raise IndexError(f"step {index} is not in a {trajectory.num_steps}-step trajectory")
    x, t = trajectory.states[index], trajectory.timesteps[index]
    return predict_x0(x, velocity(x, t), t)


def fake_score_loss(v_fake: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The fake model's regression: velocity `noise - x0` (x_T - x_0) at an interpolation of the two."""
    return F.mse_loss(v_fake.float(), velocity_target(x0, noise).float())


def dmd_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's gradient `(x0_fake - x0_real) / mean|x - x0_real|` (mean over each sample), NaN-free.

    `x` is the generator's clean sample; stepping `x - grad` moves it toward the real distribution.
    """
    x, x0_real, x0_fake = x.detach().float(), x0_real.detach().float(), x0_fake.detach().float()
    dims = tuple(range(1, x.ndim))
    scale = (x - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / scale)


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """`0.5 * MSE(x, stopgrad(x - grad))`: its gradient with respect to x is `grad / x.numel()`."""
    grad = dmd_gradient(x, x0_real, x0_fake)
    return 0.5 * F.mse_loss(x.float(), (x.detach().float() - grad))
