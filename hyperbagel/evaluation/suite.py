"""Shapes-world quality suite over a `BagelInferencer`: generate, resize, score, time.

The teacher benchmark and every later student benchmark run the same three tasks through these
functions, so their figures are comparable: the same test samples, the same initial noise per sample
index (`seed + i`, drawn in latent space on the CPU), the same scorers. The model may work at another
resolution than the world's canvas (the tiny preset makes 32 px images of 64 px scenes): its inputs are
resized by the inferencer's own VAE / ViT transforms, and its outputs are scaled to the canvas with
nearest-neighbour sampling before scoring, since the scorers judge canvas-size images.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.utils import save_image

from hyperbagel.backbone.flow import CFGConfig, count_nfe, sampling_schedule
from hyperbagel.backbone.inference import BagelInferencer, default_t2i_cfg
from hyperbagel.datamodules.shapes import EDIT_KINDS, VQA_CATEGORIES, EditSample, T2ISample, VQASample
from hyperbagel.evaluation.editing import score_edits, scores_from_edits
from hyperbagel.evaluation.geneval import geneval_passes, scores_from_passes
from hyperbagel.evaluation.understanding import answer_accuracy, normalize_answer

# Tokens allowed past the longest reference answer of a batch: an answer must end (<|im_end|>) within
# reference + 1 tokens to be exact anyway; the rest only shows how far a wrong answer runs on.
ANSWER_MARGIN = 8


@dataclass(frozen=True)
class SamplerSettings:
    """An image sampler: BAGEL's grid of `num_timesteps` points shifted by `shift`, its CFG, and the ODE
    solver over the grid (BAGEL's "euler", or "unipc"; one model call a step either way)."""

    num_timesteps: int = 50
    shift: float = 3.0
    cfg: CFGConfig = field(default_factory=default_t2i_cfg)
    solver: str = "euler"

    def sampling_kwargs(self) -> dict[str, Any]:
        """The grid and solver arguments of `BagelInferencer.text_to_image` / `edit`."""
        return {"num_timesteps": self.num_timesteps, "timestep_shift": self.shift, "solver": self.solver}

    @property
    def nfe(self) -> int:
        """Model evaluations per image (each pass of a stacked CFG batch counts once per image)."""
        return count_nfe(sampling_schedule(self.num_timesteps, self.shift), self.cfg)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_timesteps": self.num_timesteps,
            "shift": self.shift,
            "text_scale": self.cfg.text_scale,
            "img_scale": self.cfg.img_scale,
            "interval": list(self.cfg.interval),
            "renorm_type": self.cfg.renorm_type,
            "renorm_min": self.cfg.renorm_min,
            "solver": self.solver,
        }


@dataclass
class TaskResult:
    """Scores of one task, a finer breakdown (per edit kind / question category), the outputs in
    sample order (canvas-size images or answer strings), the seconds spent producing them and, where
    the task scores each output on its own, those scores in sample order (text-to-image: pass/fail
    verdicts; editing: `EditScore`s), for paired comparisons of two models on the same samples."""

    scores: dict[str, float]
    breakdown: dict[str, float]
    outputs: list[Any]
    seconds: float
    per_sample: list[Any] = field(default_factory=list)


def to_canvas(image: Image.Image, size: int) -> Image.Image:
    """`image` as an RGB size x size canvas (nearest-neighbour, so flat colours stay flat)."""
    image = image.convert("RGB")
    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.NEAREST)


def _batched(n: int, batch_size: int, run: Callable[[slice], list[Any]]) -> tuple[list[Any], float]:
    """Outputs of `run` over consecutive slices of range(n), concatenated, and the seconds taken."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    outputs: list[Any] = []
    for first in range(0, n, batch_size):
        outputs += run(slice(first, min(first + batch_size, n)))
    return outputs, time.perf_counter() - start


def _require_samples(samples: Sequence[Any], task: str) -> None:
    if not samples:
        raise ValueError(f"no {task} samples to evaluate")


def evaluate_t2i(
    inferencer: BagelInferencer,
    samples: Sequence[T2ISample],
    sampler: SamplerSettings,
    batch_size: int = 16,
    seed: int = 0,
) -> TaskResult:
    """GenEval-style scores (six categories and `overall`) of one image per prompt, sample i drawn
    from noise seed `seed + i` at the model's own image size."""
    _require_samples(samples, "text-to-image")
    canvas = samples[0].scene.canvas_size

    def run(part: slice) -> list[Image.Image]:
        images = inferencer.text_to_image(
            [s.prompt for s in samples[part]],
            cfg=sampler.cfg,
            seed=[seed + i for i in range(part.start, part.stop)],
            **sampler.sampling_kwargs(),
        )
        return [to_canvas(image, canvas) for image in images]

    images, seconds = _batched(len(samples), batch_size, run)
    verdicts = geneval_passes(images, samples)
    return TaskResult(scores_from_passes(verdicts, samples), {}, images, seconds, verdicts)


