"""Tests of the flow conventions against diffusers' flow-matching scheduler and hand-computed numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from hyperbagel.backbone.flow import (
    CFGConfig,
    add_noise,
    cfg_combine,
    count_nfe,
    euler_sample,
    predict_noise,
    predict_x0,
    sample_training_timesteps,
    sampling_schedule,
    shift_timesteps,
    solve,
    unipc_sample,
    velocity_target,
)


def diffusers_sigmas(num_timesteps: int, shift: float) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_timesteps)[:-1])
    return scheduler.sigmas


# ---------------------------------------------------------------- timestep shift and schedules


@pytest.mark.parametrize(("num_timesteps", "shift"), [(50, 3.0), (50, 1.0), (7, 4.0), (2, 3.0), (13, 0.5)])
def test_sampling_schedule_matches_diffusers_sigmas(num_timesteps: int, shift: float) -> None:
    ours = sampling_schedule(num_timesteps, shift)
    reference = diffusers_sigmas(num_timesteps, shift)
    assert ours.shape == (num_timesteps,)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)


def test_shift_one_is_identity_and_shift_fixes_endpoints_and_keeps_order() -> None:
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(shift_timesteps(t, 1.0), t)
    for shift in (0.5, 3.0, 4.0):
        shifted = shift_timesteps(t, shift)
        assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0
        assert torch.all(shifted[1:] > shifted[:-1])
    # hand value: 3 * 0.5 / (1 + 2 * 0.5) = 0.75
    assert shift_timesteps(0.5, 3.0) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="positive"):
        shift_timesteps(t, 0.0)


def test_sampling_schedule_rejects_a_single_point() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        sampling_schedule(1, 3.0)


# ---------------------------------------------------------------- noising and predictions


def test_add_noise_per_sample_and_per_token() -> None:
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    t = torch.tensor([0.25, 0.9])
    x_t = add_noise(x0, noise, t)
    for b, tb in enumerate((0.25, 0.9)):
        torch.testing.assert_close(x_t[b], (1 - tb) * x0[b] + tb * noise[b])

    packed_x0, packed_noise = x0[0], noise[0]  # [N, C] packed tokens, one time per token
    t_tok = torch.tensor([0.0, 0.5, 1.0])
    x_tok = add_noise(packed_x0, packed_noise, t_tok)
    torch.testing.assert_close(x_tok[0], packed_x0[0])
    torch.testing.assert_close(x_tok[1], 0.5 * packed_x0[1] + 0.5 * packed_noise[1])
    torch.testing.assert_close(x_tok[2], packed_noise[2])

    with pytest.raises(ValueError, match="leading dims"):
        add_noise(x0, noise, torch.tensor([0.1, 0.2, 0.3]))


def test_add_noise_keeps_dtype() -> None:
    x0 = torch.ones(2, 3, dtype=torch.bfloat16)
    out = add_noise(x0, torch.zeros_like(x0), torch.tensor([0.5, 0.75]))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out[:, 0], torch.tensor([0.5, 0.25], dtype=torch.bfloat16))


def test_velocity_and_predictions_recover_data_and_noise() -> None:
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    noise = torch.randn(3, 5, 2, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.97], dtype=torch.float64)
    v = velocity_target(x0, noise)
    torch.testing.assert_close(v, noise - x0)
    x_t = add_noise(x0, noise, t)
    torch.testing.assert_close(predict_x0(x_t, v, t), x0)
    torch.testing.assert_close(predict_noise(x_t, v, t), noise)


# ---------------------------------------------------------------- Euler sampler


def test_euler_constant_velocity_lands_on_straight_line() -> None:
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    v = torch.tensor([[0.5, 3.0]], dtype=torch.float64)
    grid = [0.9, 0.7, 0.2, 0.05]
    out = euler_sample(lambda x_, t, i: v, x, grid)
    torch.testing.assert_close(out, x - v * (0.9 - 0.05), atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "grid",
    [
        sampling_schedule(50, 3.0).double(),
        torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64),
        torch.tensor([0.7, 0.69, 0.3, 0.0], dtype=torch.float64),
    ],
)
def test_euler_exact_velocity_recovers_data(grid: torch.Tensor) -> None:
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, generator=gen, dtype=torch.float64)
    start = add_noise(x0, eps, grid[0].expand(2))

    # the straight path's own velocity, constant along the path
    out = euler_sample(lambda x, t, i: eps - x0, start, grid)
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)

    # the marginal velocity of a point mass at x0, which depends on the state: (x - x0) / t
    out = euler_sample(lambda x, t, i: (x - x0) / t, start, grid)
    torch.testing.assert_close(out, x0, atol=1e-10, rtol=0)


def test_euler_matches_diffusers_scheduler_step_and_reports_trajectory() -> None:
    num_timesteps, shift = 12, 3.0
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_timesteps)[:-1])

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(3 * x) + t

    gen = torch.Generator().manual_seed(3)
    start = torch.randn(1, 6, 4, generator=gen)
    reference = start.clone()
    for i, timestep in enumerate(scheduler.timesteps):
        reference = scheduler.step(velocity(reference, scheduler.sigmas[i]), timestep, reference).prev_sample

    steps: list[tuple[int, float]] = []
    states: list[torch.Tensor] = []

    def record(i: int, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> None:
        steps.append((i, t.item()))
        states.append(x)

    ours = euler_sample(lambda x, t, i: velocity(x, t), start, scheduler.sigmas, callback=record)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    assert [i for i, _ in steps] == list(range(num_timesteps - 1))
    assert [t for _, t in steps] == pytest.approx(scheduler.sigmas[:-1].tolist())
    torch.testing.assert_close(states[0], start)

    # one step on its own, bit for bit against diffusers
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_timesteps)[:-1])
    one = scheduler.step(velocity(start, scheduler.sigmas[0]), scheduler.timesteps[0], start).prev_sample
    ours_one = euler_sample(lambda x, t, i: velocity(x, t), start, scheduler.sigmas[:2])
    torch.testing.assert_close(ours_one, one, atol=0, rtol=0)


def gaussian_velocity(mean: float, std: float):
    """The exact flow velocity E[eps - x0 | x_t = x] for data x0 ~ N(mean, std^2): its ODE maps noise eps to
    mean + std * eps, so a sampler's error is known exactly."""

    def velocity(x: torch.Tensor, t: torch.Tensor, i: int) -> torch.Tensor:
        t = t.double()
        centre = (1 - t) * mean
        variance = (1 - t) ** 2 * std**2 + t**2
        return (t - (1 - t) * std**2) / variance * (x - centre) - mean

    return velocity


