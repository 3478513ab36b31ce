"""Base of stages that train several models in one step (Lightning manual optimization).

Adversarial and distribution-matching stages update a generator and one or more side models (a
discriminator, a fake-score model) in a fixed order within each batch. Lightning's automatic loop cannot
do that, and its manual mode leaves accumulation, clipping, scheduling and step counting to the module;
this base does them once for every such stage:

- a subclass computes losses and calls `update(name, losses)` once per model, in order;
- gradients accumulate over `accumulate_grad_batches` batches, then each optimizer that received them
  is clipped (its own norm), stepped once, zeroed, and its scheduler stepped once;
- `trainer.global_step` advances once per accumulated batch (not once per optimizer, as Lightning's
  manual mode would count), so `max_steps`, checkpoint intervals, EMA and exports mean the same as in
  single-optimizer stages;
- a NaN or inf in any loss term stops the run naming the step, the term and the last checkpoint written
  (or, with `on_nonfinite="skip"`, drops the whole accumulated step and counts it);
- the random draws of a batch come from `batch_generator`, seeded by (seed, batch index, rank), so a run
  resumed from a checkpoint draws exactly what an uninterrupted one draws; a draw that decides how many
  forwards a step runs comes from `step_generator`, seeded without the rank, because sharded ranks must
  all call the same layers.
Optimizers and schedulers are Lightning's, so they are in the checkpoint; callbacks (EMA, discriminator)
store their own state there.

`GenerationDistillStage` adds what the trajectory-distillation stages (TSCD, DMDO) share: a frozen
teacher copy of the generation side, contexts prefilled once per batch, per-sample guidance, and a
validation that compares the student's few-step samples with the teacher's from the same noise.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.distributed.tensor import DTensor
from torchvision.utils import make_grid

from hyperbagel.backbone.flow import CFGConfig, check_solver, sampling_schedule
from hyperbagel.backbone.inference import (
    ImageContexts,
    build_image_contexts,
    default_edit_cfg,
    default_t2i_cfg,
    initial_noise,
    sample_latent_tokens,
)
from hyperbagel.backbone.sharding import check_optimizer_shards, is_sharded
from hyperbagel.distillation.batches import GenerationBatch
from hyperbagel.distillation.generation_weights import GENERATION_PATTERNS
from hyperbagel.distillation.side_copies import SideCopy, generation_copy, load_generation_copy
from hyperbagel.lightning_modules.base import BagelStage, NonFiniteLossError, resume_hint

NONFINITE_POLICIES = ("stop", "skip")


@dataclass
class OptimizerSpec:
    """One model the stage updates: its parameters, optimizer / schedule factories and clipping norm."""

    name: str
    parameters: list[nn.Parameter]
    optimizer: OptimizerCallable
    lr_scheduler: LRSchedulerCallable | None = None
    gradient_clip_val: float | None = None


@torch.no_grad()
def clip_gradients(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Scale the gradients of `params` to total norm <= `max_norm` (None: only measure); returns the norm
    before clipping. Sharded (DTensor) and whole gradients are normed apart and combined, since one model
    may hold both (a sharded backbone with whole heads) and torch's one-call clip refuses the mix."""
    norms = []
    for sharded in (True, False):
        grads = [p.grad for p in params if isinstance(p.grad, DTensor) == sharded]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    if max_norm is not None:
        scale = min(1.0, max_norm / (float(total) + 1e-6))
        for param in params:
            param.grad.mul_(scale)
    return total


def _no_closure() -> None:
    """Backward already ran (accumulated over the step's batches) before the optimizer steps."""


