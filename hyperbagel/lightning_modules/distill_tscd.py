"""Stage 2, TSCD: trajectory segmented consistency distillation with an adversarial loss.

The time axis is cut into segments (3 in Hyper-Bagel). Per batch a segment and a time t in it are drawn,
the clean target is noised to x_t, and the student jumps from x_t to the segment's lower edge in one Euler
step. The target of that jump is the teacher's trajectory from x_t (a few teacher Euler steps) completed
to the edge by a frozen student jump (the current student without gradients, or its EMA). The paper
trains the jump with a pure adversarial loss (the `AdversarialDiscriminator` callback sees real = target
and fake = jump at the edge time, in the sample's context); an MSE or Huber consistency term with its own
weight schedule is available for the ablation (Hyper-SD style). Only the generation side trains.

Where the jump starts is a choice. The paper (after Hyper-SD) noises the clean latent to a random t of a
random segment, so the student learns jumps from the data's noised marginals. `start="rollout"` instead
makes every segment one step of the student's own sampling grid and starts each jump from the state the
student itself reaches there, by sampling from fresh noise without gradients (on-policy, as DAgger
trains a policy on the states it visits): an error of an early step is then seen, and corrected, by the
later steps' training instead of only at sampling time. With the teacher integrating the whole segment
(`teacher_span=1.0`), a student that fits its targets exactly samples the teacher's own ODE solution,
segment by segment. No clean latent is used in that mode (the prompts are the data).

What a rollout jump aims at is a choice too. `rollout_target="state"` continues the teacher's ODE from the
state the student reached, so an early error is carried on, not undone. `rollout_target="noise"` aims at
the teacher's own trajectory from the same initial noise (integrated from that noise to the jump's lower
edge): the expert's corrective action of DAgger, which steers the student back onto the teacher's path
and fits, step by step, the few-step sample to the teacher's sample from the same noise (on the shapes
demo its 6-step student scored level with the state target's: README, "Distillation").
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from hyperbagel.backbone.flow import CFGConfig, add_noise
from hyperbagel.backbone.inference import ImageContexts, sample_latent_tokens
from hyperbagel.callbacks.discriminator import find_discriminator
from hyperbagel.callbacks.ema import require_ema
from hyperbagel.distillation.batches import GenerationBatch, task_loss_weights, task_weighted_mean
from hyperbagel.distillation.tscd import (
    CONSISTENCY_LOSSES,
    LinearRamp,
    Segments,
    consistency_loss,
    consistency_target,
    euler_jump,
)
from hyperbagel.lightning_modules.manual import GenerationDistillStage

TARGETS = ("student", "ema")
STARTS = ("noised", "rollout")
ROLLOUT_TARGETS = ("state", "noise")


class DistillTSCDStage(GenerationDistillStage):
    """Hyper-Bagel stage 2 (TSCD).

    Args:
        segments: descending segment edges from 1.0 to 0.0; default 3 equal segments of the student's
            shifted sampling grid (`Segments.uniform(3, sample_shift)`: 1, 6/7, 3/5, 0 at shift 3). With
            `start="rollout"` the segments are the sampling grid's steps (None, or exactly those edges).
        start: "noised" (the paper: the clean latent noised to a random time of a random segment) or
            "rollout" (the student's own no-grad sampler state at a random step of its grid).
        teacher_span: the teacher integrates this fraction of the remaining segment, from t toward the
            lower edge (1.0: the whole way, no target-student jump).
        teacher_steps: Euler steps of the teacher over that span (per segment, from the noise, under
            `rollout_target="noise"`).
        rollout_target: under rollout starts, "state" (the teacher's ODE from the student's state) or
            "noise" (the teacher's ODE from the same initial noise); see the module docstring.
        target: "student" (the current student without gradients) or "ema" (the EMA callback's average)
            completes the target to the edge.
        adversarial_weight: weight schedule of the adversarial term (needs the discriminator callback).
        consistency_loss: None (the paper), "mse" or "huber" on jump vs target.
        consistency_weight: weight schedule of the consistency term.
        huber_delta: Huber threshold.
        task_weights: weight of each task's samples in the consistency term (default 1 each; see
            `CFGDistillStage`).
        **kwargs: `GenerationDistillStage` arguments (model, teacher, guidance, sampling grid, ...).
    """

    def __init__(
        self,
        segments: list[float] | None = None,
        teacher_span: float = 0.5,
        teacher_steps: int = 1,
        target: str = "student",
        start: str = "noised",
        rollout_target: str = "state",
        adversarial_weight: LinearRamp | None = None,
        consistency_loss: str | None = None,
        consistency_weight: LinearRamp | None = None,
        huber_delta: float = 0.1,
        task_weights: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 < teacher_span <= 1.0:
            raise ValueError(f"teacher_span is a fraction of the segment in (0, 1], got {teacher_span}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if consistency_loss is not None and consistency_loss not in CONSISTENCY_LOSSES:
            raise ValueError(
                f"consistency_loss must be None or one of {CONSISTENCY_LOSSES}, got {consistency_loss!r}"
            )
        if start not in STARTS:
            raise ValueError(f"start must be one of {STARTS}, got {start!r}")
        if rollout_target not in ROLLOUT_TARGETS:
            raise ValueError(f"rollout_target must be one of {ROLLOUT_TARGETS}, got {rollout_target!r}")
        if rollout_target == "noise" and (start != "rollout" or teacher_span != 1.0):
            raise ValueError(
                "rollout_target='noise' aims at the teacher's trajectory from the rollout's own noise: "
                f"it needs start='rollout' and teacher_span=1.0, got start={start!r}, "
                f"teacher_span={teacher_span}"
            )
        if start == "rollout" and self.sample_solver != "euler":
            raise ValueError(
                "start='rollout' trains the student's Euler steps from the states its Euler sampler reaches: "
                f"it needs sample_solver='euler', got {self.sample_solver!r}"
            )
        self.start = start
        self.rollout_target = rollout_target
        self.segments = self.segments_for(segments)
        self.teacher_span = teacher_span
        self.teacher_steps = teacher_steps
        self.target = target
        self.adversarial_weight = adversarial_weight or LinearRamp(1.0)
        self.consistency_kind = consistency_loss
        self.consistency_weight = consistency_weight or LinearRamp(1.0 if consistency_loss else 0.0)
        self.huber_delta = huber_delta
        self.task_weights = task_loss_weights(task_weights)

    def segments_for(self, edges: list[float] | None) -> Segments:
        """The configured segments; under rollout starts, the student's sampling grid (its float32 times)."""
        if self.start == "noised":
            return Segments(edges) if edges is not None else Segments.uniform(3, self.sample_shift)
        grid = [float(t) for t in self.sampling_timesteps()]
        differs = edges is not None and (
            len(edges) != len(grid) or any(abs(a - b) > 1e-6 for a, b in zip(edges, grid))
        )
        if differs:
            raise ValueError(
                f"start='rollout' jumps one sampling step at a time: segments must be the sampling grid "
                f"{[round(t, 6) for t in grid]} (sample_steps {self.sample_steps}, sample_shift "
                f"{self.sample_shift}) or null, got {edges}"
            )
        return Segments(grid)

    def setup(self, stage: str) -> None:
        if stage == "fit" and find_discriminator(self.trainer) is None and self.consistency_kind is None:
            raise ValueError(
                "TSCD needs a loss: add the hyperbagel.callbacks.discriminator.AdversarialDiscriminator "
                "callback (the paper's adversarial loss) or set consistency_loss to 'mse' or 'huber'"
            )
        if stage == "fit" and self.target == "ema":
            require_ema(self.trainer, f"{type(self).__name__} with target='ema'; it")

    def target_weights(self) -> AbstractContextManager[Any]:
        """The weights that complete the target: the EMA average swapped in, or the student as it is."""
        if self.target == "ema":
            return require_ema(self.trainer, type(self).__name__).swapped_in(self)
        return nullcontext()

    @torch.no_grad()
    def rollout_state(
        self, contexts: ImageContexts, guidance: list[CFGConfig], noise: torch.Tensor, index: int
    ) -> torch.Tensor:
        """The state the student's sampler reaches at grid time `edges[index]` from `noise`, run with the
        weights that complete targets (the student without gradients, or its EMA)."""
        if index == 0:
            return noise
        grid = torch.tensor(self.segments.edges[: index + 1], dtype=torch.float32)
        with self.target_weights():
            return sample_latent_tokens(contexts, noise, grid, guidance)

    @torch.no_grad()
    def teacher_trajectory(
        self, contexts: ImageContexts, guidance: list[CFGConfig], noise: torch.Tensor, index: int
    ) -> torch.Tensor:
        """The teacher's ODE from `noise` to the lower edge of segment `index`, `teacher_steps` Euler steps
        a segment: where the teacher's own trajectory is when the student's jump lands."""
        edges = self.segments.edges[: index + 2]
        pieces = [torch.linspace(a, b, self.teacher_steps + 1)[:-1] for a, b in zip(edges, edges[1:])]
        grid = torch.cat([*pieces, torch.tensor(edges[-1:])])
        with self.teacher.applied(self.model) as teacher:  # once for the whole integration
            return sample_latent_tokens(contexts.for_model(teacher), noise, grid, guidance)

    def jump_start(
        self, batch: GenerationBatch, contexts: ImageContexts, guidance: list[CFGConfig]
    ) -> tuple[torch.Tensor, float, int, torch.Tensor | None]:
        """(x_t, t, segment index, the rollout's noise or None) of this step's jump: see the module
        docstring on `start`."""
        if self.start == "rollout":
            index = int(torch.randint(self.segments.num_segments, (), generator=self.step_generator))
            t = self.segments.bounds(index)[1]
            noise = self.fresh_noise(contexts)
            return self.rollout_state(contexts, guidance, noise, index), t, index, noise
        clean = batch.clean_tokens(self.model)
        t, index = self.segments.sample(self.batch_generator)
        return add_noise(clean, self.randn(clean.shape, like=clean), t), t, index, None

    @torch.no_grad()
    def jump_target(
        self,
        contexts: ImageContexts,
        guidance: list[CFGConfig],
        x_t: torch.Tensor,
        t: float,
        index: int,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        """Where the jump from x_t should land: see the module docstring on `rollout_target`."""
        if self.rollout_target == "noise":
            return self.teacher_trajectory(contexts, guidance, noise, index)
        lower = self.segments.bounds(index)[0]
        with self.target_weights():
            return consistency_target(
                lambda x, s: self.velocity(contexts, x, s, guidance, self.teacher),
                lambda x, s: self.velocity(contexts, x, s, guidance),
                x_t,
                t,
                lower,
                teacher_span=self.teacher_span * (t - lower),
                teacher_steps=self.teacher_steps,
            )

    def training_updates(self, batch: GenerationBatch, batch_idx: int) -> None:
        guidance, contexts = self.guidance(batch), self.prefill(batch)
        x_t, t, index, noise = self.jump_start(batch, contexts, guidance)
        lower = self.segments.bounds(index)[0]
        time, edge = torch.tensor(t), torch.tensor(lower)
        target = self.jump_target(contexts, guidance, x_t, t, index, noise)
        jump = euler_jump(x_t, self.velocity(contexts, x_t, time, guidance), t, lower)

        step = self.global_step
        losses: dict[str, torch.Tensor] = {}
        total = jump.new_zeros((), dtype=torch.float32)
        critic = find_discriminator(self.trainer)
        if critic is not None:
            losses["adversarial"] = critic.generator_loss(jump, edge, contexts)
            total = total + self.adversarial_weight(step) * losses["adversarial"]
        if self.consistency_kind is not None:
            misses = consistency_loss(jump, target, self.consistency_kind, self.huber_delta, per_sample=True)
            losses["consistency"] = task_weighted_mean(misses, batch.kinds, self.task_weights)
            total = total + self.consistency_weight(step) * losses["consistency"]
        losses["target_mse"] = F.mse_loss(jump.detach().float(), target.float())
        losses["segment"] = torch.tensor(float(index))
        self.update("generator", {"loss": total, **losses})
        if critic is not None:
            critic.update(self, real=target, fake=jump, t=edge, condition=contexts)
