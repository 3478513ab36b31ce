"""DMD gradient on Gaussians with closed-form scores; stored-trajectory reuse; the DMDO stage and CLI fit."""

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from hyperbagel.backbone.checkpoint import from_pretrained, save_pretrained
from hyperbagel.backbone.flow import add_noise, predict_x0, sampling_schedule, unipc_sample
from hyperbagel.backbone.inference import initial_noise, sample_latent_tokens
from hyperbagel.callbacks.discriminator import AdversarialDiscriminator, TokenDiscriminator
from hyperbagel.datamodules.generation_datamodule import GenerationDataModule
from hyperbagel.distillation.dmd import dmd_gradient, dmd_loss, fake_score_loss, rerun_step, roll_trajectory
from hyperbagel.lightning_modules.distill_dmdo import DistillDMDOStage

from helpers import CountSteps, quiet_trainer, run_hyperbagel


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


def test_unipc_trajectory_keeps_the_states_its_velocities_saw() -> None:
    """The solver's stored inputs re-run exactly, and its sample is the UniPC sampler's."""
    torch.manual_seed(0)
    student, noise = LinearVelocity(4), torch.randn(2, 5, 4)
    timesteps = sampling_schedule(7, 3.0)
    seen = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x)
        return student(x, t)

    trajectory = roll_trajectory(velocity, noise, timesteps, solver="unipc")
    assert trajectory.num_steps == 6 and all(torch.equal(a, b) for a, b in zip(trajectory.states, seen))
    with torch.no_grad():
        assert torch.equal(trajectory.sample, unipc_sample(lambda x, t, i: student(x, t), noise, timesteps))
        euler = roll_trajectory(student, noise, timesteps).sample
    assert not torch.allclose(trajectory.sample, euler)
    for i in (0, 5):
        assert torch.equal(rerun_step(student, trajectory, i).detach(), trajectory.x0[i])
    with pytest.raises(ValueError, match="no ODE solver"):
        roll_trajectory(student, noise, timesteps, mode="sde", fresh_noise=torch.randn_like, solver="unipc")


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


# --- the stage -----------------------------------------------------------------------------------------
@pytest.fixture
def stage2_dir(tmp_path: Path, tiny_bagel, shapes_tokenizer) -> Path:
    """A tiny guidance-distilled model standing in for the TSCD output (and its teacher)."""
    folder = tmp_path / "distill_tscd"
    save_pretrained(tiny_bagel.add_guidance_embedders(), folder, tokenizer=shapes_tokenizer)
    return folder


def _data() -> GenerationDataModule:
    return GenerationDataModule("tiny", n_train=4, n_val=2, batch_size=2)


def test_stored_step_of_the_student_reruns_exactly_in_the_stage(stage2_dir: Path) -> None:
    stage = DistillDMDOStage(model=str(stage2_dir), teacher=str(stage2_dir))
    stage.configure_model()
    batch = next(b for b in _data().split("train") if b.kinds[0] == "edit")
    contexts, guidance = stage.prefill(batch), stage.guidance(batch)
    student = lambda x, t: stage.velocity(contexts, x, t, guidance)  # noqa: E731
    noise = torch.randn(2, contexts.num_tokens, 16, generator=torch.Generator().manual_seed(0))
    trajectory = roll_trajectory(student, noise, stage.sampling_timesteps())
    assert trajectory.num_steps == 6
    for index in (0, 3, 5):
        again = rerun_step(student, trajectory, index)
        assert again.requires_grad
        assert torch.equal(again.detach(), trajectory.x0[index])


def test_dmdo_updates_the_fake_score_every_step_and_the_generator_every_kth(
    tmp_path: Path, stage2_dir
) -> None:
    seed_everything(0)
    stage = DistillDMDOStage(
        model=str(stage2_dir),
        teacher=str(stage2_dir),
        generator_every=2,
        mode="sde",
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        fake_score_optimizer=partial(torch.optim.AdamW, lr=1e-3),
    )
    counter = CountSteps()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3)
    trainer = quiet_trainer(tmp_path, 3, [counter, checkpoints], limit_val_batches=0, num_sanity_val_steps=0)
    stage.configure_model()
    fake_before = {n: p.detach().clone() for n, p in stage.fake_score.named_parameters()}
    assert all(torch.equal(p, dict(stage.teacher.named_parameters())[n]) for n, p in fake_before.items())
    trainer.fit(stage, _data())
    assert counter.counts == [2, 3]  # generator at steps 0 and 2; fake score at 0, 1, 2
    assert trainer.global_step == 3
    assert any(not torch.equal(p, fake_before[n]) for n, p in stage.fake_score.named_parameters())
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)["state_dict"]
    assert any(k.startswith("fake_score.") for k in state) and any(k.startswith("model.") for k in state)
    assert not any(k.startswith("teacher.") for k in state)  # reloaded from its folder on resume
    assert {"train/generator/dmd", "train/fake_score/loss"} <= set(trainer.callback_metrics)