class ManualStage(BagelStage):
    """A `BagelStage` whose training step updates several models through `update`.

    Args:
        accumulate_grad_batches: batches whose gradients are summed (each loss divided by this) before
            one optimizer step (Lightning's trainer option does not apply to manual optimization).
        gradient_clip_val: clip the generator's gradient norm to this (trainer option likewise).
        on_nonfinite: "stop" raises `NonFiniteLossError`; "skip" drops the accumulated step, counts it
            (`train/nonfinite_losses`) and stops only after `max_nonfinite_losses` in a row.
        seed: seeds `batch_generator` together with the batch index and the rank.
        **kwargs: everything `BagelStage` takes; `optimizer` / `lr_scheduler` build the generator's.

    `trainable_named_parameters` is restricted to the backbone (`model.*`): EMA and exports follow the
    generator, never side models held by the stage (teacher, fake score). Side modules named in
    `unsaved_modules` (frozen copies rebuilt from their source at every start) stay out of checkpoints,
    except sharded ones (Lightning loads those key for key into the modules, every key required).
    """

    unsaved_modules: tuple[str, ...] = ()

    def __init__(
        self,
        accumulate_grad_batches: int = 1,
        gradient_clip_val: float | None = None,
        on_nonfinite: str = "stop",
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be at least 1, got {accumulate_grad_batches}")
        if on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_POLICIES}, got {on_nonfinite!r}")
        if gradient_clip_val is not None and gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be positive, got {gradient_clip_val}")
        self.automatic_optimization = False
        # Lightning warns at every manual-optimization checkpoint that it holds the state after the step;
        # here that is the state global_step counts, so a resumed run continues exactly (tested)
        warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.on_nonfinite = on_nonfinite
        self.seed = seed
        self.batch_generator = torch.Generator()
        self.step_generator = torch.Generator()
        self._batch_idx = 0
        self._step_skipped = False
        self._used: dict[str, torch.optim.Optimizer] = {}  # optimizers that got gradients this step
        self._clip_of: dict[int, tuple[str, float | None]] = {}  # id(optimizer) -> (name, max norm)
        self._grad_norm: torch.Tensor | None = None

    # --- what trains -----------------------------------------------------------------------------------
    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and n.startswith("model.")]

    def optimizer_specs(self) -> list[OptimizerSpec]:
        """The models the stage's own optimizers update; subclasses append side models after "generator"."""
        parameters = [p for _, p in self.trainable_named_parameters()]
        clip = self.gradient_clip_val
        return [OptimizerSpec("generator", parameters, self.optimizer_factory, self.scheduler_factory, clip)]

    def configure_optimizers(self) -> list[dict[str, Any]]:
        specs = self.optimizer_specs()
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"optimizer names must be unique, got {names}")
        self._spec_names = names
        self._spec_clip = {spec.name: spec.gradient_clip_val for spec in specs}
        configs = []
        for spec in specs:
            if not spec.parameters:
                raise ValueError(f"optimizer {spec.name!r} has no parameters to train")
            optimizer = spec.optimizer(spec.parameters)
            check_optimizer_shards(optimizer)
            config: dict[str, Any] = {"optimizer": optimizer}
            if spec.lr_scheduler is not None:
                config["lr_scheduler"] = {"scheduler": spec.lr_scheduler(optimizer), "interval": "step"}
            configs.append(config)
        return configs

    def optimizer_named(self, name: str) -> tuple[torch.optim.Optimizer, Any]:
        """The stage's (optimizer, scheduler or None) registered under `name`."""
        if name not in self._spec_names:
            raise KeyError(f"no optimizer named {name!r}; this stage has {self._spec_names}")
        optimizer = self.trainer.optimizers[self._spec_names.index(name)]
        scheduler = next(
            (c.scheduler for c in self.trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer),
            None,
        )
        return optimizer, scheduler

    # --- the step --------------------------------------------------------------------------------------
    @abstractmethod
    def training_updates(self, batch: Any, batch_idx: int) -> None:
        """Compute each model's losses and call `update(name, losses)` for it, in update order."""

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._batch_idx = batch_idx
        self.batch_generator = self._seeded_generator(self.global_rank)
        self.step_generator = self._seeded_generator()
        self.training_updates(batch, batch_idx)
        if not self.ends_step():
            return
        if self._step_skipped:
            for optimizer in self._used.values():
                optimizer.zero_grad(set_to_none=True)
            self._step_skipped = False
        else:
            self.nonfinite_in_a_row = 0
            progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
            progress.increment_ready()
            progress.increment_completed()
        self._used = {}

    def ends_step(self) -> bool:
        """Whether the current batch closes an accumulated step (or the epoch)."""
        return (self._batch_idx + 1) % self.accumulate_grad_batches == 0 or self.trainer.is_last_batch

    def _seeded_generator(self, *more_entropy: int) -> torch.Generator:
        batch = self.trainer.fit_loop.epoch_loop.total_batch_idx
        entropy = [self.seed, batch, *more_entropy]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
        return torch.Generator().manual_seed(seed)

    def randn(self, shape: tuple[int, ...] | torch.Size, like: torch.Tensor | None = None) -> torch.Tensor:
        """Normal noise from `batch_generator` (drawn on the CPU, so it is the same on every device)."""
        noise = torch.randn(tuple(shape), generator=self.batch_generator)
        return noise if like is None else noise.to(like.device, like.dtype)

    def rand(self, shape: tuple[int, ...] | torch.Size, device: torch.device | None = None) -> torch.Tensor:
        """Uniform [0, 1) draws from `batch_generator` (float32)."""
        return torch.rand(tuple(shape), generator=self.batch_generator).to(device or self.device)

    def update(
        self,
        name: str,
        losses: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any = None,
        gradient_clip_val: float | None = None,
    ) -> bool:
        """Back-propagate `losses["loss"]` for model `name`; on the step's last batch clip, step, zero.

        The stage's own models are found by name; a callback passes its own optimizer, scheduler and
        clipping norm. Every term is logged as `train/<name>/<term>`. Returns False when nothing was
        back-propagated (the step is being skipped after a non-finite loss).
        """
        if optimizer is None:
            optimizer, scheduler = self.optimizer_named(name)
            gradient_clip_val = self._spec_clip[name]
        if self._step_skipped:
            return False
        bad = [term for term, value in losses.items() if not bool(torch.isfinite(value.detach()).all())]
        if bad:
            self._nonfinite(name, bad, losses)
            return False
        for term, value in losses.items():
            self.log(f"train/{name}/{term}", value.detach().float(), on_step=True, prog_bar=term == "loss")
        self.manual_backward(losses["loss"] / self.accumulate_grad_batches)
        self._used[name] = optimizer
        if self.ends_step():
            self._clip_of[id(optimizer)] = (name, gradient_clip_val)
            self.trainer.strategy.optimizer_step(optimizer, closure=_no_closure, model=self)
            optimizer.zero_grad(set_to_none=True)
            if self._grad_norm is not None:  # logged here: a log from the hook would reset this step's logs
                self.log(f"train/{name}/grad_norm", self._grad_norm, on_step=True)
                self._grad_norm = None
            if scheduler is not None:
                scheduler.step()
        return True

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip the stepping model's gradients (after unscaling under fp16) and keep their norm."""
        name, max_norm = self._clip_of.get(id(optimizer), (None, None))
        if name is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        self._grad_norm = clip_gradients(params, max_norm)

    # --- checkpoints -----------------------------------------------------------------------------------
    def _unsaved(self, key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in self.unsaved_modules)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if is_sharded(self):  # loaded key for key into the sharded modules, every key required
            return
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if self._unsaved(k)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the unsaved modules' keys with their current (freshly loaded) tensors for strict loading."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key, tensor in self.state_dict().items():
            if self._unsaved(key):
                state.setdefault(key, tensor)

    # --- faults ----------------------------------------------------------------------------------------
    def _nonfinite(self, name: str, bad: list[str], losses: dict[str, torch.Tensor]) -> None:
        values = {term: float(losses[term].detach().float().mean()) for term in bad}
        where = (
            f"non-finite loss {', '.join(f'{name}/{t} = {v}' for t, v in values.items())} at global step "
            f"{self.global_step} (batch {self._batch_idx})"
        )
        resume = resume_hint(self.trainer)
        if self.on_nonfinite == "stop":
            raise NonFiniteLossError(f"{where}; {resume}. Lower the learning rate or inspect the data.")
        self._step_skipped = True
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_losses", float(self.nonfinite_total), on_step=True)
        if self.nonfinite_in_a_row > self.max_nonfinite_losses:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row, the last {where}; {resume}."
            )