def test_unipc_is_nearer_the_exact_solution_than_euler_at_few_steps() -> None:
    """Both on BAGEL's shift-3 grid; Euler's error halves with each doubling of the steps (first order),
    UniPC's falls faster (its first and last steps are first order, so not at second order's rate)."""
    noise = torch.randn(4, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = 0.5 + 0.8 * noise
    velocity = gaussian_velocity(0.5, 0.8)

    def error(solver: str, steps: int) -> float:
        return float((solve(solver, velocity, noise, sampling_schedule(steps + 1, 3.0)) - exact).abs().max())

    euler, unipc = [error("euler", n) for n in (6, 12, 24)], [error("unipc", n) for n in (6, 12, 24)]
    assert all(u < e for u, e in zip(unipc, euler))
    assert euler[2] > 0.2 and unipc[1] < 0.25 * euler[1] and unipc[2] < 0.1 * euler[2]


def test_unipc_follows_a_straight_path_exactly_with_one_call_a_step() -> None:
    """Point-mass data: the velocity is constant along the path, so every step lands on it."""
    x0, eps = torch.full((1, 3, 2), 0.5), torch.randn(1, 3, 2, generator=torch.Generator().manual_seed(1))
    grid = sampling_schedule(7, 3.0)
    seen: list[tuple[int, float]] = []

    def record(i: int, t: torch.Tensor, x: torch.Tensor, v: torch.Tensor) -> None:
        seen.append((i, t.item()))
        torch.testing.assert_close(x, add_noise(x0, eps, t), atol=1e-5, rtol=0)

    out = unipc_sample(lambda x, t, i: (x - x0) / t, eps, grid, callback=record)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert seen == [(i, pytest.approx(t)) for i, t in enumerate(grid[:-1].tolist())]


def test_solvers_reject_bad_input() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="solver must be one of"):
        solve("heun", lambda x_, t, i: x_, x, [1.0, 0.0])
    with pytest.raises(ValueError, match="integrates to t = 0"):
        unipc_sample(lambda x_, t, i: x_, x, [1.0, 0.5])
    with pytest.raises(ValueError, match="velocity_fn returned shape"):
        unipc_sample(lambda x_, t, i: x_[:, :1], x, [1.0, 0.0])


