"""Trajectory segmented consistency distillation (TSCD, from Hyper-SD) in BAGEL's flow time.

The time axis [0, 1] is cut into segments at descending edges (1 = noise, 0 = data). A point x_t of a
segment is mapped by the student, in one Euler step, to the segment's lower edge. The target for that
jump is built from the teacher: a few teacher Euler steps from t towards the edge, then a jump of a
frozen copy of the student (no-grad or EMA) over the rest of the way, so the student learns to agree with
the teacher's trajectory over whole segments. With 3 segments and 2 steps per segment the student then
samples in 6 steps. Losses (adversarial, MSE, Huber) are chosen by the stage; this module holds the
time geometry and the target construction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hyperbagel.backbone.flow import euler_sample, shift_timesteps

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
CONSISTENCY_LOSSES = ("mse", "huber")


def euler_jump(
    x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float, s: torch.Tensor | float
) -> torch.Tensor:
    """One Euler step of the flow ODE from time t to time s: `x_t - (t - s) * v` (s = t returns x_t)."""
    dt = torch.as_tensor(t, dtype=torch.float32) - torch.as_tensor(s, dtype=torch.float32)
    return (x_t - dt.to(x_t.device) * v).to(x_t.dtype)


@dataclass
class Segments:
    """Edges strictly descending from 1.0 to 0.0; segment k is the interval (edges[k+1], edges[k]]."""

    edges: Sequence[float]

    def __post_init__(self) -> None:
        edges = [float(e) for e in self.edges]
        if len(edges) < 2 or edges[0] != 1.0 or edges[-1] != 0.0:
            raise ValueError(f"segment edges must run from 1.0 down to 0.0, got {edges}")
        if any(a <= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"segment edges must be strictly descending, got {edges}")
        self.edges = edges

    @classmethod
    def uniform(cls, num_segments: int, shift: float = 1.0) -> Segments:
        """`num_segments` equal segments of the shifted sampling grid (shift 3 matches BAGEL's sampler)."""
        if num_segments < 1:
            raise ValueError(f"num_segments must be at least 1, got {num_segments}")
        grid = shift_timesteps(torch.linspace(1.0, 0.0, num_segments + 1, dtype=torch.float64), shift)
        return cls([round(float(e), 6) for e in grid])

    @property
    def num_segments(self) -> int:
        return len(self.edges) - 1

    def index(self, t: float) -> int:
        """The segment holding t (an edge belongs to the segment below it; t = 0 to the last one)."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"flow time must lie in [0, 1], got {t}")
        return next((k for k in range(self.num_segments) if t > self.edges[k + 1]), self.num_segments - 1)

    def bounds(self, index: int) -> tuple[float, float]:
        """(lower, upper) edge of segment `index`."""
        return self.edges[index + 1], self.edges[index]

    def sample(self, generator: torch.Generator | None = None) -> tuple[float, int]:
        """A training time: a segment drawn uniformly, then t uniform in (lower, upper]; (t, segment)."""
        draws = torch.rand(2, generator=generator, dtype=torch.float64)
        index = min(int(draws[0] * self.num_segments), self.num_segments - 1)
        lower, upper = self.bounds(index)
        return upper - float(draws[1]) * (upper - lower), index


def consistency_target(
    teacher: Velocity,
    target_student: Velocity,
    x_t: torch.Tensor,
    t: float,
    lower: float,
    teacher_span: float,
    teacher_steps: int = 1,
) -> torch.Tensor:
    """Where the teacher's trajectory through x_t meets the segment's lower edge, as seen by the target.

    The teacher integrates from t to `t_mid = max(lower, t - teacher_span)` in `teacher_steps` Euler
    steps; `target_student` (a frozen copy of the student) jumps from t_mid to `lower` in one. With
    `teacher_span >= t - lower` the target is the teacher's own solution and the student is not used.
    Call under `torch.no_grad()`: a target carries no gradient.
    """
    if not lower <= t:
        raise ValueError(f"time {t} lies below its segment's lower edge {lower}")
    if teacher_span <= 0 or teacher_steps < 1:
        raise ValueError(
            f"teacher_span must be > 0 and teacher_steps >= 1, got {teacher_span}, {teacher_steps}"
        )
    t_mid = max(lower, t - teacher_span)
    if t_mid >= t:
        return x_t
    grid = torch.linspace(t, t_mid, teacher_steps + 1, dtype=torch.float32)
    x_mid = euler_sample(lambda x, tt, i: teacher(x, tt), x_t, grid)
    if t_mid == lower:
        return x_mid
    t_mid_tensor = torch.tensor(t_mid, dtype=torch.float32)
    return euler_jump(x_mid, target_student(x_mid, t_mid_tensor), t_mid, lower)


def consistency_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    kind: str,
    huber_delta: float = 0.1,
    per_sample: bool = False,
) -> torch.Tensor:
    """Mean squared error or Huber loss (quadratic below `huber_delta`, linear above), in float32; with
    `per_sample`, one mean per sample [B] (for task weights)."""
    if kind not in CONSISTENCY_LOSSES:
        raise ValueError(f"consistency loss must be one of {CONSISTENCY_LOSSES}, got {kind!r}")
    prediction, target = prediction.float(), target.float()
    if kind == "mse":
        elementwise = F.mse_loss(prediction, target, reduction="none")
    else:
        elementwise = F.huber_loss(prediction, target, reduction="none", delta=huber_delta)
    return elementwise.flatten(1).mean(dim=1) if per_sample else elementwise.mean()


@dataclass
class LinearRamp:
    """A loss weight that moves linearly from `start` to `end` over the first `steps` optimizer steps,
    then stays at `end` (Hyper-SD style schedules of the consistency / adversarial mix)."""

    start: float
    end: float | None = None
    steps: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"ramp steps must be >= 0, got {self.steps}")

    def __call__(self, step: int) -> float:
        if self.end is None or self.steps == 0:
            return self.start if self.end is None else self.end
        progress = min(1.0, max(0, step) / self.steps)
        return self.start + (self.end - self.start) * progress
