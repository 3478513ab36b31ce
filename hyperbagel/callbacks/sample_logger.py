"""Generated images, edits and answers in TensorBoard after validation, from a fixed set of inputs.

Losses say little about what a generator draws; a grid of samples from the same prompts and the same
noise at every validation shows it. The inputs are given inline or drawn from the shapes world's
validation split (which also supplies the exact edit target and the expected answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

from hyperbagel.backbone.image_transforms import resize_to_stride
from hyperbagel.backbone.inference import BagelInferencer, default_edit_cfg, default_t2i_cfg
from hyperbagel.callbacks.ema import chosen_weights, require_ema
from hyperbagel.datamodules.shapes import ShapesWorld

ImageSource = str | Path | Image.Image


def _open(source: ImageSource) -> Image.Image:
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"SampleLogger example image not found: {path}")
    with Image.open(path) as image:
        return image.convert("RGB")


@dataclass
class EditExample:
    source: Image.Image
    instruction: str
    target: Image.Image | None = None


@dataclass
class VQAExample:
    image: Image.Image
    question: str
    answer: str | None = None


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _grid(rows: Sequence[Sequence[Image.Image]]) -> torch.Tensor:
    """[3, H, W] grid, one input per row; every image is resized to the first one's size."""
    size = rows[0][0].size
    tiles = [TF.to_tensor(image.convert("RGB").resize(size)) for row in rows for image in row]
    return make_grid(tiles, nrow=len(rows[0]), padding=2, pad_value=1.0)