class GenerationDistillStage(ManualStage):
    """Base of the trajectory stages (TSCD, DMDO): a student that samples in a few one-pass steps, a frozen
    teacher held as a side copy (`side_copies`: swapped into the student, or a separate sharded model
    under FSDP2), the batch's contexts prefilled once under the teacher and queried by every model, and one
    CFG setting per sample (text-to-image or edit).

    Args:
        teacher: folder of the teacher's weights (its generation side is used; it must share the
            student's frozen weights, mismatched generation keys are refused with the keys listed);
            default (or `model` itself) a copy of the student's initial generation side.
        t2i_cfg / edit_cfg: guidance of text-to-image / edit samples, for every model (a guidance-distilled
            model embeds the scales; a CFG teacher runs the passes).
        sample_steps / sample_shift: the student's sampling grid, `sampling_schedule(steps + 1, shift)`.
        sample_solver: the student's ODE solver over that grid ("euler", BAGEL's, or "unipc"; one model call
            a step either way), for its validation samples and DMDO's trajectories (TSCD's jumps are Euler
            steps by construction).
        val_teacher_steps: the teacher's steps for the validation reference sample.
        val_seed: validation noise.
        grid_examples: teacher-vs-student samples (same noise) logged to TensorBoard per validation.
        **kwargs: `ManualStage` arguments; `trainable` defaults to the generation side.
    """

    default_trainable = GENERATION_PATTERNS
    unsaved_modules = ("teacher",)

    def __init__(
        self,
        teacher: str | None = None,
        t2i_cfg: CFGConfig | None = None,
        edit_cfg: CFGConfig | None = None,
        sample_steps: int = 6,
        sample_shift: float = 3.0,
        sample_solver: str = "euler",
        val_teacher_steps: int = 25,
        val_seed: int = 0,
        grid_examples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if sample_steps < 1 or val_teacher_steps < 1:
            raise ValueError(
                f"sample_steps and val_teacher_steps must be >= 1, got {sample_steps}, {val_teacher_steps}"
            )
        self.teacher_source = teacher
        self.cfgs = {"t2i": t2i_cfg or default_t2i_cfg(), "edit": edit_cfg or default_edit_cfg()}
        self.sample_steps = sample_steps
        self.sample_shift = sample_shift
        self.sample_solver = check_solver(sample_solver, "sample_solver")
        self.val_teacher_steps = val_teacher_steps
        self.val_seed = val_seed
        self.grid_examples = grid_examples
        self.teacher: SideCopy | None = None

    def configure_model(self) -> None:
        if self.model is not None:
            return
        super().configure_model()
        if self.teacher_source is None or self.teacher_source == self.model_source:
            self.teacher = generation_copy(self.model)  # before a checkpoint is restored
        else:
            self.teacher = load_generation_copy(self.teacher_source, self.model)

    def batch_size_of(self, batch: GenerationBatch) -> int:
        return len(batch)

    # --- shared pieces of a step -----------------------------------------------------------------------
    def guidance(self, batch: GenerationBatch) -> list[CFGConfig]:
        return [self.cfgs[kind] for kind in batch.kinds]

    def sampling_timesteps(self, steps: int | None = None, shift: float | None = None) -> torch.Tensor:
        """An Euler grid of `steps` (default the student's) at `shift` (default the student's)."""
        steps, shift = steps or self.sample_steps, self.sample_shift if shift is None else shift
        return sampling_schedule(steps + 1, shift, device=self.device)

    def fresh_noise(self, contexts: ImageContexts) -> torch.Tensor:
        """Gaussian latent tokens [B, N, D] for the contexts' prompts, from `batch_generator`: where a
        trajectory of the student starts."""
        shape = (contexts.batch_size, contexts.num_tokens, self.model.config.latent_token_dim)
        return self.randn(shape, like=self.model.vae2llm.weight)

    @torch.no_grad()
    def prefill(self, batch: GenerationBatch) -> ImageContexts:
        """The batch's contexts prefilled under the teacher's weights; the unconditional ones only when
        some model of the stage samples with CFG (has no guidance embedders)."""
        with self.teacher.applied(self.model) as model:
            if self.needs_cfg_contexts():
                contexts = batch.contexts(model)
            else:
                contexts = build_image_contexts(model, batch.conditional, None, None, batch.grid)
        return contexts.for_model(self.model)

    def needs_cfg_contexts(self) -> bool:
        return not (self.model.has_guidance_embedders and self.teacher.has_guidance_embedders)

    def velocity(
        self,
        contexts: ImageContexts,
        x: torch.Tensor,
        t: torch.Tensor,
        guidance: list[CFGConfig],
        side: SideCopy | None = None,
    ) -> torch.Tensor:
        """Guided velocity of the student, or of the side model `side` (teacher, fake score)."""
        if side is None:
            return contexts.for_model(self.model).velocity(x, t, guidance)
        with side.applied(self.model) as model:
            return contexts.for_model(model).velocity(x, t, guidance)

    # --- validation: the student's few-step sample against the teacher's from the same noise -----------
    @torch.no_grad()
    def sample_pair(self, batch: GenerationBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher, student) clean tokens [B, N, D] from the same seeded noise."""
        contexts, guidance = self.prefill(batch), self.guidance(batch)
        noise = initial_noise(self.model, len(batch), batch.grid, self.val_seed)
        student = sample_latent_tokens(
            contexts, noise, self.sampling_timesteps(), guidance, solver=self.sample_solver
        )
        with self.teacher.applied(self.model) as model:
            teacher_steps = self.sampling_timesteps(self.val_teacher_steps)
            teacher = sample_latent_tokens(contexts.for_model(model), noise, teacher_steps, guidance)
        return teacher, student

    def compute_losses(self, batch: GenerationBatch, stage: str) -> dict[str, torch.Tensor]:
        teacher, student = self.sample_pair(batch)
        self._val_pair = (teacher, student)
        mse = (student.float() - teacher.float()).pow(2).mean()
        return {"loss": mse, "sample_mse": mse}

    def validation_step(self, batch: GenerationBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and self.grid_examples > 0 and not self.trainer.sanity_checking:
            self.log_teacher_student_grid(batch, *self._val_pair)

    def log_teacher_student_grid(
        self, batch: GenerationBatch, teacher: torch.Tensor, student: torch.Tensor
    ) -> None:
        """TensorBoard `samples/teacher_student`: rows of [target |] teacher | student, same noise."""
        writer = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None or not self.trainer.is_global_zero:
            return
        count = min(self.grid_examples, len(batch))
        images = [self.model.decode_tokens(tokens[:count], batch.grid) for tokens in (teacher, student)]
        if batch.target_images is not None:
            images.insert(0, batch.target_images[:count].to(images[0].device, images[0].dtype))
        tiles = torch.stack(images, dim=1).flatten(0, 1).float().clamp(-1, 1) * 0.5 + 0.5
        grid = make_grid(tiles.cpu(), nrow=len(images), padding=2)
        writer.add_image("samples/teacher_student", grid, self.global_step)
