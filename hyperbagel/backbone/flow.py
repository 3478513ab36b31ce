"""BAGEL's flow-matching conventions, in one place.

Flow time runs from t = 1 (pure noise) to t = 0 (clean data): `x_t = (1 - t) * x0 + t * eps`, and the
network predicts the velocity `v = eps - x0`. Every stage (teacher sampling, CFG distillation,
trajectory distillation, one-step generators) reads time, noise, guidance and solver steps from here,
so a convention can only be wrong in one place. The CFG combination and its renormalisation follow
BAGEL's `_forward_flow` exactly, including which unconditional passes run at which time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import UniPCMultistepScheduler

TimeLike = torch.Tensor | float
VelocityFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]

RENORM_TYPES = ("global", "channel", "text_channel")


def shift_timesteps(t: TimeLike, shift: float) -> TimeLike:
    """Map t to `s*t / (1 + (s-1)*t)`; s > 1 spends more time near noise, fixes 0 and 1."""
    if shift <= 0:
        raise ValueError(f"timestep shift must be positive, got {shift}")
    return shift * t / (1 + (shift - 1) * t)


def sample_training_timesteps(
    n: int,
    shift: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    uniform_fraction: float = 0.0,
) -> torch.Tensor:
    """Draw n training times: logit-normal `sigmoid(N(0, 1))`, then shifted, as BAGEL trains.

    A large shift trains the high-noise steps where a scene is laid out but almost never the last,
    low-noise ones (at shift 6 under 0.1% of times fall below t = 0.2, where the default sampler spends
    ~8% of its steps). `uniform_fraction` of the times are instead drawn from U(0, 1), so every part of the
    sampler's path is trained; at 0 the draw is exactly BAGEL's (and uses the generator as before).
    """
    if not 0.0 <= uniform_fraction <= 1.0:
        raise ValueError(f"uniform_fraction must be in [0, 1], got {uniform_fraction}")
    logits = torch.randn(n, generator=generator, device=device)
    times = shift_timesteps(torch.sigmoid(logits), shift)
    if uniform_fraction == 0.0:
        return times
    uniform = torch.rand(n, generator=generator, device=device)
    use_uniform = torch.rand(n, generator=generator, device=device) < uniform_fraction
    return torch.where(use_uniform, uniform, times)


def _time_like(t: TimeLike, x: torch.Tensor) -> torch.Tensor:
    """t as a tensor broadcastable against x: leading dims of t match x's, trailing dims are added.

    Time is kept in at least float32 so that half-precision latents do not quantise it.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    t = torch.as_tensor(t, dtype=dtype, device=x.device)
    if t.ndim > x.ndim or tuple(t.shape) != tuple(x.shape[: t.ndim]):
        raise ValueError(
            f"time of shape {tuple(t.shape)} does not index the leading dims "
            f"of a tensor of shape {tuple(x.shape)}"
        )
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Point on the straight path at time t: `(1 - t) * x0 + t * noise` (t per sample or per token)."""
    tt = _time_like(t, x0)
    return ((1 - tt) * x0 + tt * noise).to(x0.dtype)


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity BAGEL regresses: it points from data to noise."""
    return noise - x0