class SampleLogger(Callback):
    """Logs samples of the stage's model every `every_n_validations` validations (rank 0, TensorBoard).

    Args:
        t2i_prompts: text-to-image prompts.
        edit_examples: (image, instruction) pairs; images as paths or PIL images.
        vqa_questions: (image, question) pairs.
        shapes_world: draw `num_examples` inputs of each kind not given inline from the shapes world's
            validation split (with the exact edit targets and expected answers).
        num_examples: how many shapes-world inputs of each kind.
        canvas_size: shapes-world canvas side in pixels (the model's transforms resize it).
        image_size: text-to-image resolution (default: the model's largest VAE image size).
        num_timesteps / timestep_shift: the sampling grid (few points keep the callback cheap).
        text_scale / img_scale: classifier-free guidance scales (BAGEL's intervals and renorms).
        seed: noise seed, fixed so successive grids differ only by the weights.
        max_new_tokens: answer length limit.
        use_ema: sample with the average of the trainer's `EMA` callback (else the raw weights).

    Tags: `samples/t2i` (+ `samples/t2i_prompts`), `samples/edit` ([source | edited | target] rows,
    + `samples/edit_instructions`), `samples/vqa_images` and `samples/vqa` (question / answer table).
    """

    def __init__(
        self,
        t2i_prompts: list[str] | None = None,
        edit_examples: list[tuple[ImageSource, str]] | None = None,
        vqa_questions: list[tuple[ImageSource, str]] | None = None,
        shapes_world: bool = False,
        num_examples: int = 2,
        canvas_size: int = 64,
        every_n_validations: int = 1,
        image_size: int | None = None,
        num_timesteps: int = 6,
        timestep_shift: float = 3.0,
        text_scale: float = 4.0,
        img_scale: float = 2.0,
        seed: int = 0,
        max_new_tokens: int = 32,
        use_ema: bool = False,
    ) -> None:
        if every_n_validations < 1:
            raise ValueError(f"every_n_validations must be at least 1, got {every_n_validations}")
        if num_timesteps < 2:
            raise ValueError(f"num_timesteps must be at least 2 (one step), got {num_timesteps}")
        self.t2i_prompts = list(t2i_prompts or [])
        self.edit_examples = [EditExample(_open(image), text) for image, text in edit_examples or []]
        self.vqa_examples = [VQAExample(_open(image), text) for image, text in vqa_questions or []]
        if shapes_world:
            self._add_shapes_examples(num_examples, canvas_size)
        if not (self.t2i_prompts or self.edit_examples or self.vqa_examples):
            raise ValueError(
                "SampleLogger has nothing to sample: give prompts, examples or shapes_world=True"
            )
        self.every_n_validations = every_n_validations
        self.image_size = image_size
        self.num_timesteps = num_timesteps
        self.timestep_shift = timestep_shift
        self.t2i_cfg = replace(default_t2i_cfg(), text_scale=text_scale)
        self.edit_cfg = replace(default_edit_cfg(), text_scale=text_scale, img_scale=img_scale)
        self.seed = seed
        self.max_new_tokens = max_new_tokens
        self.use_ema = use_ema
        self.validations = 0
        self._warned = False

    def _add_shapes_examples(self, num_examples: int, canvas_size: int) -> None:
        world = ShapesWorld(canvas_size=canvas_size)
        if not self.t2i_prompts:
            self.t2i_prompts = [s.prompt for s in world.samples("t2i", "val", num_examples)]
        if not self.edit_examples:
            self.edit_examples = [
                EditExample(s.source_image, s.instruction, s.target_image)
                for s in world.samples("edit", "val", num_examples)
            ]
        if not self.vqa_examples:
            self.vqa_examples = [
                VQAExample(s.image, s.question, s.answer) for s in world.samples("vqa", "val", num_examples)
            ]

    # --- hooks ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.validations = state_dict.get("validations", 0)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.use_ema:
            require_ema(trainer, type(self).__name__)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.validations += 1
        if self.validations % self.every_n_validations or not trainer.is_global_zero:
            return
        writer = self._writer(trainer)
        if writer is None:
            return
        with chosen_weights(trainer, pl_module, self.use_ema, type(self).__name__):
            self.log_samples(pl_module.model, pl_module.tokenizer, writer, trainer.global_step)

    def _writer(self, trainer: Trainer) -> Any:
        """The SummaryWriter of the trainer's TensorBoard logger, or None (warned once)."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned:
            rank_zero_warn(
                "SampleLogger logs to TensorBoard only; no TensorBoardLogger found, skipping samples"
            )
            self._warned = True
        return None

    # --- sampling ------------------------------------------------------------------------------------
    @torch.no_grad()
    def log_samples(self, model: nn.Module, tokenizer: Any, writer: Any, step: int) -> None:
        """Sample every input with `model` in eval mode and write them; module modes are restored after."""
        modes = [(module, module.training) for module in model.modules()]
        try:
            inferencer = BagelInferencer(model, tokenizer)
            if self.t2i_prompts:
                self._log_t2i(inferencer, writer, step)
            if self.edit_examples:
                self._log_edits(inferencer, writer, step)
            if self.vqa_examples:
                self._log_vqa(inferencer, writer, step)
        finally:
            for module, training in modes:
                module.training = training

    def _sampling(self) -> dict[str, Any]:
        return {"num_timesteps": self.num_timesteps, "timestep_shift": self.timestep_shift, "seed": self.seed}

    def _log_t2i(self, inferencer: BagelInferencer, writer: Any, step: int) -> None:
        size = self.image_size or inferencer.config.vae_max_image_size
        images = inferencer.text_to_image(
            self.t2i_prompts, height=size, width=size, cfg=self.t2i_cfg, **self._sampling()
        )
        writer.add_image("samples/t2i", _grid([[image] for image in images]), step)
        rows = [(str(i), prompt) for i, prompt in enumerate(self.t2i_prompts)]
        writer.add_text("samples/t2i_prompts", _markdown_table(["#", "prompt"], rows), step)

    def _log_edits(self, inferencer: BagelInferencer, writer: Any, step: int) -> None:
        config = inferencer.config
        rows = []
        for example in self.edit_examples:
            edited = inferencer.edit(
                example.source, example.instruction, cfg=self.edit_cfg, **self._sampling()
            )[0]
            source = resize_to_stride(
                example.source, config.image_stride, config.vae_max_image_size, config.vae_min_image_size
            )
            rows.append([source, edited] + ([example.target] if example.target is not None else []))
        width = max(len(row) for row in rows)
        blank = Image.new("RGB", rows[0][0].size, "white")
        writer.add_image("samples/edit", _grid([row + [blank] * (width - len(row)) for row in rows]), step)
        table = [(str(i), e.instruction) for i, e in enumerate(self.edit_examples)]
        writer.add_text("samples/edit_instructions", _markdown_table(["#", "instruction"], table), step)

    def _log_vqa(self, inferencer: BagelInferencer, writer: Any, step: int) -> None:
        examples = self.vqa_examples
        answers = inferencer.chat(
            [e.question for e in examples], [e.image for e in examples], max_new_tokens=self.max_new_tokens
        )
        writer.add_image("samples/vqa_images", _grid([[e.image] for e in examples]), step)
        rows = [
            (str(i), e.question, answer, e.answer or "")
            for i, (e, answer) in enumerate(zip(examples, answers, strict=True))
        ]
        writer.add_text("samples/vqa", _markdown_table(["#", "question", "answer", "expected"], rows), step)