def test_dmdo_fits_through_the_cli(tmp_path: Path, stage2_dir: Path) -> None:
    config = tmp_path / "dmdo.yaml"
    config.write_text(
        f"""
seed_everything: 0
model:
  class_path: hyperbagel.lightning_modules.distill_dmdo.DistillDMDOStage
  init_args:
    {{model: {stage2_dir}, teacher: {stage2_dir}, generator_every: 1}}
data:
  class_path: hyperbagel.datamodules.generation_datamodule.GenerationDataModule
  init_args: {{model_config: tiny, n_train: 4, n_val: 2, batch_size: 2}}
trainer:
  accelerator: cpu
  default_root_dir: {tmp_path}
  max_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_checkpointing: false
  logger: false
  callbacks:
    - class_path: hyperbagel.callbacks.export.BagelExport
      init_args: {{dirpath: {tmp_path / "out"}}}
"""
    )
    result = run_hyperbagel("fit", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert from_pretrained(tmp_path / "out").has_guidance_embedders


@pytest.mark.parametrize("score_noise", ["trajectory", "fresh"])
def test_fake_score_interpolates_with_the_trajectory_noise_or_fresh_noise(
    monkeypatch: pytest.MonkeyPatch, stage2_dir: Path, score_noise: str
) -> None:
    import hyperbagel.lightning_modules.distill_dmdo as dmdo

    seen: dict[str, torch.Tensor] = {}

    def recording_roll(*args, **kwargs):
        trajectory = roll_trajectory(*args, **kwargs)
        seen["trajectory"] = trajectory.noise
        return trajectory

    def recording_loss(v_fake, noise, x0):
        seen["fake"] = noise
        return fake_score_loss(v_fake, noise, x0)

    monkeypatch.setattr(dmdo, "roll_trajectory", recording_roll)
    monkeypatch.setattr(dmdo, "fake_score_loss", recording_loss)
    stage = DistillDMDOStage(
        model=str(stage2_dir), teacher=str(stage2_dir), mode="ode", score_noise=score_noise
    )
    trainer = quiet_trainer(stage2_dir.parent, 1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(stage, _data())
    assert seen["fake"].shape == seen["trajectory"].shape
    assert torch.equal(seen["fake"], seen["trajectory"]) == (score_noise == "trajectory")


def test_dmdo_rolls_and_validates_with_the_students_solver(
    monkeypatch: pytest.MonkeyPatch, stage2_dir: Path
) -> None:
    """`sample_solver="unipc"`: the trajectories the generator learns from and the validation samples are
    the sampler's it is deployed with."""
    import hyperbagel.lightning_modules.distill_dmdo as dmdo

    solvers = []

    def recording_roll(*args, **kwargs):
        trajectory = roll_trajectory(*args, **kwargs)
        solvers.append(args[5])
        return trajectory

    monkeypatch.setattr(dmdo, "roll_trajectory", recording_roll)
    stage = DistillDMDOStage(model=str(stage2_dir), teacher=str(stage2_dir), sample_solver="unipc")
    trainer = quiet_trainer(stage2_dir.parent, 1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(stage, _data())
    assert solvers == ["unipc"]  # the student's trajectory; the teacher's (a real-score fit) stays Euler
    batch = next(iter(_data().split("val")))
    contexts, guidance = stage.prefill(batch), stage.guidance(batch)
    noise = initial_noise(stage.model, len(batch), batch.grid, stage.val_seed)
    expected = sample_latent_tokens(contexts, noise, stage.sampling_timesteps(), guidance, solver="unipc")
    assert torch.equal(stage.sample_pair(batch)[1], expected)


@pytest.mark.parametrize(
    ("option", "value"), [("score_noise", "shared"), ("real_score", "data"), ("real_score_shift", 0.0)]
)
def test_dmdo_refuses_unknown_score_options(stage2_dir: Path, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        DistillDMDOStage(model=str(stage2_dir), teacher=str(stage2_dir), **{option: value})


def _learned_real_stage(stage2_dir: Path, real_score_steps: int, **options) -> DistillDMDOStage:
    """A DMDO stage with a learned real score whose three models all step every batch."""
    return DistillDMDOStage(
        model=str(stage2_dir),
        teacher=str(stage2_dir),
        real_score="learned",
        real_score_steps=real_score_steps,
        generator_every=1,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        fake_score_optimizer=partial(torch.optim.AdamW, lr=1e-3),
        **options,
    )


def test_a_learned_real_score_is_fitted_to_the_teachers_samples_and_checkpointed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stage2_dir: Path
) -> None:
    import hyperbagel.lightning_modules.distill_dmdo as dmdo

    grids: list[torch.Tensor] = []

    def recording_roll(velocity, noise, timesteps, *args, **kwargs):
        grids.append(timesteps)
        return roll_trajectory(velocity, noise, timesteps, *args, **kwargs)

    monkeypatch.setattr(dmdo, "roll_trajectory", recording_roll)
    seed_everything(0)
    stage = _learned_real_stage(stage2_dir, real_score_steps=3, sample_shift=1.5, real_score_shift=3.0)
    counter = CountSteps()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer = quiet_trainer(tmp_path, 2, [counter, checkpoints], limit_val_batches=0, num_sanity_val_steps=0)
    stage.configure_model()
    teacher = {n: p.detach().clone() for n, p in stage.teacher.named_parameters()}
    trainer.fit(stage, _data())
    # per step: the student's rollout on its own grid, then the teacher's on the real score's grid
    student, teacher_grid = sampling_schedule(7, 1.5), sampling_schedule(4, 3.0)
    assert len(grids) == 4
    for got, expected in zip(grids, [student, teacher_grid, student, teacher_grid], strict=True):
        assert torch.equal(got, expected)
    assert counter.counts == [2, 2, 2]  # generator, fake score, real score
    assert any(not torch.equal(p, teacher[n]) for n, p in stage.real_score.named_parameters())
    assert all(torch.equal(p, teacher[n]) for n, p in stage.teacher.named_parameters())
    state = torch.load(next((tmp_path / "ckpt").glob("*.ckpt")), weights_only=False)["state_dict"]
    assert any(k.startswith("real_score.") for k in state)
    assert {"train/real_score/loss", "train/fake_score/loss"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("score_noise", ["trajectory", "fresh"])
def test_fake_and_learned_real_scores_share_their_interpolation_draws(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stage2_dir: Path, score_noise: str
) -> None:
    import hyperbagel.lightning_modules.distill_dmdo as dmdo

    draws: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording_add_noise(x0, noise, times):
        draws.append((x0, noise, times))
        return add_noise(x0, noise, times)

    monkeypatch.setattr(dmdo, "add_noise", recording_add_noise)
    stage = _learned_real_stage(stage2_dir, real_score_steps=2, score_noise=score_noise)
    trainer = quiet_trainer(tmp_path, 1, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(stage, _data(), weights_only=False)
    (fake_x0, fake_eps, fake_t), (real_x0, real_eps, real_t), _ = draws  # then the generator's
    assert not torch.equal(fake_x0, real_x0)  # the student's sample, then the teacher's
    assert torch.equal(fake_eps, real_eps) and torch.equal(fake_t, real_t)


def test_regression_pulls_the_rerun_x0_to_the_teachers_ode_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stage2_dir: Path
) -> None:
    """With the frozen teacher as the real score, the teacher's ODE from the same x_T is rolled only on
    generator turns, and the logged term is the MSE of the re-run step's x0 to its sample."""
    import hyperbagel.lightning_modules.distill_dmdo as dmdo

    rolls: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    reruns: list[torch.Tensor] = []

    def recording_roll(velocity, noise, timesteps, *args, **kwargs):
        trajectory = roll_trajectory(velocity, noise, timesteps, *args, **kwargs)
        rolls.append((len(timesteps) - 1, noise, trajectory.sample))
        return trajectory

    def recording_rerun(*args):
        reruns.append(rerun_step(*args))
        return reruns[-1]

    monkeypatch.setattr(dmdo, "roll_trajectory", recording_roll)
    monkeypatch.setattr(dmdo, "rerun_step", recording_rerun)
    seed_everything(0)
    stage = DistillDMDOStage(
        model=str(stage2_dir), teacher=str(stage2_dir), real_score_steps=3, regression_weight=0.5,
        generator_every=2,
    )  # fmt: skip
    trainer = quiet_trainer(tmp_path, 2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(stage, _data())
    assert [steps for steps, _, _ in rolls] == [6, 3, 6]  # the teacher rolls on step 0's generator turn
    (_, student_noise, _), (_, teacher_noise, teacher_sample) = rolls[:2]
    assert torch.equal(teacher_noise, student_noise) and len(reruns) == 1
    expected = F.mse_loss(reruns[0].detach().float(), teacher_sample.float())
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/generator/regression"], expected, rtol=1e-4, atol=1e-6)
    total = metrics["train/generator/dmd"] + 0.5 * metrics["train/generator/regression"]
    torch.testing.assert_close(metrics["train/generator/loss"], total)  # the back-propagated loss


@pytest.mark.parametrize(("weight", "mode"), [(-1.0, "ode"), (1.0, "sde")])
def test_regression_needs_a_non_negative_weight_and_the_ode(
    stage2_dir: Path, weight: float, mode: str
) -> None:
    with pytest.raises(ValueError, match="regression_weight"):
        DistillDMDOStage(model=str(stage2_dir), teacher=str(stage2_dir), regression_weight=weight, mode=mode)


def test_dmdo_with_a_learned_real_score_resumes_bit_exactly(tmp_path: Path, stage2_dir: Path) -> None:
    def run(root: Path, max_steps: int, ckpt_path: str | None = None) -> DistillDMDOStage:
        seed_everything(0)
        stage = _learned_real_stage(stage2_dir, real_score_steps=2)
        checkpoints = ModelCheckpoint(dirpath=root, every_n_train_steps=2, save_top_k=-1)
        trainer = quiet_trainer(root, max_steps, [checkpoints], limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(
            stage,
            GenerationDataModule("tiny", n_train=4, n_val=2, batch_size=2),  # 4 batches: resumed mid-epoch
            ckpt_path=ckpt_path,
            weights_only=False,  # the hyperparameters hold partials
        )
        return stage

    straight = run(tmp_path / "straight", 4)
    run(tmp_path / "first_half", 2)
    resumed = run(tmp_path / "resumed", 4, str(tmp_path / "first_half" / "epoch=0-step=2.ckpt"))
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys() and any(k.startswith("real_score.") for k in got)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_discriminator_adds_dmd2s_gan_term_on_real_data(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stage2_dir: Path
) -> None:
    """With the callback, the discriminator tells the batch's real latents from the re-run step's x0, both
    noised to the generator's times, and the generator's loss is DMD plus the weighted GAN term."""
    import hyperbagel.lightning_modules.distill_dmdo as dmdo
    from hyperbagel.distillation.batches import GenerationBatch

    reruns, cleans, seen = [], [], []
    monkeypatch.setattr(dmdo, "rerun_step", lambda *args: reruns.append(rerun_step(*args)) or reruns[-1])
    clean_tokens = GenerationBatch.clean_tokens
    monkeypatch.setattr(
        GenerationBatch,
        "clean_tokens",
        lambda self, model: cleans.append(clean_tokens(self, model)) or cleans[-1],
    )
    critic = AdversarialDiscriminator(
        TokenDiscriminator(16, 1, 2), optimizer=partial(torch.optim.AdamW, lr=1e-3)
    )
    update = critic.update
    monkeypatch.setattr(critic, "update", lambda stage, **kw: seen.append(kw) or update(stage, **kw))
    seed_everything(0)
    stage = DistillDMDOStage(
        model=str(stage2_dir), teacher=str(stage2_dir), generator_every=1, adversarial_weight=0.25
    )
    stage.noise_like = torch.zeros_like  # the GAN term's noise, so both sides are exactly (1 - t) x0
    trainer = quiet_trainer(tmp_path, 2, [critic], limit_val_batches=0, num_sanity_val_steps=0)
    stage.configure_model()
    before = [p.detach().clone() for p in critic.discriminator.parameters()]
    trainer.fit(stage, _data())
    assert len(seen) == len(reruns) == len(cleans) == 2  # one discriminator update per generator turn
    for kw, x0, clean in zip(seen, reruns, cleans):
        scale = (1 - kw["t"]).reshape(-1, 1, 1)
        torch.testing.assert_close(kw["fake"].float(), (scale * x0.detach()).float(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(kw["real"].float(), (scale * clean).float(), rtol=1e-3, atol=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, critic.discriminator.parameters()))
    metrics = trainer.callback_metrics
    total = metrics["train/generator/dmd"] + 0.25 * metrics["train/generator/adversarial"]
    torch.testing.assert_close(metrics["train/generator/loss"], total)
    assert "train/discriminator/accuracy" in metrics
    with pytest.raises(ValueError, match="adversarial_weight"):
        DistillDMDOStage(model=str(stage2_dir), teacher=str(stage2_dir), adversarial_weight=-1.0)