def test_euler_rejects_bad_grid_and_bad_velocity_shape() -> None:
    x = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="1-D grid"):
        euler_sample(lambda x_, t, i: x_, x, [1.0])
    with pytest.raises(ValueError, match="velocity_fn returned shape"):
        euler_sample(lambda x_, t, i: x_[:, :1], x, [1.0, 0.0])


# ---------------------------------------------------------------- CFG combination, hand-computed
# Two tokens, two channels, text scale 4 => v_text = 4 * v_cond - 3 * v_no_text.
#   token 1: v_cond = [3, 4] (|.| = 5), v_no_text = [0, 0]  -> v_text = [12, 16] (|.| = 20)
#   token 2: v_cond = [0, 0] (|.| = 0), v_no_text = [-5, 0] -> v_text = [15, 0]  (|.| = 15)
#   whole sample: |v_cond| = 5, |v_text| = sqrt(400 + 225) = 25

V_COND = torch.tensor([[[3.0, 4.0], [0.0, 0.0]]])
V_NO_TEXT = torch.tensor([[[0.0, 0.0], [-5.0, 0.0]]])
# image scale 2 => v = 2 * v_text - v_no_img
#   token 1: 2 * [12, 16] - [24, 24] = [0, 8];  token 2: 2 * [15, 0] - [24, 0] = [6, 0];  |v| = 10
V_NO_IMG = torch.tensor([[[24.0, 24.0], [24.0, 0.0]]])


def cfg(**kwargs: object) -> CFGConfig:
    return CFGConfig(**{"text_scale": 4.0, "img_scale": 1.0, "interval": (0.4, 1.0), **kwargs})


def test_cfg_global_text_only() -> None:
    # scale = 5 / 25 = 0.2
    out = cfg_combine(V_COND, V_NO_TEXT, None, cfg(renorm_type="global"), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[2.4, 3.2], [3.0, 0.0]]]))


def test_cfg_channel_text_only() -> None:
    # token 1: 5 / 20 = 0.25 -> [3, 4];  token 2: 0 / 15 = 0 -> [0, 0]
    out = cfg_combine(V_COND, V_NO_TEXT, None, cfg(renorm_type="channel"), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]))


def test_cfg_renorm_min_clamps_from_below() -> None:
    # every scale above (0.2, 0.25, 0) is raised to 0.5: v_text * 0.5
    expected = torch.tensor([[[6.0, 8.0], [7.5, 0.0]]])
    for renorm_type in ("global", "channel"):
        out = cfg_combine(V_COND, V_NO_TEXT, None, cfg(renorm_type=renorm_type, renorm_min=0.5), 0.5)
        torch.testing.assert_close(out, expected)


def test_cfg_renorm_never_amplifies() -> None:
    # v_text = 4 * [3, 4] - 3 * [4, 4] = [0, 4], |.| = 4 < 5 -> scale clamped to 1
    out = cfg_combine(torch.tensor([[[3.0, 4.0]]]), torch.tensor([[[4.0, 4.0]]]), None, cfg(), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 4.0]]]))