def predict_x0(x_t: torch.Tensor, v: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Clean estimate from a velocity: `x_t - t * v` (what distillation losses compare)."""
    tt = _time_like(t, x_t)
    return (x_t - tt * v).to(x_t.dtype)


def predict_noise(x_t: torch.Tensor, v: torch.Tensor, t: TimeLike) -> torch.Tensor:
    """Noise estimate from a velocity: `x_t + (1 - t) * v` (used to re-noise an x0 estimate)."""
    tt = _time_like(t, x_t)
    return (x_t + (1 - tt) * v).to(x_t.dtype)


def sampling_schedule(
    num_timesteps: int, shift: float, device: torch.device | str | None = None
) -> torch.Tensor:
    """BAGEL's sampling grid: `shift(linspace(1, 0, num_timesteps))`, i.e. num_timesteps - 1 model steps."""
    if num_timesteps < 2:
        raise ValueError(f"a sampling grid needs at least 2 points (1 model step), got {num_timesteps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, num_timesteps, device=device), shift)


def _as_grid(
    timesteps: torch.Tensor | Sequence[float],
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A floating tensor grid keeps its dtype; a list becomes `dtype` (float32 like BAGEL's grid)."""
    if isinstance(timesteps, torch.Tensor) and timesteps.is_floating_point():
        grid = timesteps.to(device)
    else:
        grid = torch.as_tensor(timesteps, dtype=dtype, device=device)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"timesteps must be a 1-D grid of at least 2 points, got shape {tuple(grid.shape)}")
    return grid


def _velocity(velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
    """`velocity_fn(x, t, i)`, refused unless it has the state's shape (a solver would broadcast it)."""
    v = velocity_fn(x, t, i)
    if v.shape != x.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)} for a state of shape {tuple(x.shape)}")
    return v


def euler_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor | Sequence[float],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE with Euler steps over a grid running from its first to its last time.

    Each step calls `velocity_fn(x, t, i)` with t a 0-d tensor, optionally reports
    `callback(i, t, x, v)` with the state *at* t (so trajectories can be stored), then moves
    `x <- x - v * (t_i - t_{i+1})` as BAGEL does. Returns the state at the last grid time.
    """
    grid = _as_grid(timesteps, device=x.device, dtype=torch.promote_types(x.dtype, torch.float32))
    dts = grid[:-1] - grid[1:]
    for i in range(grid.numel() - 1):
        t = grid[i]
        v = _velocity(velocity_fn, x, t, i)
        if callback is not None:
            callback(i, t, x, v)
        x = x - v * dts[i]
    return x


def unipc_sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor | Sequence[float],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate the flow ODE with UniPC (diffusers' `UniPCMultistepScheduler`: second-order bh2
    predictor-corrector) over the same grid and with the same model calls as `euler_sample`, one a step.

    Why: a multistep solver reuses the velocities of earlier steps, so its higher order costs no forward;
    at the few steps of a distilled sampler that is where Euler's error lies. The grid must end at t = 0
    (the solver's last step is its clean-data estimate). The callback sees the state each velocity is
    computed at, as with Euler.
    """
    grid = _as_grid(timesteps, device=x.device)
    if float(grid[-1]) != 0.0:
        raise ValueError(f"the UniPC sampler integrates to t = 0: the grid ends at {float(grid[-1])}")
    scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    scheduler.set_timesteps(sigmas=grid[:-1].double().cpu().numpy(), device=x.device)
    scheduler.set_begin_index(0)  # count steps from the first, not by looking up its integer timestep
    for i, timestep in enumerate(scheduler.timesteps):
        v = _velocity(velocity_fn, x, grid[i], i)
        if callback is not None:
            callback(i, grid[i], x, v)
        x = scheduler.step(v.float(), timestep, x.float()).prev_sample.to(x.dtype)
    return x


SOLVERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler_sample, "unipc": unipc_sample}


def check_solver(solver: str, name: str = "solver") -> str:
    """`solver` if it names one of `SOLVERS`; `name` is the option the error names (so a config can be
    refused before any sampling)."""
    if solver not in SOLVERS:
        raise ValueError(f"{name} must be one of {tuple(SOLVERS)}, got {solver!r}")
    return solver


def solve(
    solver: str,
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor | Sequence[float],
    callback: StepCallback | None = None,
) -> torch.Tensor:
    """Integrate with the named solver ("euler", BAGEL's, or "unipc"); one model call per grid step."""
    return SOLVERS[check_solver(solver)](velocity_fn, x, timesteps, callback)


@dataclass
class CFGConfig:
    """BAGEL's classifier-free guidance settings.

    Guidance is active while `interval[0] < t <= interval[1]`; outside it only the conditional pass
    runs and nothing is renormalised. A pass whose scale is <= 1 is skipped, as in BAGEL.
    """

    text_scale: float = 4.0
    img_scale: float = 1.0
    interval: tuple[float, float] = (0.4, 1.0)
    renorm_type: str = "global"
    renorm_min: float = 0.0

    def __post_init__(self) -> None:
        if self.renorm_type not in RENORM_TYPES:
            raise ValueError(f"cfg renorm_type must be one of {RENORM_TYPES}, got {self.renorm_type!r}")
        if len(self.interval) != 2:
            raise ValueError(f"cfg interval must be (low, high), got {self.interval!r}")
        self.interval = (float(self.interval[0]), float(self.interval[1]))
        low, high = self.interval
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"cfg interval must satisfy 0 <= low < high <= 1, got {self.interval}")
        if not 0.0 <= self.renorm_min <= 1.0:
            raise ValueError(f"cfg renorm_min must lie in [0, 1], got {self.renorm_min}")

    def active(self, t: TimeLike) -> bool:
        """Whether guidance applies at t (a tensor t is compared in its own dtype, as BAGEL does)."""
        low, high = self.interval
        return bool((t > low) & (t <= high))

    def needs_text_uncond(self, t: TimeLike) -> bool:
        """Whether the pass without the last text runs at t."""
        return self.active(t) and self.text_scale > 1.0

    def needs_img_uncond(self, t: TimeLike) -> bool:
        """Whether the pass without the input image runs at t (BAGEL runs it whenever img_scale > 1)."""
        return self.active(t) and self.img_scale > 1.0

    def passes_per_step(self, t: TimeLike) -> int:
        """Model evaluations one sampling step at t costs: conditional plus the unconditional ones."""
        return 1 + int(self.needs_text_uncond(t)) + int(self.needs_img_uncond(t))


