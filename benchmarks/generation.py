"""Teacher vs accelerated student: quality, model evaluations and wall-clock time of image generation.

    python benchmarks/generation.py --teacher outputs/shapes/teacher --student outputs/shapes/distill_cfg \\
        --student-steps 49 --out outputs/shapes/benchmarks/distill_cfg.json

Both models run the shapes world's test split (or `--split val`, where sampler settings are chosen) with
the same prompts, edits and initial noise per sample (`--seed + i`, drawn in latent space), scored by
`hyperbagel.evaluation.suite` (GenEval categories, editing instruction / preservation). The teacher
samples as BAGEL does: `--teacher-timesteps` grid points (50 = 49 steps) with text CFG (and image CFG for
edits); the student takes `--student-steps` steps on the same shifted grid (Euler, or `--student-solver
unipc`: the same model calls, each step also using the earlier ones) and, when CFG-distilled, one pass per
step with the same scales embedded. Any stage's output works: stage 1 at its own steps, stages 2 and 3 at
6. `--deployment` adds the paper's deployment (the teacher prefills the contexts, the student's generation
weights denoise) as `student_deployed`.

Speed: `seconds_per_image_*` is the median over `--n-timing` batch-1 prompts / edits per task, the models
taking turns image by image after one warm-up call each, context prefill and VAE decoding included;
`speedup_*` is teacher / student. `forward_cost` says where an image's time goes (see `forward_cost`).
The teacher batches its CFG passes into one forward a step; `--sequential-cfg-teacher` also times it as
BAGEL's inferencer runs it, one forward per pass (`teacher_sequential_cfg`, the same images, timed in the
same rotation), and writes `speedup_*_vs_sequential_cfg` beside the batched teacher's `speedup_*`.
`--dtype bfloat16` runs every model in BAGEL's own inference dtype (exports are stored in float32).
JSON (also printed): `teacher` and `student` entries with `nfe_t2i`, `nfe_edit`, `geneval` (per category
and `overall`), `edit` (`overall`, `instruction`, `preservation`), `seconds_per_image_t2i` and
`seconds_per_image_edit`; top-level `speedup_t2i` and `speedup_edit`, `geneval_gap` (the student's
`overall` minus the teacher's with the standard error of that paired difference, which is what a
"student within x of the teacher" target is judged by) and `edit_gap` (the same for editing `overall`);
the samplers and settings used.
A student whose generation keys do not match the teacher's is refused with the keys listed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.flow import RENORM_TYPES, SOLVERS, CFGConfig, sampling_schedule
from hyperbagel.backbone.inference import (
    BagelInferencer,
    build_image_contexts,
    initial_noise,
    sampling_nfe,
    t2i_context_samples,
)
from hyperbagel.callbacks.export import EXPORT_DTYPES
from hyperbagel.datamodules.interleaved import load_tokenizer
from hyperbagel.datamodules.shapes import T2I_CATEGORIES, EditSample, ShapesWorld, T2ISample
from hyperbagel.distillation.generation_weights import (
    DeployedInferencer,
    GenerationWeights,
    check_generation_keys,
)
from hyperbagel.evaluation.editing import paired_edit_gap
from hyperbagel.evaluation.geneval import paired_overall_gap
from hyperbagel.evaluation.suite import (
    SamplerSettings,
    TaskResult,
    evaluate_edit,
    evaluate_t2i,
    save_grid,
    write_summary,
)

GRID_COLUMNS = 6  # samples per row of the comparison grid
TASKS = ("t2i", "edit")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", required=True, help="the CFG teacher's folder (BAGEL layout)")
    parser.add_argument("--student", required=True, help="the accelerated model's folder (BAGEL layout)")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument(
        "--student-steps", type=int, default=6, help="student sampling steps (model evaluations)"
    )
    parser.add_argument("--teacher-timesteps", type=int, default=50, help="teacher grid points (steps + 1)")
    parser.add_argument("--shift", type=float, default=3.0, help="timestep shift of the teacher's grid")
    parser.add_argument(
        "--student-shift", type=float, default=3.0, help="timestep shift of the student's grid"
    )
    parser.add_argument(
        "--student-solver",
        choices=tuple(SOLVERS),
        default="euler",
        help="ODE solver over the student's grid (the teacher samples with BAGEL's Euler)",
    )
    parser.add_argument(
        "--split",
        choices=("val", "test"),
        default="test",
        help="shapes-world split to score (choose sampler settings on val, report test)",
    )
    parser.add_argument("--text-scale", type=float, default=4.0)
    parser.add_argument("--img-scale", type=float, default=2.0)
    parser.add_argument("--t2i-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--edit-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--t2i-renorm", choices=RENORM_TYPES, default="global")
    parser.add_argument("--edit-renorm", choices=RENORM_TYPES, default="text_channel")
    parser.add_argument("--renorm-min", type=float, default=0.0)
    parser.add_argument("--n-t2i", type=int, default=20, help="text-to-image prompts per GenEval category")
    parser.add_argument("--n-edit", type=int, default=60, help="edits (cycling through the edit kinds)")
    parser.add_argument("--n-timing", type=int, default=8, help="batch-1 timed images per task and model")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size of the quality runs")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of sample 0 (sample i uses seed + i)")
    parser.add_argument("--world-seed", type=int, default=0)
    parser.add_argument("--canvas-size", type=int, default=64)
    parser.add_argument("--tokenizer", help="'shapes' or a tokenizer folder (default: the teacher folder's)")
    parser.add_argument("--deployment", action="store_true", help="also run the teacher-prefill deployment")
    parser.add_argument(
        "--sequential-cfg-teacher",
        action="store_true",
        help="also time the teacher with one forward per CFG pass, as BAGEL's inferencer runs it",
    )
    parser.add_argument(
        "--dtype", choices=sorted(EXPORT_DTYPES), help="cast every model to this dtype (default: as stored)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.student_steps < 1 or args.teacher_timesteps < 2:
        parser.error("need --student-steps >= 1 and --teacher-timesteps >= 2")
    if min(args.n_t2i, args.n_edit) < 1 or args.n_timing < 1:
        parser.error("--n-t2i, --n-edit and --n-timing must be >= 1")
    return args


def cfgs(args: argparse.Namespace) -> tuple[CFGConfig, CFGConfig]:
    """(text-to-image, editing) guidance, shared by teacher (CFG passes) and student (embedded scales)."""
    common = {"text_scale": args.text_scale, "renorm_min": args.renorm_min}
    t2i = CFGConfig(img_scale=1.0, interval=tuple(args.t2i_interval), renorm_type=args.t2i_renorm, **common)
    edit = CFGConfig(
        img_scale=args.img_scale, interval=tuple(args.edit_interval), renorm_type=args.edit_renorm, **common
    )
    return t2i, edit


def interleaved_seconds(runs: dict[str, Callable[[int], object]], count: int) -> dict[str, float]:
    """Median wall-clock seconds of each `runs[name](i)` over `count` calls, after one warm-up call each.

    The models take turns image by image (the order rotating), so a slow phase of a shared machine hits
    all of them alike instead of whichever happened to be timed then; the median ignores stray spikes.
    """
    names = list(runs)
    for run in runs.values():
        run(0)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(count):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            start = time.perf_counter()
            runs[name](i)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class ModelUnderTest(NamedTuple):
    """A model as the benchmark samples it: its inferencer, its timestep grid and its solver."""

    inferencer: BagelInferencer
    num_timesteps: int
    shift: float
    solver: str = "euler"


def timing_runs(
    model: ModelUnderTest,
    args: argparse.Namespace,
    t2i_samples: list[T2ISample],
    edit_samples: list[EditSample],
) -> dict[str, Callable[[int], object]]:
    """One batch-1 text-to-image and one batch-1 edit call of a model, by sample index."""
    t2i_cfg, edit_cfg = cfgs(args)
    inferencer = model.inferencer
    sampling = {"num_timesteps": model.num_timesteps, "timestep_shift": model.shift, "solver": model.solver}

    def t2i(i: int) -> object:
        sample = t2i_samples[i % len(t2i_samples)]
        return inferencer.text_to_image(sample.prompt, cfg=t2i_cfg, seed=args.seed + i, **sampling)

    def edit(i: int) -> object:
        sample = edit_samples[i % len(edit_samples)]
        return inferencer.edit(
            sample.source_image, sample.instruction, cfg=edit_cfg, seed=args.seed + i, **sampling
        )

    return {"t2i": t2i, "edit": edit}


def model_report(
    model: ModelUnderTest,
    args: argparse.Namespace,
    t2i_samples: list[T2ISample],
    edit_samples: list[EditSample],
) -> tuple[dict[str, Any], TaskResult, TaskResult]:
    """The quality part of one model's JSON entry, and its text-to-image and editing results."""
    inferencer, num_timesteps, shift, solver = model
    t2i_cfg, edit_cfg = cfgs(args)
    t2i_sampler = SamplerSettings(num_timesteps, shift, t2i_cfg, solver)
    edit_sampler = SamplerSettings(num_timesteps, shift, edit_cfg, solver)
    t2i = evaluate_t2i(inferencer, t2i_samples, t2i_sampler, args.batch_size, args.seed)
    edit = evaluate_edit(inferencer, edit_samples, edit_sampler, args.batch_size, args.seed)
    grid = sampling_schedule(num_timesteps, shift)
    report = {
        "nfe_t2i": sampling_nfe(inferencer.model, grid, t2i_cfg),
        "nfe_edit": sampling_nfe(inferencer.model, grid, edit_cfg),
        "geneval": {key: t2i.scores[key] for key in ("overall", *T2I_CATEGORIES)},
        "edit": {key: edit.scores[key] for key in ("overall", "instruction", "preservation")},
        "edit_per_kind": edit.breakdown,
        "sampler": {"t2i": t2i_sampler.to_dict(), "edit": edit_sampler.to_dict()},
        "guidance_distilled": inferencer.model.has_guidance_embedders,
    }
    return report, t2i, edit


