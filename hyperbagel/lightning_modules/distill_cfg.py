"""Stage 1, CFG distillation: one forward per sampling step instead of BAGEL's two or three.

The student is the teacher plus two zero-initialised guidance embedders (text scale, image scale) added
to the latent tokens like the time embedding; only the generation side and the embedders train. Per
sample, scales are drawn (text ~ U[1, 5] for text-to-image and edits, image ~ U[1, 2.5] for edits only),
x_t is the clean target noised at a shifted logit-normal time (shift >= 3), and the student's one
conditional pass with those scales regresses the teacher's guided velocity: BAGEL's three contexts,
renorm and interval, computed by the very `ImageContexts.velocity` the sampler uses. The training CFG
interval defaults to (0, 1], so the student learns every scale at every t; at sampling time it then
follows any interval (outside it the sampler embeds scale 1, the teacher's conditional pass).

Contexts are prefilled once per batch with the teacher's original weights (clean context latents come
from the original generation weights, as in the paper's deployment) and queried by teacher and student.
The teacher is either a `GenerationWeights` copy swapped into the student (one copy of the understanding
weights; `teacher_copy="generation"`) or a separate frozen model (`"full"`, and always when sharded). Its
tensors are not written into training checkpoints (except sharded ones, which Lightning loads key for key):
a resumed run reloads them from `teacher`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torchvision.utils import make_grid

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained, load_config
from hyperbagel.backbone.config import PRESETS
from hyperbagel.backbone.flow import (
    RENORM_TYPES,
    CFGConfig,
    add_noise,
    sample_training_timesteps,
    sampling_schedule,
)
from hyperbagel.backbone.inference import ImageContexts, initial_noise, sample_latent_tokens
from hyperbagel.backbone.sharding import is_sharded, shard_bagel
from hyperbagel.distillation.batches import GenerationBatch, task_loss_weights, task_weighted_mean
from hyperbagel.distillation.generation_weights import (
    GENERATION_PATTERNS,
    GenerationWeights,
    check_generation_keys,
)
from hyperbagel.lightning_modules.base import BagelStage

TEACHER_COPIES = ("generation", "full")
TEACHER_PREFIXES = ("teacher_weights.", "teacher.")


@dataclass
class DistillationTargets:
    """One batch's regression problem: the student's contexts (prefilled by the teacher), noisy tokens
    x_t [B, N, D] at times [B], each sample's CFG setting and the teacher's guided velocity [B, N, D]."""

    contexts: ImageContexts
    x_t: torch.Tensor
    times: torch.Tensor
    cfgs: list[CFGConfig]
    velocity: torch.Tensor


def _scale_range(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)
    if not 1.0 <= low <= high:
        raise ValueError(f"{name} must satisfy 1 <= low <= high, got {value}")
    return low, high


class CFGDistillStage(BagelStage):
    """Distils BAGEL's classifier-free guidance into guidance embedders (Hyper-Bagel stage 1).

    Args:
        teacher: the CFG teacher's folder; default `model` itself (the usual start). When `model` is
            another folder (e.g. continuing from an earlier stage-1 export), the teacher must share its
            frozen weights and match its generation keys (refused with the keys listed otherwise).
        teacher_copy: "generation" (the teacher is a copy of the generation side swapped into the student;
            one copy of the understanding weights) or "full" (a separate frozen model). A sharded student
            (FSDP2) always gets a separate teacher, sharded the same way.
        teacher_quantize: "8bit" holds a "full" teacher's decoder layers in bitsandbytes LLM.int8.
        text_scale_range / img_scale_range: uniform ranges of the sampled guidance scales (the image
            scale only for edits; text-to-image uses 1).
        timestep_shift: shift of the logit-normal training times (the paper requires >= 3).
        t2i_interval / edit_interval, t2i_renorm / edit_renorm, renorm_min: the teacher's CFG settings.
        task_weights: loss weight of each task's samples (default 1 each; an edit's guided target, up to
            5 x 2.5 guidance, misses by ~6x the text-to-image MSE on the shapes teacher).
        val_seed: fixes validation draws so validation losses are comparable.
        grid_examples / grid_timesteps: teacher-vs-student samples from the same noise logged to
            TensorBoard after each validation (0 examples disables).
        **kwargs: `BagelStage` arguments; `trainable` defaults to the generation side
            (`GENERATION_PATTERNS`, guidance embedders included).
    """

    default_trainable = GENERATION_PATTERNS

    def __init__(
        self,
        teacher: str | None = None,
        teacher_copy: str = "generation",
        teacher_quantize: str | None = None,
        text_scale_range: tuple[float, float] = (1.0, 5.0),
        img_scale_range: tuple[float, float] = (1.0, 2.5),
        timestep_shift: float = 3.0,
        t2i_interval: tuple[float, float] = (0.0, 1.0),
        edit_interval: tuple[float, float] = (0.0, 1.0),
        t2i_renorm: str = "global",
        edit_renorm: str = "text_channel",
        renorm_min: float = 0.0,
        task_weights: dict[str, float] | None = None,
        val_seed: int = 0,
        grid_examples: int = 4,
        grid_timesteps: int = 12,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if teacher_copy not in TEACHER_COPIES:
            raise ValueError(f"teacher_copy must be one of {TEACHER_COPIES}, got {teacher_copy!r}")
        if teacher_quantize is not None and teacher_copy != "full":
            raise ValueError("teacher_quantize needs teacher_copy='full' (a separate teacher model)")
        if timestep_shift <= 0:
            raise ValueError(f"timestep_shift must be positive, got {timestep_shift}")
        if timestep_shift < 3.0:
            rank_zero_warn(
                f"CFG distillation with timestep_shift {timestep_shift} < 3 (the paper needs >= 3)"
            )
        for renorm in (t2i_renorm, edit_renorm):
            if renorm not in RENORM_TYPES:
                raise ValueError(f"renorm must be one of {RENORM_TYPES}, got {renorm!r}")
        self.teacher_source = teacher
        self.teacher_copy = teacher_copy
        self.teacher_quantize = teacher_quantize
        self.text_scale_range = _scale_range("text_scale_range", text_scale_range)
        self.img_scale_range = _scale_range("img_scale_range", img_scale_range)
        self.timestep_shift = timestep_shift
        self.teacher_cfg = {
            "t2i": CFGConfig(interval=tuple(t2i_interval), renorm_type=t2i_renorm, renorm_min=renorm_min),
            "edit": CFGConfig(interval=tuple(edit_interval), renorm_type=edit_renorm, renorm_min=renorm_min),
        }
        self.task_weights = task_loss_weights(task_weights)
        self.val_seed = val_seed
        self.grid_examples = grid_examples
        self.grid_timesteps = grid_timesteps
        self.teacher_weights: GenerationWeights | None = None
        self.teacher: Bagel | None = None

    # --- models --------------------------------------------------------------------------------------
    def build_model(self) -> Bagel:
        """The student (the backbone plus guidance embedders) and, as a side model, the teacher."""
        model = super().build_model()
        separate = self.teacher_source is not None and self.teacher_source != self.model_source
        if not separate and model.has_guidance_embedders:
            raise ValueError(
                f"model {self.model_source} is already CFG-distilled (it has guidance embedders); give the "
                "CFG teacher it was distilled from as `teacher`"
            )
        if separate and load_config(self.teacher_source).guidance_embedders:
            raise ValueError(
                f"teacher {self.teacher_source} has guidance embedders; stage 1 needs a CFG teacher"
            )
        if self.teacher_copy == "generation" and self.sharding_mesh() is None:
            if separate:
                self.teacher_weights = GenerationWeights.load(self.teacher_source, model, check_shared=True)
            else:
                self.teacher_weights = GenerationWeights.from_model(model)
        else:
            self.teacher = self._full_teacher(model, separate)
        return model.add_guidance_embedders()

    def _full_teacher(self, model: Bagel, separate: bool) -> Bagel:
        if self.model_source in PRESETS and not separate:  # a random preset: the teacher is its copy
            teacher = Bagel(model.config)
            teacher.load_state_dict(model.state_dict())
        else:
            source = self.teacher_source if separate else self.model_source
            teacher = from_pretrained(source, quantize=self.teacher_quantize, load_autoencoder=False)
            own = {name: tuple(p.shape) for name, p in model.named_parameters()}
            check_generation_keys(own, {n: tuple(p.shape) for n, p in teacher.named_parameters()}, source)
        teacher.autoencoder = model._autoencoder  # shared: it encodes the edits' source images
        teacher.requires_grad_(False).eval()
        if (mesh := self.sharding_mesh()) is not None:
            if self.teacher_quantize is not None:
                raise ValueError("teacher_quantize cannot be combined with sharding (bitsandbytes layers)")
            shard_bagel(teacher, mesh)
        return teacher

    @contextmanager
    def as_teacher(self) -> Iterator[Bagel]:
        """The teacher model for the forwards inside the context (the student with the teacher's weights
        swapped in, or the separate teacher)."""
        if self.teacher is not None:
            yield self.teacher
            return
        with self.teacher_weights.applied(self.model) as teacher:
            yield teacher

    def train(self, mode: bool = True) -> CFGDistillStage:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    # --- the objective -------------------------------------------------------------------------------
    def sample_guidance(self, kinds: list[str], generator: torch.Generator | None) -> list[CFGConfig]:
        """Per-sample teacher CFG settings with freshly drawn scales (image scale 1 for text-to-image)."""
        draws = torch.rand(len(kinds), 2, generator=generator, device=self.device).cpu()
        (t_low, t_high), (i_low, i_high) = self.text_scale_range, self.img_scale_range
        cfgs = []
        for kind, (u_text, u_img) in zip(kinds, draws.tolist()):
            img_scale = i_low + (i_high - i_low) * u_img if kind == "edit" else 1.0
            cfgs.append(
                replace(
                    self.teacher_cfg[kind], text_scale=t_low + (t_high - t_low) * u_text, img_scale=img_scale
                )
            )
        return cfgs

    def batch_size_of(self, batch: GenerationBatch) -> int:
        return len(batch)

    def teacher_targets(
        self, batch: GenerationBatch, generator: torch.Generator | None
    ) -> DistillationTargets:
        """Draw times, noise and scales for a batch, prefill its contexts with the teacher and compute the
        teacher's guided velocity there (no gradients)."""
        clean = batch.clean_tokens(self.model)
        times = sample_training_timesteps(len(batch), self.timestep_shift, generator, device=self.device)
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        x_t = add_noise(clean, noise, times)
        cfgs = self.sample_guidance(batch.kinds, generator)
        with self.as_teacher() as teacher, torch.no_grad():
            contexts = batch.contexts(teacher)
            target = contexts.velocity(x_t, times, cfgs)
        return DistillationTargets(contexts.for_model(self.model), x_t, times, cfgs, target)

    def compute_losses(self, batch: GenerationBatch, stage: str) -> dict[str, torch.Tensor]:
        generator = None
        if stage == "val":
            generator = torch.Generator(device=self.device).manual_seed(self.val_seed)
        targets = self.teacher_targets(batch, generator)
        prediction = targets.contexts.velocity(targets.x_t, targets.times, targets.cfgs)
        per_sample = (prediction.float() - targets.velocity.float()).pow(2).mean(dim=(1, 2))
        losses = {"loss": task_weighted_mean(per_sample, batch.kinds, self.task_weights)}
        kinds = batch.is_edit.to(per_sample.device)
        for kind, mask in (("t2i", ~kinds), ("edit", kinds)):
            if bool(mask.any()):
                losses[f"mse_{kind}"] = per_sample[mask].mean().detach()
        mean_text_scale = sum(c.text_scale for c in targets.cfgs) / len(targets.cfgs)
        losses["text_scale"] = torch.tensor(mean_text_scale, device=self.device)
        return losses

    # --- samples and checkpoints ---------------------------------------------------------------------
    def validation_step(self, batch: GenerationBatch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if batch_idx == 0 and self.grid_examples > 0 and not self.trainer.sanity_checking:
            self.log_teacher_student_grid(batch)

    @torch.no_grad()
    def sample_pair(
        self, batch: GenerationBatch, num_timesteps: int, seed: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """(teacher, student) clean latent tokens [B, N, D] of a batch from the same noise, the teacher with
        CFG at the upper end of the scale ranges' defaults (text 4, image 2), the student one pass a step."""
        cfgs = [
            replace(self.teacher_cfg[kind], text_scale=4.0, img_scale=2.0 if kind == "edit" else 1.0)
            for kind in batch.kinds
        ]
        grid = sampling_schedule(num_timesteps, 3.0, device=self.device)
        noise = initial_noise(self.model, len(batch), batch.grid, seed)
        with self.as_teacher() as teacher:
            contexts = batch.contexts(teacher)
            teacher_tokens = sample_latent_tokens(contexts, noise, grid, cfgs)
        student_tokens = sample_latent_tokens(contexts.for_model(self.model), noise, grid, cfgs)
        return teacher_tokens, student_tokens

    def log_teacher_student_grid(self, batch: GenerationBatch) -> None:
        """TensorBoard `samples/teacher_student`: rows of [target | teacher | student] from the same noise.
        Every rank samples (a sharded model's layers are gathered by all ranks together); rank 0 writes."""
        writer = next((lg.experiment for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None:
            return
        count = min(self.grid_examples, len(batch))
        part = GenerationBatch(
            kinds=batch.kinds[:count],
            conditional=batch.conditional[:count],
            no_text=batch.no_text[:count],
            no_image=batch.no_image[:count] if batch.no_image is not None else None,
            grid=batch.grid,
            target_images=batch.target_images[:count] if batch.target_images is not None else None,
            texts=batch.texts[:count],
        )
        teacher, student = self.sample_pair(part, self.grid_timesteps)
        images = [self.model.decode_tokens(tokens, part.grid) for tokens in (teacher, student)]
        if part.target_images is not None:
            images.insert(0, part.target_images.to(images[0].device, images[0].dtype))
        if not self.trainer.is_global_zero:
            return
        tiles = torch.stack(images, dim=1).flatten(0, 1).float().clamp(-1, 1) * 0.5 + 0.5
        writer.add_image(
            "samples/teacher_student", make_grid(tiles.cpu(), nrow=len(images), padding=2), self.global_step
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the teacher out: it is reloaded from `teacher` (or `model`) when the run resumes. A sharded
        checkpoint keeps it: it is loaded key for key into the sharded modules, every key required."""
        super().on_save_checkpoint(checkpoint)
        if is_sharded(self):
            return
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(TEACHER_PREFIXES)]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.setdefault("state_dict", {})
        for key, tensor in self.state_dict().items():
            if key.startswith(TEACHER_PREFIXES):
                state.setdefault(key, tensor)
