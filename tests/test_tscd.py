"""TSCD: segment edges, Euler jumps, teacher + target-student targets, losses; the stage and its CLI fit."""

from functools import partial
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hyperbagel.backbone.autoencoder import BagelAutoencoder
from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained, save_pretrained
from hyperbagel.backbone.flow import CFGConfig, sampling_schedule
from hyperbagel.backbone.inference import ImageContexts, sample_latent_tokens
from hyperbagel.callbacks.discriminator import AdversarialDiscriminator, TokenDiscriminator
from hyperbagel.datamodules.generation_datamodule import GenerationDataModule
from hyperbagel.distillation.batches import GenerationBatch
from hyperbagel.distillation.generation_weights import is_generation_key
from hyperbagel.distillation.tscd import (
    LinearRamp,
    Segments,
    consistency_loss,
    consistency_target,
    euler_jump,
)
from hyperbagel.lightning_modules.distill_tscd import DistillTSCDStage

from helpers import quiet_trainer, run_hyperbagel


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
    rows = torch.stack([prediction, prediction + 1.0]), torch.stack([target, target])
    per_sample = consistency_loss(*rows, "mse", per_sample=True)
    assert per_sample.tolist() == pytest.approx([(0.05**2 + 1.0) / 2, (0.95**2 + 0.0) / 2])


def test_linear_ramp() -> None:
    ramp = LinearRamp(start=1.0, end=0.0, steps=4)
    assert [ramp(s) for s in (0, 1, 2, 4, 10)] == pytest.approx([1.0, 0.75, 0.5, 0.0, 0.0])
    assert LinearRamp(0.3)(100) == 0.3
    assert LinearRamp(0.3, end=1.0)(0) == 1.0


# --- the stage -----------------------------------------------------------------------------------------
@pytest.fixture
def stage1_dir(tmp_path: Path, tiny_bagel, shapes_tokenizer) -> Path:
    """A tiny stage-1 output: random weights with (zero-initialised) guidance embedders."""
    folder = tmp_path / "distill_cfg"
    save_pretrained(tiny_bagel.add_guidance_embedders(), folder, tokenizer=shapes_tokenizer)
    return folder


def _data() -> GenerationDataModule:
    return GenerationDataModule("tiny", n_train=4, n_val=2, batch_size=2)


def _trainer(tmp_path: Path, steps: int, callbacks: list) -> Trainer:
    return quiet_trainer(tmp_path, steps, callbacks, limit_val_batches=0, num_sanity_val_steps=0)