def forward_cost(
    model: Bagel, tokenizer: PreTrainedTokenizerBase, prompt: str, repeats: int
) -> dict[str, Any]:
    """Milliseconds of the pieces of an image (medians, taking turns): one noisy-block forward with 1, 2
    and 3 rows (a distilled step, a text-CFG step, a text+image-CFG step), the prompt's prefill and the VAE
    decode. `cfg_step_in_student_steps` (2- and 3-row forward / 1-row forward) is what the NFE ratio
    assumes to be 2 and 3: where it is less, batching CFG's passes hides most of their cost."""
    size = model.config.vae_max_image_size
    grid = (size // model.config.image_stride, size // model.config.image_stride)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    timed: dict[str, Callable[[int], object]] = {}
    with torch.no_grad():
        for rows in (1, 2, 3):
            contexts = build_image_contexts(model, t2i_context_samples([ids] * rows)[0], None, None, grid)
            x = initial_noise(model, rows, grid, 0)
            timed[f"forward_{rows}_rows"] = lambda i, c=contexts, x=x, r=rows: c.raw_velocity(x, 0.5, r)
        conditional = t2i_context_samples([ids])[0]
        timed["prefill"] = lambda i: build_image_contexts(model, conditional, None, None, grid)
        tokens = initial_noise(model, 1, grid, 0)
        timed["vae_decode"] = lambda i: model.decode_tokens(tokens, grid)
        seconds = interleaved_seconds(timed, max(repeats, 5))
    ms = {name: round(value * 1000, 2) for name, value in seconds.items()}
    return {
        "ms": ms,
        "cfg_step_in_student_steps": {
            "text": round(ms["forward_2_rows"] / ms["forward_1_rows"], 3),
            "text_and_image": round(ms["forward_3_rows"] / ms["forward_1_rows"], 3),
        },
    }


def comparison_rows(
    names: list[str],
    t2i: dict[str, list[Image.Image]],
    edits: dict[str, list[Image.Image]],
    t2i_samples: list[T2ISample],
    edit_samples: list[EditSample],
) -> list[list[Image.Image]]:
    """Exact renders, then each model's images of the same prompts; then edit sources, targets, models."""
    k, e = min(GRID_COLUMNS, len(t2i_samples)), min(GRID_COLUMNS, len(edit_samples))
    rows = [[s.image for s in t2i_samples[:k]]] + [t2i[name][:k] for name in names]
    rows += [[s.source_image for s in edit_samples[:e]], [s.target_image for s in edit_samples[:e]]]
    return rows + [edits[name][:e] for name in names]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write --out and the comparison grid, print and return the summary."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(args.tokenizer or args.teacher)
    dtype = EXPORT_DTYPES.get(args.dtype)
    teacher = from_pretrained(args.teacher, dtype=dtype)
    student = from_pretrained(args.student, dtype=dtype)
    own = {n: tuple(p.shape) for n, p in teacher.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in student.named_parameters()}
    check_generation_keys(own, shapes, args.student, candidate_adds_guidance=True)
    world = ShapesWorld(args.canvas_size, args.world_seed)
    t2i_samples = [
        s for c in T2I_CATEGORIES for s in world.samples("t2i", args.split, args.n_t2i, category=c)
    ]
    edit_samples = world.samples("edit", args.split, args.n_edit)

    models = {
        "teacher": ModelUnderTest(BagelInferencer(teacher, tokenizer), args.teacher_timesteps, args.shift),
        "student": ModelUnderTest(
            BagelInferencer(student, tokenizer),
            args.student_steps + 1,
            args.student_shift,
            args.student_solver,
        ),
    }
    if args.deployment:
        # A copy of the teacher: it gains (unused) guidance embedders.
        original = from_pretrained(args.teacher, dtype=dtype)
        if student.has_guidance_embedders:
            original.add_guidance_embedders()
        weights = GenerationWeights.load(args.student, original, check_shared=True)
        deployed = DeployedInferencer(original, tokenizer, weights)
        models["student_deployed"] = models["student"]._replace(inferencer=deployed)
    summary: dict[str, Any] = {}
    t2i_results, edit_results = {}, {}
    for name, model in models.items():
        summary[name], t2i_results[name], edit_results[name] = model_report(
            model, args, t2i_samples, edit_samples
        )
    gap, error = paired_overall_gap(
        t2i_results["teacher"].per_sample, t2i_results["student"].per_sample, t2i_samples
    )
    summary["geneval_gap"] = {"student_minus_teacher": gap, "standard_error": error}
    gap, error = paired_edit_gap(edit_results["teacher"].per_sample, edit_results["student"].per_sample)
    summary["edit_gap"] = {"student_minus_teacher": gap, "standard_error": error}
    timed = dict(models)
    if args.sequential_cfg_teacher:  # timing only: its images are the batched teacher's (tested)
        sequential = BagelInferencer(teacher, tokenizer, sequential_cfg=True)
        timed["teacher_sequential_cfg"] = models["teacher"]._replace(inferencer=sequential)
        summary["teacher_sequential_cfg"] = {
            f"nfe_{task}": summary["teacher"][f"nfe_{task}"] for task in TASKS
        }
    for task in TASKS:
        runs = {
            name: timing_runs(model, args, t2i_samples, edit_samples)[task] for name, model in timed.items()
        }
        for name, seconds in interleaved_seconds(runs, args.n_timing).items():
            summary[name][f"seconds_per_image_{task}"] = seconds
        key = f"seconds_per_image_{task}"
        summary[f"speedup_{task}"] = summary["teacher"][key] / summary["student"][key]
        if args.sequential_cfg_teacher:
            summary[f"speedup_{task}_vs_sequential_cfg"] = (
                summary["teacher_sequential_cfg"][key] / summary["student"][key]
            )
    summary["forward_cost"] = forward_cost(teacher, tokenizer, t2i_samples[0].prompt, args.n_timing)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid_path = args.out.with_name(f"{args.out.stem}_samples.png")
    t2i_images = {name: result.outputs for name, result in t2i_results.items()}
    edit_images = {name: result.outputs for name, result in edit_results.items()}
    rows = comparison_rows(list(models), t2i_images, edit_images, t2i_samples, edit_samples)
    save_grid(rows, grid_path, args.canvas_size)
    summary["settings"] = {
        "teacher": str(args.teacher),
        "student": str(args.student),
        "counts": {"t2i": len(t2i_samples), "t2i_per_category": args.n_t2i, "edit": len(edit_samples)},
        "n_timing": args.n_timing,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "split": args.split,
        "world_seed": args.world_seed,
        "canvas_size": args.canvas_size,
        "threads": torch.get_num_threads(),
        "dtype": str(teacher.dtype).removeprefix("torch."),
        "samples_png": str(grid_path),
    }
    return write_summary(summary, args.out)


if __name__ == "__main__":
    main()