def count_nfe(timesteps: torch.Tensor | Sequence[float], cfg: CFGConfig) -> int:
    """Model evaluations of an Euler run over the grid (every point but the last is a step)."""
    grid = _as_grid(timesteps)
    return sum(cfg.passes_per_step(t) for t in grid[:-1])


def _renorm_scale(
    reference: torch.Tensor, guided: torch.Tensor, per_token: bool, renorm_min: float
) -> torch.Tensor:
    """`clamp(|reference| / |guided|, renorm_min, 1)`, per token or over each sample's whole latent."""
    dims = (-1,) if per_token else tuple(range(1, reference.ndim))
    norm_ref = torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
    norm_guided = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
    return (norm_ref / (norm_guided + 1e-8)).clamp(min=renorm_min, max=1.0)


def cfg_combine(
    v_cond: torch.Tensor,
    v_no_text: torch.Tensor | None,
    v_no_img: torch.Tensor | None,
    cfg: CFGConfig,
    t: TimeLike,
) -> torch.Tensor:
    """BAGEL's guided velocity from the conditional and unconditional passes, all shaped [B, N, C].

    "global" renorm uses each sample's norm over all its tokens and channels (BAGEL only runs
    batch 1, where this is its whole-latent norm); "channel" and "text_channel" use per-token norms.
    """
    if v_cond.ndim != 3:
        raise ValueError(f"velocities must be shaped [batch, tokens, channels], got {tuple(v_cond.shape)}")
    if not cfg.needs_text_uncond(t):
        return v_cond
    if v_no_text is None:
        raise ValueError("text CFG is active at this time but v_no_text is None")
    use_img = cfg.needs_img_uncond(t)
    if use_img and v_no_img is None:
        raise ValueError("image CFG is active at this time (img_scale > 1) but v_no_img is None")

    v_text = v_no_text + cfg.text_scale * (v_cond - v_no_text)
    if cfg.renorm_type == "text_channel":
        v_text = v_text * _renorm_scale(v_cond, v_text, per_token=True, renorm_min=cfg.renorm_min)
        if use_img:
            return v_no_img + cfg.img_scale * (v_text - v_no_img)
        return v_text

    guided = v_no_img + cfg.img_scale * (v_text - v_no_img) if use_img else v_text
    per_token = cfg.renorm_type == "channel"
    return guided * _renorm_scale(v_cond, guided, per_token=per_token, renorm_min=cfg.renorm_min)
