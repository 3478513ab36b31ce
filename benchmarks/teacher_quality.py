"""Quality of a BAGEL checkpoint on the shapes world's test split, at BAGEL's default sampler.

    python benchmarks/teacher_quality.py --model outputs/shapes/teacher --out teacher_quality.json

Scores text-to-image per GenEval category (50 timesteps, shift 3, text CFG 4 over the GenEval script's
interval (0, 1], global renorm), editing with text and image CFG (4 and 2, text-channel renorm) and
understanding by exact-match answers (short answers, and whole "describe the image" paragraphs).
Writes the JSON summary to --out (and prints it), and a grid of samples next to it (`*_samples.png`):
row 1 one generated image per category, row 2 the exact renders of those prompts, then edits as
(source, edited, target) triples. Sample i of a task starts from noise seed `--seed + i`, so runs with
other samplers or distilled students see the same initial noise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from hyperbagel.backbone.checkpoint import from_pretrained
from hyperbagel.backbone.flow import RENORM_TYPES, CFGConfig
from hyperbagel.backbone.inference import BagelInferencer
from hyperbagel.datamodules.interleaved import load_tokenizer
from hyperbagel.datamodules.shapes import T2I_CATEGORIES, EditSample, ShapesWorld, T2ISample
from hyperbagel.evaluation.suite import (
    SamplerSettings,
    TaskResult,
    evaluate_edit,
    evaluate_t2i,
    evaluate_understanding,
    save_grid,
    write_summary,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GRID_EDITS = 2  # edit triples shown in the sample grid


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder in BAGEL's layout")
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--tokenizer", help="'shapes' or a tokenizer folder (default: the model folder's)")
    parser.add_argument("--n-t2i", type=int, default=50, help="text-to-image prompts per GenEval category")
    parser.add_argument("--n-edit", type=int, default=100, help="edits (cycling through the edit kinds)")
    parser.add_argument("--n-vqa", type=int, default=100, help="questions (cycling through the categories)")
    parser.add_argument("--num-timesteps", type=int, default=50, help="sampling grid points (steps + 1)")
    parser.add_argument("--shift", type=float, default=3.0, help="timestep shift of the sampling grid")
    parser.add_argument("--text-scale", type=float, default=4.0, help="text CFG scale (t2i and editing)")
    parser.add_argument("--img-scale", type=float, default=2.0, help="image CFG scale (editing)")
    parser.add_argument("--t2i-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--edit-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--t2i-renorm", choices=RENORM_TYPES, default="global")
    parser.add_argument("--edit-renorm", choices=RENORM_TYPES, default="text_channel")
    parser.add_argument("--renorm-min", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="noise seed of sample 0 (sample i uses seed + i)")
    parser.add_argument(
        "--world-seed", type=int, default=0, help="shapes-world seed drawing the test samples"
    )
    parser.add_argument("--canvas-size", type=int, default=64, help="shapes-world canvas (pixels)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model (default: as stored)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    for name in ("n_t2i", "n_edit", "n_vqa"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    return args


def samplers(args: argparse.Namespace) -> tuple[SamplerSettings, SamplerSettings]:
    """(text-to-image, editing) samplers from the flags; t2i has no input image, so no image CFG."""
    t2i = CFGConfig(
        text_scale=args.text_scale,
        img_scale=1.0,
        interval=tuple(args.t2i_interval),
        renorm_type=args.t2i_renorm,
        renorm_min=args.renorm_min,
    )
    edit = CFGConfig(
        text_scale=args.text_scale,
        img_scale=args.img_scale,
        interval=tuple(args.edit_interval),
        renorm_type=args.edit_renorm,
        renorm_min=args.renorm_min,
    )
    return (
        SamplerSettings(args.num_timesteps, args.shift, t2i),
        SamplerSettings(args.num_timesteps, args.shift, edit),
    )


def load_inferencer(args: argparse.Namespace) -> BagelInferencer:
    model = from_pretrained(args.model, dtype=DTYPES.get(args.dtype), device=args.device)
    return BagelInferencer(model, load_tokenizer(args.tokenizer or args.model))


def grid_rows(
    t2i_samples: list[T2ISample], t2i: TaskResult | None, edits: list[EditSample], edit: TaskResult | None
) -> list[list[Image.Image]]:
    """Generated and exact images of the first prompt of each category, then a few edit triples."""
    rows = []
    if t2i is not None:
        firsts = {}
        for i, sample in enumerate(t2i_samples):
            firsts.setdefault(sample.category, i)
        rows += [[t2i.outputs[i] for i in firsts.values()], [t2i_samples[i].image for i in firsts.values()]]
    if edit is not None:
        triple = [[edits[i].source_image, edit.outputs[i], edits[i].target_image] for i in range(len(edits))]
        rows.append([image for images in triple[:GRID_EDITS] for image in images])
    return rows


def _per_item(result: TaskResult | None, count: int) -> float | None:
    return None if result is None else result.seconds / count


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, write --out and the sample grid, print and return the summary."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    inferencer = load_inferencer(args)
    t2i_sampler, edit_sampler = samplers(args)
    world = ShapesWorld(args.canvas_size, args.world_seed)
    t2i_samples = [s for c in T2I_CATEGORIES for s in world.samples("t2i", "test", args.n_t2i, category=c)]
    edit_samples = world.samples("edit", "test", args.n_edit)
    vqa_samples = world.samples("vqa", "test", args.n_vqa)

    t2i = edit = vqa = None
    if t2i_samples:
        t2i = evaluate_t2i(inferencer, t2i_samples, t2i_sampler, args.batch_size, args.seed)
    if edit_samples:
        edit = evaluate_edit(inferencer, edit_samples, edit_sampler, args.batch_size, args.seed)
    if vqa_samples:
        vqa = evaluate_understanding(inferencer, vqa_samples, args.batch_size)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid_path = args.out.with_name(f"{args.out.stem}_samples.png")
    rows = grid_rows(t2i_samples, t2i, edit_samples, edit)
    if rows:
        save_grid(rows, grid_path, args.canvas_size)
    n_describe = sum(s.category == "describe" for s in vqa_samples)
    summary = {
        "model": str(args.model),
        "geneval": {key: t2i.scores[key] for key in ("overall", *T2I_CATEGORIES)} if t2i else None,
        "edit": edit.scores if edit else None,
        "understanding": vqa.scores if vqa else None,
        "edit_per_kind": edit.breakdown if edit else None,
        "understanding_per_category": vqa.breakdown if vqa else None,
        "sampler": {"t2i": t2i_sampler.to_dict(), "edit": edit_sampler.to_dict()},
        "nfe_t2i": t2i_sampler.nfe,
        "nfe_edit": edit_sampler.nfe,
        "counts": {
            "t2i_per_category": args.n_t2i,
            "t2i": len(t2i_samples),
            "edit": len(edit_samples),
            "vqa": len(vqa_samples),
            "short_answer": len(vqa_samples) - n_describe,
            "describe": n_describe,
        },
        "timing": {
            "total_s": time.perf_counter() - started,
            "t2i_s": t2i.seconds if t2i else None,
            "edit_s": edit.seconds if edit else None,
            "understanding_s": vqa.seconds if vqa else None,
            "t2i_s_per_image": _per_item(t2i, len(t2i_samples)),
            "edit_s_per_image": _per_item(edit, len(edit_samples)),
            "understanding_s_per_answer": _per_item(vqa, len(vqa_samples)),
        },
        "settings": {
            "seed": args.seed,
            "world_seed": args.world_seed,
            "canvas_size": args.canvas_size,
            "model_image_size": inferencer.config.vae_max_image_size,
            "batch_size": args.batch_size,
            "device": args.device,
            "dtype": str(inferencer.model.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(),
        },
        "samples_png": str(grid_path) if rows else None,
    }
    return write_summary(summary, args.out)


if __name__ == "__main__":
    main()