def test_tscd_stage_trains_only_the_generation_side(tmp_path: Path, stage1_dir: Path) -> None:
    seed_everything(0)
    stage = DistillTSCDStage(
        model=str(stage1_dir),
        teacher=str(stage1_dir),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        consistency_loss="huber",
        consistency_weight=LinearRamp(1.0, 0.0, 4),
    )
    critic = AdversarialDiscriminator(
        TokenDiscriminator(16, 1, 2), optimizer=partial(torch.optim.AdamW, lr=1e-3)
    )
    stage.configure_model()
    before = {name: p.detach().clone() for name, p in stage.model.named_parameters()}
    teacher = {name: p.detach().clone() for name, p in stage.teacher.named_parameters()}
    trainer = _trainer(tmp_path, 2, [critic])
    trainer.fit(stage, _data())
    changed = {name for name, p in stage.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(is_generation_key(name) for name in changed)
    assert "text_guidance_embedder.mlp.2.weight" in changed  # the embedders keep training
    assert all(torch.equal(p, teacher[n]) for n, p in stage.teacher.named_parameters())
    metrics = set(trainer.callback_metrics)
    for term in ("adversarial", "consistency", "target_mse", "grad_norm"):
        assert f"train/generator/{term}" in metrics
    assert {"train/discriminator/loss", "train/discriminator/accuracy"} <= metrics


def test_tscd_needs_a_loss_and_a_matching_teacher(
    tmp_path: Path, stage1_dir: Path, tiny_bagel_config
) -> None:
    with pytest.raises(ValueError, match="TSCD needs a loss"):
        _trainer(tmp_path, 1, []).fit(DistillTSCDStage(model=str(stage1_dir)), _data())
    other = Bagel(tiny_bagel_config, BagelAutoencoder(tiny_bagel_config.vae)).add_guidance_embedders()
    save_pretrained(other, tmp_path / "other")
    stage = DistillTSCDStage(model=str(stage1_dir), teacher=str(tmp_path / "other"))
    with pytest.raises(ValueError, match="does not share the model's frozen"):
        stage.configure_model()


def test_rollout_segments_are_the_students_sampling_grid(stage1_dir: Path) -> None:
    stage = DistillTSCDStage(model=str(stage1_dir), start="rollout", sample_steps=4, sample_shift=2.0)
    assert stage.segments.edges == [float(t) for t in sampling_schedule(5, 2.0)]
    with pytest.raises(ValueError, match="segments must be the sampling grid"):
        DistillTSCDStage(model=str(stage1_dir), start="rollout", segments=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="start must be one of"):
        DistillTSCDStage(model=str(stage1_dir), start="data")


def _rollout_inputs(stage: DistillTSCDStage) -> tuple[ImageContexts, list[CFGConfig], torch.Tensor]:
    """A training batch's contexts and guidance under `stage`, and seeded noise for its trajectories."""
    data = _data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    contexts, guidance = stage.prefill(batch), stage.guidance(batch)
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(
        (len(batch), contexts.num_tokens, stage.model.config.latent_token_dim), generator=generator
    )
    return contexts, guidance, noise


def test_rollout_start_is_the_students_own_sampler_state(stage1_dir: Path) -> None:
    """The jump starts where the student's few-step sampler (the one used at inference) is after `index`
    steps from the drawn noise."""
    stage = DistillTSCDStage(model=str(stage1_dir), start="rollout", sample_steps=3)
    stage.configure_model()
    contexts, guidance, noise = _rollout_inputs(stage)
    for index in range(3):
        state = stage.rollout_state(contexts, guidance, noise, index)
        expected = noise
        if index:
            grid = stage.sampling_timesteps()[: index + 1]
            expected = sample_latent_tokens(contexts, noise, grid, guidance)
        torch.testing.assert_close(state, expected, rtol=0, atol=0)
        assert index == 0 or not torch.equal(state, noise)


def test_noise_anchored_target_is_the_teachers_trajectory_from_the_same_noise(stage1_dir: Path) -> None:
    """With the teacher integrating one Euler step a segment and the student equal to its teacher, the
    target of segment `index` is exactly the student's own sampler state one step later (a perfect student
    has nothing to learn); with more teacher steps it is the teacher's sample on the subdivided grid."""
    stage = DistillTSCDStage(
        model=str(stage1_dir), start="rollout", rollout_target="noise", teacher_span=1.0, teacher_steps=1
    )
    stage.configure_model()
    contexts, guidance, noise = _rollout_inputs(stage)
    for index in range(stage.segments.num_segments):
        target = stage.teacher_trajectory(contexts, guidance, noise, index)
        if index + 1 < stage.segments.num_segments:
            torch.testing.assert_close(target, stage.rollout_state(contexts, guidance, noise, index + 1))
        else:
            torch.testing.assert_close(
                target, sample_latent_tokens(contexts, noise, stage.sampling_timesteps(), guidance)
            )
    stage.teacher_steps = 3
    edges = stage.segments.edges
    fine = torch.cat([torch.linspace(edges[0], edges[1], 4)[:-1], torch.linspace(edges[1], edges[2], 4)])
    torch.testing.assert_close(
        stage.teacher_trajectory(contexts, guidance, noise, 1),
        sample_latent_tokens(contexts, noise, fine, guidance),
    )


def test_noise_anchored_target_needs_rollout_starts_and_the_whole_segment(stage1_dir: Path) -> None:
    with pytest.raises(ValueError, match="rollout_target must be one of"):
        DistillTSCDStage(model=str(stage1_dir), start="rollout", rollout_target="data", teacher_span=1.0)
    with pytest.raises(ValueError, match="needs start='rollout' and teacher_span=1.0"):
        DistillTSCDStage(model=str(stage1_dir), rollout_target="noise", teacher_span=1.0)
    with pytest.raises(ValueError, match="needs start='rollout' and teacher_span=1.0"):
        DistillTSCDStage(model=str(stage1_dir), start="rollout", rollout_target="noise", teacher_span=0.5)


def test_sampler_solvers_are_checked(stage1_dir: Path) -> None:
    """Any stage refuses an unknown solver; rollout starts train Euler steps, so they need Euler states."""
    with pytest.raises(ValueError, match="sample_solver must be one of"):
        DistillTSCDStage(model=str(stage1_dir), consistency_loss="mse", sample_solver="heun")
    with pytest.raises(ValueError, match="it needs sample_solver='euler'"):
        DistillTSCDStage(model=str(stage1_dir), start="rollout", teacher_span=1.0, sample_solver="unipc")
    DistillTSCDStage(model=str(stage1_dir), consistency_loss="mse", sample_solver="unipc")  # validation only


@pytest.mark.parametrize("rollout_target", ["state", "noise"])
def test_rollout_tscd_trains_without_clean_latents(
    tmp_path: Path, stage1_dir: Path, monkeypatch: pytest.MonkeyPatch, rollout_target: str
) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("a rollout start must not encode the clean target")

    monkeypatch.setattr(GenerationBatch, "clean_tokens", refuse)
    seed_everything(0)
    stage = DistillTSCDStage(
        model=str(stage1_dir),
        teacher=str(stage1_dir),
        start="rollout",
        rollout_target=rollout_target,
        teacher_span=1.0,
        teacher_steps=2,
        consistency_loss="mse",
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    stage.configure_model()
    before = {name: p.detach().clone() for name, p in stage.model.named_parameters()}
    trainer = _trainer(tmp_path, 3, [])
    trainer.fit(stage, _data())
    changed = {name for name, p in stage.model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(is_generation_key(name) for name in changed)
    assert 0 <= trainer.callback_metrics["train/generator/segment"] < stage.sample_steps
    assert trainer.callback_metrics["train/generator/consistency"] > 0


def test_task_weights_scale_the_consistency_term(tmp_path: Path, stage1_dir: Path) -> None:
    """With every task weighted 2, the consistency term is twice the (unweighted) MSE of the same jump."""
    seed_everything(0)
    stage = DistillTSCDStage(
        model=str(stage1_dir),
        start="rollout",
        consistency_loss="mse",
        task_weights={"t2i": 2.0, "edit": 2.0},
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    trainer = _trainer(tmp_path, 1, [])
    trainer.fit(stage, _data())
    metrics = trainer.callback_metrics
    consistency, mse = metrics["train/generator/consistency"], metrics["train/generator/target_mse"]
    torch.testing.assert_close(consistency, 2 * mse)


def test_tscd_fits_through_the_cli_and_exports_a_loadable_student(tmp_path: Path, stage1_dir: Path) -> None:
    config = tmp_path / "tscd.yaml"
    config.write_text(
        f"""
seed_everything: 0
model:
  class_path: hyperbagel.lightning_modules.distill_tscd.DistillTSCDStage
  init_args:
    {{model: {stage1_dir}, teacher: {stage1_dir}, target: ema, val_teacher_steps: 2, grid_examples: 2}}
data:
  class_path: hyperbagel.datamodules.generation_datamodule.GenerationDataModule
  init_args: {{model_config: tiny, n_train: 4, n_val: 2, batch_size: 2}}
trainer:
  accelerator: cpu
  max_steps: 2
  log_every_n_steps: 1
  val_check_interval: 2
  check_val_every_n_epoch: null
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_checkpointing: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {tmp_path / "logs"}, name: tscd}}
  callbacks:
    - class_path: hyperbagel.callbacks.ema.EMA
      init_args: {{decay: 0.9}}
    - class_path: hyperbagel.callbacks.discriminator.AdversarialDiscriminator
      init_args:
        discriminator:
          class_path: hyperbagel.callbacks.discriminator.BagelDiscriminator
          init_args: {{layers: [1, 2], head_hidden: 16}}
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / "out"}, use_ema: true}}
"""
    )
    result = run_hyperbagel("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert from_pretrained(tmp_path / "out").has_guidance_embedders
    events = next((tmp_path / "logs" / "tscd").rglob("events.out.tfevents.*"))
    tags = EventAccumulator(str(events)).Reload().Tags()
    assert {"train/generator/adversarial", "train/discriminator/accuracy", "val/sample_mse"} <= set(
        tags["scalars"]
    )
    assert "samples/teacher_student" in tags["images"]
