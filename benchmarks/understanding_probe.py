"""Does a from-scratch shapes model learn to read its images? Understanding-only training, scored as it goes.

    python benchmarks/understanding_probe.py --autoencoder outputs/shapes/autoencoder \
        --vision-encoder outputs/shapes/vision_encoder --variants trainable_vit frozen_vit \
        --steps 900 --eval-every 300 --bf16 --out outputs/shapes/benchmarks/understanding_probe.json

One fresh model per variant in turn in one process (same seed, same packs, same optimiser as
benchmarks/timestep_shift.py): stage 0's objective on understanding rows only, and every `--eval-every`
steps greedy short-answer accuracy on `--n` test questions (colour, count, shape, position) twice: with
each question's own image and with a blank canvas. Accuracy with the image above accuracy without it is
what reading the image is worth; equal accuracies mean the model answers from the question's wording
alone, which is where the teachers so far stand (README, "Where the teacher stands").
Variants: `trainable_vit` trains every parameter as the teacher does; `frozen_vit` keeps the pretrained
vision encoder fixed (`frozen: [vit_model.*]`).
`--reading-steps N` first trains each fresh model N steps on the same questions asked about each scene's
written description instead of its image (text only, the exporter's `vqa_text` rows), a stand-in for the
pretrained language model BAGEL starts from, then `--steps` on the image rows as above (with the text rows
mixed in at `--reading-weight` against the image rows' 1, if set); the curve's steps count the image phase
only, and `reading_final_loss` is the text phase's. Every evaluation also scores `accuracy_reading`: the same
test questions asked about the scene's description with no image, i.e. whether the language model can look
an answer up at all.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from hyperbagel.backbone.inference import BagelInferencer
from hyperbagel.datamodules.shapes import ShapesWorld, VQASample
from hyperbagel.datamodules.shapes_datamodule import ShapesDataModule
from hyperbagel.datamodules.shapes_scene import Scene
from hyperbagel.datamodules.shapes_text import described_question
from hyperbagel.evaluation.suite import evaluate_understanding
from hyperbagel.lightning_modules.pretrain import PretrainStage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timestep_shift import probe_data, summarise, train  # noqa: E402  (shared with the generation probe)

FROZEN = {"trainable_vit": [], "frozen_vit": ["vit_model.*"]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--variants", nargs="+", choices=sorted(FROZEN), default=["trainable_vit"])
    parser.add_argument("--preset", default="shapes", help="model preset trained from scratch")
    parser.add_argument("--autoencoder", help="autoencoder folder (default: a random one, for tests)")
    parser.add_argument("--vision-encoder", help="pretrained ViT folder (default: a random ViT)")
    parser.add_argument(
        "--data-root", type=Path, default=Path("outputs/shapes/probe_data_understanding")
    )  # not the generation probe's folder: each would re-export the other's rows
    parser.add_argument("--n-train", type=int, default=20000, help="understanding rows to train on")
    parser.add_argument("--n", type=int, default=100, help="test questions scored at each evaluation")
    parser.add_argument("--follow-ups", type=int, default=3, help="extra questions per training row")
    parser.add_argument("--steps", type=int, default=900, help="training steps per variant")
    parser.add_argument(
        "--reading-steps", type=int, default=0, help="text-only steps on described scenes first"
    )
    parser.add_argument(
        "--reading-weight", type=float, default=0.0, help="weight of the text rows among the image rows"
    )
    parser.add_argument("--eval-every", type=int, default=300, help="steps between evaluations")
    parser.add_argument("--tokens", type=int, default=1200, help="expected tokens per pack")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--bf16", action="store_true", help="train under bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    at_least_one = (args.n, args.steps, args.eval_every, args.n_train)
    if min(at_least_one) < 1 or min(args.reading_steps, args.reading_weight) < 0:
        parser.error("--n, --n-train, --steps, --eval-every must be >= 1, --reading-* >= 0")
    return args


def test_questions(n: int) -> list[VQASample]:
    """The first `n` short-answer test questions (descriptions left out: their exact match is ~0 here)."""
    pool = ShapesWorld().samples("vqa", "test", 4 * n)
    return [s for s in pool if s.category != "describe"][:n]


def score(stage: PretrainStage, questions: list[VQASample]) -> dict[str, Any]:
    """Greedy short-answer accuracy with each question's image and with a blank canvas of its size."""
    stage.model.eval()
    inferencer = BagelInferencer(stage.model, stage.tokenizer)
    with_image = evaluate_understanding(inferencer, questions)
    blanks = [replace(q, scene=Scene((), q.scene.canvas_size)) for q in questions]
    blank = evaluate_understanding(inferencer, blanks)
    described = [replace(q, question=described_question(q.scene, q.question)) for q in questions]
    reading = evaluate_understanding(inferencer, described, show_image=False)
    stage.model.train()
    return {
        "accuracy_with_image": with_image.scores["short_answer_accuracy"],
        "accuracy_blank_image": blank.scores["short_answer_accuracy"],
        "accuracy_reading": reading.scores["short_answer_accuracy"],
        "per_category_with_image": with_image.breakdown,
        "answers": with_image.outputs[:8],
    }


def probe(
    variant: str, args: argparse.Namespace, data: ShapesDataModule, reading: ShapesDataModule | None = None
) -> dict[str, Any]:
    """Train a fresh model on understanding rows (after `reading_steps` on text rows), scoring it every
    `eval_every` steps."""
    torch.manual_seed(args.seed)
    stage = PretrainStage(
        model=args.preset,
        autoencoder=args.autoencoder,
        vision_encoder=args.vision_encoder,
        frozen=FROZEN[variant],
    )
    stage.configure_model()
    questions = test_questions(args.n)
    curve: list[dict[str, Any]] = []

    def evaluate(step: int) -> None:
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, **score(stage, questions)})

    run: dict[str, Any] = {"variant": variant}
    if reading is not None:
        run["reading_final_loss"] = tail_mean(train(stage, reading, args.reading_steps, args.lr, args.bf16))
    losses = train(stage, data, args.steps, args.lr, args.bf16, after_step=evaluate)
    return {**run, "curve": curve, "final_train_loss": tail_mean(losses)}


def tail_mean(losses: list[float]) -> float:
    """Mean of the last (up to) 50 losses."""
    tail = losses[-min(50, len(losses)) :]
    return sum(tail) / len(tail)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    mix = {"t2i_weight": 0.0, "edit_weight": 0.0, "vqa_follow_ups": args.follow_ups}
    data = probe_data(args, args.n_train, vqa_weight=1.0, text_vqa_weight=args.reading_weight, **mix)
    reading = None
    if args.reading_steps:
        reading = probe_data(args, args.n_train, vqa_weight=0.0, text_vqa_weight=1.0, **mix)
    return summarise([probe(variant, args, data, reading) for variant in args.variants], args)


if __name__ == "__main__":
    main()
