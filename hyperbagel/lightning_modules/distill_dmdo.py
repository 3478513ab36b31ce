"""Stage 3, DMDO: distribution matching distillation along the student's own ODE trajectory.

Per batch the student's few-step trajectory (its `sample_solver`, Euler by default) is rolled from noise x_T
(no gradients) and kept. The fake-score model, a trainable side copy of the generation side (`side_copies`:
sharing the student's frozen understanding weights, or a separate sharded model under FSDP2), regresses the
velocity `x_T - x_0` at straight interpolations of x_T and the trajectory's end x_0 (every batch). Every
`generator_every` steps the generator re-runs one stored step with gradients, interpolates its x0 prediction
with the same x_T at a fresh time, and follows DMD2's normalised gradient between the fake and the real
(teacher) x0 predictions there. With `mode="sde"` the trajectory, the fake model's interpolations and the
generator's re-interpolation use fresh noise instead (standard DMD with re-noised steps; the paper's
ablation). No extra regulariser by default, as in the paper.

Three options go beyond the paper's description where it leaves the two scores apart or the student short:

- `real_score="learned"`: the real score is a second trainable copy of the teacher, fitted to the
  teacher's own samples (its `real_score_steps`-step ODE from the same x_T) exactly as the fake is
  fitted to the student's. Why: the teacher is CFG-distilled, so its velocity is a guided field, not
  the score of the distribution its sampler draws, and any copy fine-tuned on samples moves away from
  it; on the shapes teacher that gap was four times the student-vs-teacher one (README, "Distillation").
  It is common to the two learned scores and cancels in their difference, which then vanishes when the
  student's samples are distributed like the teacher's.
- `score_noise="fresh"`: the learned scores interpolate with fresh noise even in "ode" mode, as the
  teacher was trained. Interpolations along a trajectory's own (x_T, x_0) pairs follow a straighter
  (reflow) velocity than the teacher's, so against the frozen teacher they disagree even for a perfect
  student; with `real_score="learned"` both sides use the same pairing and either choice is consistent.
- `regression_weight` (ode mode only): adds `weight * MSE(x0, teacher's x0)` to the generator's loss,
  the re-run step's x0 prediction against the teacher's `real_score_steps`-step ODE sample from the same
  x_T (DMD's regression loss on paired teacher samples). Why: the distribution-matching gradient alone
  left the 6-step student short of the teacher's samples it is matched to; on the ODE the pairing is
  deterministic, so the regression target is well posed. Measured on the shapes preset at weight 1 it
  slowed the approach to the teacher instead (README, "Distillation"), so it is off by default.

With the `AdversarialDiscriminator` callback the generator also gets DMD2's GAN term on *real data*: the
discriminator tells the batch's real images from the re-run step's x0 predictions, both noised to the
generator's fresh times with independent noise, and the generator adds `adversarial_weight` times its
adversarial loss. Why: the distribution-matching gradient can at best bring the student to the teacher's
samples; real images are the only signal that can correct the teacher's own errors (DMD2's students beat
their teachers this way). Measured on the coarse shapes chain at weights 3e-3 and 3e-2 it left GenEval
unchanged (README, "Distillation"), so the demo config does not add the callback.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable

from hyperbagel.backbone.flow import (
    CFGConfig,
    add_noise,
    predict_x0,
    sample_training_timesteps,
    shift_timesteps,
)
from hyperbagel.backbone.inference import ImageContexts
from hyperbagel.callbacks.discriminator import find_discriminator
from hyperbagel.distillation.batches import GenerationBatch
from hyperbagel.distillation.dmd import (
    TRAJECTORY_MODES,
    dmd_loss,
    fake_score_loss,
    rerun_step,
    roll_trajectory,
)
from hyperbagel.distillation.side_copies import SideCopy, clone_copy, generation_copy
from hyperbagel.lightning_modules.base import default_optimizer
from hyperbagel.lightning_modules.manual import GenerationDistillStage, OptimizerSpec

FAKE_SCORE_INITS = ("teacher", "student")
REAL_SCORES = ("teacher", "learned")
SCORE_NOISES = ("trajectory", "fresh")


class DistillDMDOStage(GenerationDistillStage):
    """Hyper-Bagel stage 3 (DMDO); the teacher, or a copy fitted to its samples, is the "real" score.

    Args:
        mode: "ode" (DMDO: the same x_T everywhere) or "sde" (fresh noise per step and interpolation).
        fake_score_init: "teacher" (DMD2's choice) or "student" generation weights start the fake model.
        fake_score_optimizer / fake_score_lr_scheduler / fake_score_gradient_clip_val: its optimization
            (also that of a learned real score: the same recipe is what makes their errors cancel).
        real_score: "teacher" (the frozen teacher's velocity, DMD2's choice) or "learned" (a copy of the
            teacher fitted to the teacher's own samples like the fake; see the module docstring).
        real_score_steps: Euler steps of the teacher's ODE that draws the learned real score's samples.
        real_score_shift: shift of that ODE's grid (default the student's `sample_shift`). Why apart: the
            student's grid is chosen for few steps (a low shift puts its last step nearer t = 0), while the
            samples that stand for the teacher's distribution come from the teacher's own sampler; on the
            shapes chain a shift-1.5 student scored 0.283 / 0.286 (two seeds) with them drawn at shift 3
            against 0.273 on its own grid, a gap of about one standard error (README).
        score_noise: "trajectory" (interpolate with the trajectory's own x_T, the paper's description)
            or "fresh" (independent noise, as the teacher was trained) for the learned scores in "ode"
            mode; "sde" mode always uses fresh noise.
        regression_weight: weight of the regression of the re-run step's x0 onto the teacher's ODE
            sample from the same x_T ("ode" mode only; 0 = off, the paper's recipe).
        generator_every: the generator updates on every this-many-th step, the fake model on every step
            (DMD2's two time-scale rule uses 5).
        fake_time_shift: shift of the logit-normal times of the learned scores' regression.
        dmd_time_range / dmd_time_shift: the generator's fresh time, uniform in the range, then shifted.
        adversarial_weight: weight of the GAN term on real data when the discriminator callback is
            present (DMD2's generator weight is 3e-3 against its DMD loss, which is normalised like ours).
        **kwargs: `GenerationDistillStage` arguments (model, teacher, guidance, sampling grid, ...).
    """

    def __init__(
        self,
        mode: str = "ode",
        fake_score_init: str = "teacher",
        fake_score_optimizer: OptimizerCallable = default_optimizer,
        fake_score_lr_scheduler: LRSchedulerCallable | None = None,
        fake_score_gradient_clip_val: float | None = None,
        real_score: str = "teacher",
        real_score_steps: int = 25,
        real_score_shift: float | None = None,
        score_noise: str = "trajectory",
        regression_weight: float = 0.0,
        generator_every: int = 5,
        fake_time_shift: float = 3.0,
        dmd_time_range: tuple[float, float] = (0.02, 0.98),
        dmd_time_shift: float = 3.0,
        adversarial_weight: float = 3e-3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if mode not in TRAJECTORY_MODES:
            raise ValueError(f"mode must be one of {TRAJECTORY_MODES}, got {mode!r}")
        if fake_score_init not in FAKE_SCORE_INITS:
            raise ValueError(f"fake_score_init must be one of {FAKE_SCORE_INITS}, got {fake_score_init!r}")
        if real_score not in REAL_SCORES:
            raise ValueError(f"real_score must be one of {REAL_SCORES}, got {real_score!r}")
        if real_score_steps < 1:
            raise ValueError(f"real_score_steps must be at least 1, got {real_score_steps}")
        if real_score_shift is not None and real_score_shift <= 0:
            raise ValueError(f"real_score_shift must be > 0, got {real_score_shift}")
        if score_noise not in SCORE_NOISES:
            raise ValueError(f"score_noise must be one of {SCORE_NOISES}, got {score_noise!r}")
        if regression_weight < 0 or (regression_weight > 0 and mode != "ode"):
            raise ValueError(
                f"regression_weight must be >= 0 and needs mode='ode' (the teacher's ODE sample pairs with "
                f"x_T only there), got {regression_weight} with mode={mode!r}"
            )
        if adversarial_weight < 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight}")
        if generator_every < 1:
            raise ValueError(f"generator_every must be at least 1, got {generator_every}")
        low, high = (float(v) for v in dmd_time_range)
        if not 0.0 < low < high <= 1.0:
            raise ValueError(f"dmd_time_range must satisfy 0 < low < high <= 1, got {dmd_time_range}")
        self.mode = mode
        self.fake_score_init = fake_score_init
        self.fake_score_optimizer = fake_score_optimizer
        self.fake_score_lr_scheduler = fake_score_lr_scheduler
        self.fake_score_gradient_clip_val = fake_score_gradient_clip_val
        self.real_score_kind = real_score
        self.real_score_steps = real_score_steps
        self.real_score_shift = real_score_shift
        self.score_noise = score_noise
        self.regression_weight = regression_weight
        self.generator_every = generator_every
        self.fake_time_shift = fake_time_shift
        self.dmd_time_range = (low, high)
        self.dmd_time_shift = dmd_time_shift
        self.adversarial_weight = adversarial_weight
        self.fake_score: SideCopy | None = None
        self.real_score: SideCopy | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.fake_score_init == "teacher":
            self.fake_score = clone_copy(self.teacher, trainable=True)
        else:
            self.fake_score = generation_copy(self.model, trainable=True)
        if self.real_score_kind == "learned":
            self.real_score = clone_copy(self.teacher, trainable=True)

    def optimizer_specs(self) -> list[OptimizerSpec]:
        scores = [("fake_score", self.fake_score), ("real_score", self.real_score)]
        specs = [
            OptimizerSpec(
                name,
                [p for p in weights.parameters() if p.requires_grad],
                self.fake_score_optimizer,
                self.fake_score_lr_scheduler,
                self.fake_score_gradient_clip_val,
            )
            for name, weights in scores
            if weights is not None
        ]
        return [*super().optimizer_specs(), *specs]

    def generator_turn(self) -> bool:
        """Whether the generator updates in this step (every `generator_every`-th, from the first)."""
        return self.global_step % self.generator_every == 0

    def noise_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, like=x)

    def score_interpolation(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(times, noise) of one step's learned-score regressions, drawn once for the fake and a learned
        real score alike: fitted at the same times with the same noise, their fitting errors are common
        random numbers and cancel more in the real-minus-fake difference the generator follows."""
        times = sample_training_timesteps(len(noise), self.fake_time_shift, self.batch_generator)
        reuse_noise = self.mode == "ode" and self.score_noise == "trajectory"
        return times, noise if reuse_noise else self.noise_like(noise)

    def fit_score(
        self,
        name: str,
        weights: SideCopy,
        contexts: ImageContexts,
        guidance: list[CFGConfig],
        sample: torch.Tensor,
        interpolation: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        """One regression step of a learned score: velocity `x_T - x_0` at interpolations of `sample`."""
        times, eps = interpolation
        x_t = add_noise(sample, eps, times)
        with weights.applied(self.model) as model:  # its backward recomputes layers with these weights
            velocity = contexts.for_model(model).velocity(x_t, times.to(self.device), guidance)
            self.update(name, {"loss": fake_score_loss(velocity, eps, sample)})

    def training_updates(self, batch: GenerationBatch, batch_idx: int) -> None:
        guidance, contexts = self.guidance(batch), self.prefill(batch)
        noise = self.fresh_noise(contexts)
        trajectory = roll_trajectory(
            lambda x, t: self.velocity(contexts, x, t, guidance),
            noise,
            self.sampling_timesteps(),
            self.mode,
            self.noise_like,
            self.sample_solver,
        )

        # the fake score learns the student's distribution, a learned real score the teacher's
        interpolation = self.score_interpolation(noise)
        self.fit_score("fake_score", self.fake_score, contexts, guidance, trajectory.sample, interpolation)
        teacher_sample = None
        if self.real_score is not None or (self.regression_weight and self.generator_turn()):
            with self.teacher.applied(self.model) as model:  # swapped in once for the whole rollout
                teacher_contexts = contexts.for_model(model)
                teacher_sample = roll_trajectory(
                    lambda x, t: teacher_contexts.velocity(x, t, guidance),
                    noise,
                    self.sampling_timesteps(self.real_score_steps, self.real_score_shift),
                ).sample
        if self.real_score is not None:
            self.fit_score("real_score", self.real_score, contexts, guidance, teacher_sample, interpolation)

        if not self.generator_turn():
            return
        index = int(torch.randint(trajectory.num_steps, (), generator=self.batch_generator))
        x0 = rerun_step(lambda x, t: self.velocity(contexts, x, t, guidance), trajectory, index)
        low, high = self.dmd_time_range
        times = shift_timesteps(low + (high - low) * self.rand((len(batch),)), self.dmd_time_shift)
        x_t = add_noise(x0.detach(), noise if self.mode == "ode" else self.noise_like(x0), times)
        with torch.no_grad():
            real = self.real_score if self.real_score is not None else self.teacher
            x0_real = predict_x0(x_t, self.velocity(contexts, x_t, times, guidance, real), times)
            x0_fake = predict_x0(x_t, self.velocity(contexts, x_t, times, guidance, self.fake_score), times)
        dmd = dmd_loss(x0, x0_real, x0_fake)
        losses = {"dmd": dmd.detach(), "fake_minus_real": (x0_fake - x0_real).float().abs().mean()}
        loss = dmd
        if self.regression_weight:
            regression = F.mse_loss(x0.float(), teacher_sample.float())
            loss = loss + self.regression_weight * regression
            losses["regression"] = regression.detach()
        critic = find_discriminator(self.trainer)
        if critic is not None:
            fake = add_noise(x0, self.noise_like(x0), times)
            adversarial = critic.generator_loss(fake, times, contexts)
            loss = loss + self.adversarial_weight * adversarial
            losses["adversarial"] = adversarial.detach()
        losses["loss"] = loss
        self.update("generator", {**losses, "step_index": torch.tensor(float(index))})
        if critic is not None:
            clean = batch.clean_tokens(self.model)
            real = add_noise(clean, self.noise_like(clean), times)
            critic.update(self, real=real, fake=fake, t=times, condition=contexts)