def test_cfg_global_and_channel_with_image_guidance() -> None:
    # global: |v| = 10 -> scale 5 / 10 = 0.5 -> [[0, 4], [3, 0]]
    out = cfg_combine(V_COND, V_NO_TEXT, V_NO_IMG, cfg(img_scale=2.0, renorm_type="global"), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 4.0], [3.0, 0.0]]]))
    # channel: token 1 5 / 8 -> [0, 5]; token 2 0 / 6 -> [0, 0]
    out = cfg_combine(V_COND, V_NO_TEXT, V_NO_IMG, cfg(img_scale=2.0, renorm_type="channel"), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[0.0, 5.0], [0.0, 0.0]]]))


def test_cfg_text_channel_renorms_before_image_guidance() -> None:
    # text renorm per token: [12, 16] * 0.25 = [3, 4]; [15, 0] * 0 = [0, 0]
    out = cfg_combine(V_COND, V_NO_TEXT, None, cfg(renorm_type="text_channel"), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[3.0, 4.0], [0.0, 0.0]]]))
    # then image guidance, no renorm: 2 * [3, 4] - [1, 1] = [5, 7]; 2 * [0, 0] - [1, -2] = [-1, 2]
    v_no_img = torch.tensor([[[1.0, 1.0], [1.0, -2.0]]])
    out = cfg_combine(V_COND, V_NO_TEXT, v_no_img, cfg(img_scale=2.0, renorm_type="text_channel"), 0.5)
    torch.testing.assert_close(out, torch.tensor([[[5.0, 7.0], [-1.0, 2.0]]]))


def test_cfg_image_scale_at_most_one_ignores_image_pass() -> None:
    garbage = torch.full_like(V_COND, 1e3)
    for img_scale in (1.0, 0.5):
        out = cfg_combine(V_COND, V_NO_TEXT, garbage, cfg(img_scale=img_scale), 0.5)
        torch.testing.assert_close(out, torch.tensor([[[2.4, 3.2], [3.0, 0.0]]]))


def test_cfg_interval_edges_and_text_scale_gate() -> None:
    config = cfg(img_scale=2.0)
    for t in (0.4, torch.tensor(0.4), 0.2, 0.0):  # t == interval[0] is outside
        assert cfg_combine(V_COND, None, None, config, t) is V_COND
    for t in (1.0, torch.tensor(1.0), 0.41):  # t == interval[1] is inside
        out = cfg_combine(V_COND, V_NO_TEXT, V_NO_IMG, config, t)
        torch.testing.assert_close(out, torch.tensor([[[0.0, 4.0], [3.0, 0.0]]]))
    # BAGEL computes guidance only under text scale > 1, even with image scale > 1
    no_text = cfg(text_scale=1.0, img_scale=2.0)
    assert cfg_combine(V_COND, V_NO_TEXT, V_NO_IMG, no_text, 0.5) is V_COND


def test_cfg_global_renorm_is_per_sample() -> None:
    # sample 2: v_cond = [[6, 8], [0, 0]] (|.| = 10), v_no_text = 0 -> v_text = [[24, 32], [0, 0]] (|.| = 40)
    # scale 10 / 40 = 0.25 -> [[6, 8], [0, 0]]; sample 1 as in test_cfg_global_text_only.
    v_cond = torch.cat([V_COND, torch.tensor([[[6.0, 8.0], [0.0, 0.0]]])])
    v_no_text = torch.cat([V_NO_TEXT, torch.zeros(1, 2, 2)])
    out = cfg_combine(v_cond, v_no_text, None, cfg(renorm_type="global"), torch.tensor(0.7))
    expected = torch.tensor([[[2.4, 3.2], [3.0, 0.0]], [[6.0, 8.0], [0.0, 0.0]]])
    torch.testing.assert_close(out, expected)


