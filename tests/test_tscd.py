"""TSCD time geometry and targets: segment edges, Euler jumps, teacher + target-student targets, losses."""

import pytest
import torch

from hyperbagel.distillation.tscd import (
    LinearRamp,
    Segments,
    consistency_loss,
    consistency_target,
    euler_jump,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_jump_to_the_current_time_returns_x_t(dtype) -> None:
    x = torch.randn(2, 5, 8).to(dtype)
    v = torch.randn(2, 5, 8).to(dtype) * 100
    for t in (1.0, 0.6, 0.0):
        assert torch.equal(euler_jump(x, v, t, t), x)
        assert torch.equal(euler_jump(x, v, torch.tensor(t), torch.tensor(t)), x)


def test_jump_along_a_straight_path_lands_on_it() -> None:
    x0, eps = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    on_path = lambda t: (1 - t) * x0 + t * eps  # noqa: E731
    assert torch.allclose(euler_jump(on_path(0.9), eps - x0, 0.9, 0.25), on_path(0.25), atol=1e-6)


def test_uniform_segments_follow_the_shifted_grid() -> None:
    assert Segments.uniform(3).edges == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-6)
    segments = Segments.uniform(3, shift=3.0)  # shift(2/3) = 6/7, shift(1/3) = 3/5
    assert segments.edges == pytest.approx([1.0, 6 / 7, 0.6, 0.0], abs=1e-6)
    assert [segments.index(t) for t in (1.0, 0.9, 6 / 7, 0.7, 0.6, 0.3, 0.0)] == [0, 0, 1, 1, 2, 2, 2]
    assert segments.bounds(1) == pytest.approx((0.6, 6 / 7), abs=1e-6)


@pytest.mark.parametrize("edges", [[1.0, 0.5], [0.9, 0.5, 0.0], [1.0, 0.5, 0.5, 0.0], [1.0, 0.2, 0.6, 0.0]])
def test_bad_edges_are_refused(edges) -> None:
    with pytest.raises(ValueError, match="segment edges"):
        Segments(edges)


def test_sampled_times_lie_in_their_segment_and_cover_all() -> None:
    segments = Segments([1.0, 0.8, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        t, index = segments.sample(generator)
        lower, upper = segments.bounds(index)
        assert lower < t <= upper and segments.index(t) == index
        seen.add(index)
    assert seen == {0, 1, 2}


def test_target_is_teacher_steps_then_target_student_jump() -> None:
    x_t = torch.randn(2, 3, 4)
    teacher_v, student_v = torch.full_like(x_t, 2.0), torch.full_like(x_t, -1.0)
    calls = []

    def student(x, t):
        calls.append(float(t))
        return student_v

    target = consistency_target(
        lambda x, t: teacher_v, student, x_t, t=0.9, lower=0.3, teacher_span=0.2, teacher_steps=2
    )
    expected = x_t - (0.9 - 0.7) * 2.0 - (0.7 - 0.3) * -1.0
    assert torch.allclose(target, expected, atol=1e-6)
    assert calls == [pytest.approx(0.7)]


def test_target_of_an_exact_flow_is_the_path_point_at_the_edge() -> None:
    x0, eps = torch.randn(1, 6, 4), torch.randn(1, 6, 4)
    exact = lambda x, t: eps - x0  # noqa: E731  (the straight path's velocity everywhere)
    x_t = 0.2 * x0 + 0.8 * eps
    target = consistency_target(exact, exact, x_t, t=0.8, lower=0.25, teacher_span=0.1, teacher_steps=3)
    assert torch.allclose(target, 0.75 * x0 + 0.25 * eps, atol=1e-5)


def test_teacher_span_covering_the_segment_never_asks_the_target_student() -> None:
    x_t = torch.randn(1, 2, 2)

    def refuse(x, t):
        raise AssertionError("the target student must not run when the teacher reaches the edge")

    target = consistency_target(lambda x, t: torch.ones_like(x), refuse, x_t, 0.5, 0.0, teacher_span=1.0)
    assert torch.allclose(target, x_t - 0.5)
    assert torch.equal(consistency_target(refuse, refuse, x_t, 0.4, 0.4, teacher_span=0.1), x_t)


def test_consistency_losses_by_hand() -> None:
    prediction, target = torch.tensor([0.0, 0.0]), torch.tensor([0.05, 1.0])
    assert float(consistency_loss(prediction, target, "mse")) == pytest.approx((0.05**2 + 1.0) / 2)
    huber = (0.5 * 0.05**2 + 0.1 * (1.0 - 0.5 * 0.1)) / 2
    assert float(consistency_loss(prediction, target, "huber", huber_delta=0.1)) == pytest.approx(huber)
    with pytest.raises(ValueError, match="consistency loss"):
        consistency_loss(prediction, target, "l1")


def test_linear_ramp() -> None:
    ramp = LinearRamp(start=1.0, end=0.0, steps=4)
    assert [ramp(s) for s in (0, 1, 2, 4, 10)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    assert LinearRamp(0.3)(100) == 0.3
    assert LinearRamp(0.3, end=1.0)(0) == 1.0