def evaluate_edit(
    inferencer: BagelInferencer,
    samples: Sequence[EditSample],
    sampler: SamplerSettings,
    batch_size: int = 16,
    seed: int = 0,
) -> TaskResult:
    """Editing scores (`overall`, `instruction`, `preservation`) and `overall` per edit kind present;
    sample i starts from noise seed `seed + i`."""
    _require_samples(samples, "editing")
    canvas = samples[0].source.canvas_size

    def run(part: slice) -> list[Image.Image]:
        images = inferencer.edit(
            [s.source_image for s in samples[part]],
            [s.instruction for s in samples[part]],
            cfg=sampler.cfg,
            seed=[seed + i for i in range(part.start, part.stop)],
            **sampler.sampling_kwargs(),
        )
        return [to_canvas(image, canvas) for image in images]

    images, seconds = _batched(len(samples), batch_size, run)
    scores = score_edits(images, samples)
    per_kind = {}
    for kind in EDIT_KINDS:
        chosen = [score for score, sample in zip(scores, samples, strict=True) if sample.kind == kind]
        if chosen:
            per_kind[kind] = scores_from_edits(chosen)["overall"]
    return TaskResult(scores_from_edits(scores), per_kind, images, seconds, scores)


def evaluate_understanding(
    inferencer: BagelInferencer,
    samples: Sequence[VQASample],
    batch_size: int = 16,
    show_image: bool = True,
) -> TaskResult:
    """Exact-match answer accuracy (`short_answer_accuracy`, `describe_exact`) and per question category,
    greedy decoding. Questions run in batches of similar answer length (long descriptions do not hold
    short answers back), each capped at its longest reference plus `ANSWER_MARGIN` tokens. With
    `show_image` False each question is asked alone (one whose text already describes the scene)."""
    _require_samples(samples, "understanding")
    lengths = [len(inferencer.encode(s.answer)) for s in samples]
    order = sorted(range(len(samples)), key=lambda i: lengths[i])

    def run(part: slice) -> list[str]:
        chosen = order[part]
        return inferencer.chat(
            [samples[i].question for i in chosen],
            [[samples[i].image] if show_image else [] for i in chosen],
            max_new_tokens=max(lengths[i] for i in chosen) + ANSWER_MARGIN,
        )

    sorted_answers, seconds = _batched(len(samples), batch_size, run)
    answers = [""] * len(samples)
    for i, answer in zip(order, sorted_answers, strict=True):
        answers[i] = answer
    per_category = {}
    for category in VQA_CATEGORIES:
        correct = [
            normalize_answer(a) == normalize_answer(s.answer)
            for a, s in zip(answers, samples)
            if s.category == category
        ]
        if correct:
            per_category[category] = sum(correct) / len(correct)
    return TaskResult(answer_accuracy(answers, samples), per_category, answers, seconds)


def save_grid(rows: Sequence[Sequence[Image.Image]], path: str | Path, size: int) -> None:
    """A PNG of image rows (each image scaled to size x size, short rows padded with grey) for eyeballing."""
    if not any(rows):
        raise ValueError("no images to put in the grid")
    columns = max(len(row) for row in rows)
    blank = torch.full((3, size, size), 0.5)
    tiles = []
    for row in rows:
        tiles += [TF.to_tensor(to_canvas(image, size)) for image in row]
        tiles += [blank] * (columns - len(row))
    save_image(torch.stack(tiles), str(path), nrow=columns, padding=2, pad_value=0.0)


def json_ready(value: Any) -> Any:
    """`value` with NaN floats (a score without samples) replaced by None, so the JSON is strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    return value


def write_summary(summary: dict[str, Any], out: Path) -> dict[str, Any]:
    """A benchmark's summary made JSON-ready, written to `out` (folders created) and printed; returned
    as written, so callers and tests see exactly what the file holds."""
    summary = json_ready(summary)
    text = json.dumps(summary, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return summary