def test_cfg_missing_pass_and_bad_shape_raise() -> None:
    with pytest.raises(ValueError, match="v_no_text"):
        cfg_combine(V_COND, None, None, cfg(), 0.5)
    with pytest.raises(ValueError, match="v_no_img"):
        cfg_combine(V_COND, V_NO_TEXT, None, cfg(img_scale=2.0), 0.5)
    with pytest.raises(ValueError, match="batch, tokens, channels"):
        cfg_combine(V_COND[0], V_NO_TEXT[0], None, cfg(), 0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"renorm_type": "token"}, "renorm_type"),
        ({"interval": (0.5, 0.4)}, "interval"),
        ({"interval": (0.0, 1.5)}, "interval"),
        ({"interval": (0.4,)}, "interval"),
        ({"renorm_min": 2.0}, "renorm_min"),
    ],
)
def test_cfg_config_validation(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CFGConfig(**kwargs)


def test_cfg_config_accepts_list_interval_from_yaml() -> None:
    assert CFGConfig(interval=[0.0, 1.0]).interval == (0.0, 1.0)


# ---------------------------------------------------------------- NFE accounting


def test_passes_per_step() -> None:
    edit = CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.4, 1.0))
    assert [edit.passes_per_step(t) for t in (1.0, 0.5, 0.4, 0.1)] == [3, 3, 1, 1]
    assert CFGConfig(text_scale=4.0, img_scale=1.0).passes_per_step(0.5) == 2
    assert CFGConfig(text_scale=1.0, img_scale=1.0).passes_per_step(0.5) == 1


def test_count_nfe_bagel_defaults() -> None:
    grid = sampling_schedule(50, 3.0)
    t2i = CFGConfig(text_scale=4.0, img_scale=1.0, interval=(0.0, 1.0))
    assert count_nfe(grid, t2i) == 98  # 49 model steps x 2 passes

    edit = CFGConfig(text_scale=4.0, img_scale=2.0, interval=(0.4, 1.0), renorm_type="text_channel")
    linear = np.linspace(1.0, 0.0, 50)
    shifted = 3.0 * linear / (1.0 + 2.0 * linear)
    k = int(np.sum(shifted[:-1] > 0.4))
    # t > 0.4  <=>  u > 0.4 / 2.2 = 0.1818 with u = 1 - i/49  <=>  i <= 40: 41 guided steps
    assert k == 41
    assert count_nfe(grid, edit) == 3 * k + (49 - k) == 131
    assert count_nfe(grid.tolist(), edit) == 131


# ---------------------------------------------------------------- training timesteps


def test_logit_normal_training_timesteps() -> None:
    n = 20000
    t = sample_training_timesteps(n, 1.0, generator=torch.Generator().manual_seed(4))
    assert t.shape == (n,) and torch.all((t > 0) & (t < 1))
    logits = torch.logit(t.double())
    assert abs(logits.mean().item()) < 0.05
    assert abs(logits.std().item() - 1.0) < 0.05

    shifted = sample_training_timesteps(n, 3.0, generator=torch.Generator().manual_seed(4))
    assert torch.all(shifted >= t)
    # the median of sigmoid(N(0, 1)) is 0.5, which shift 3 maps to 1.5 / 2 = 0.75
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)
    assert shifted.mean().item() > t.mean().item() + 0.1


def test_uniform_time_fraction_trains_the_low_noise_end() -> None:
    n = 20000
    shifted = sample_training_timesteps(n, 6.0, generator=torch.Generator().manual_seed(4))
    mixed = sample_training_timesteps(
        n, 6.0, generator=torch.Generator().manual_seed(4), uniform_fraction=0.25
    )
    # shift 6 alone almost never trains below t = 0.2; a quarter uniform puts ~0.25 * 0.2 = 5% there
    assert (shifted < 0.2).float().mean().item() < 0.002
    assert (mixed < 0.2).float().mean().item() == pytest.approx(0.05, abs=0.01)
    assert torch.all((mixed >= 0) & (mixed <= 1))
    # fraction 0 is BAGEL's draw, unchanged; fraction 1 is uniform
    torch.testing.assert_close(
        sample_training_timesteps(n, 6.0, generator=torch.Generator().manual_seed(4), uniform_fraction=0.0),
        shifted,
    )
    uniform = sample_training_timesteps(
        n, 6.0, generator=torch.Generator().manual_seed(4), uniform_fraction=1.0
    )
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    with pytest.raises(ValueError, match="uniform_fraction"):
        sample_training_timesteps(4, 6.0, uniform_fraction=1.5)
