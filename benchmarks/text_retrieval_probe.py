"""How fast does a language model of the preset's size learn to answer shapes questions from text alone?

    python benchmarks/text_retrieval_probe.py --models bagel hf_qwen2 --steps 1500 --bf16 \
        --out outputs/shapes/benchmarks/text_retrieval_probe.json

The understanding probe (benchmarks/understanding_probe.py) finds answers that do not use the image. This
probe takes the image out of the question: each short-answer question is preceded by the scene's own
templated description ("the red circle is in the top left . ..."), which holds every answer, so answering
is in-context retrieval over text. Two language models of the preset's shape, trained from scratch on the
same rows with the answer token's cross-entropy: `bagel`, this project's MoT language model with its
initialisation (QK-norm, understanding expert), and `hf_qwen2`, transformers' Qwen2ForCausalLM with the
same sizes and its own initialisation. If both learn equally slowly, the bottleneck is how many examples a
from-scratch transformer needs for retrieval, not this project's model or its image path.
`word_prior_accuracy` is the ceiling of answering from the question's wording alone (the most common
training answer of each question string).
"""

from __future__ import annotations

import argparse
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM

from hyperbagel.backbone.bagel import Bagel
from hyperbagel.backbone.config import preset
from hyperbagel.datamodules.shapes import ShapesWorld
from hyperbagel.datamodules.shapes_text import describe_scene
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer
from hyperbagel.evaluation.suite import write_summary

MODELS = ("bagel", "hf_qwen2")
WARMUP_STEPS = 50
QWEN2_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
)


class Row(NamedTuple):
    """One question as token ids (description first unless left out), its one-token answer, its category."""

    question: str
    prompt: tuple[int, ...]
    answer: int
    category: str


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, type=Path, help="JSON file to write")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--preset", default="shapes", help="preset whose language-model sizes are used")
    parser.add_argument("--no-description", action="store_true", help="questions alone (no context)")
    parser.add_argument("--n-train", type=int, default=25000, help="understanding samples drawn for training")
    parser.add_argument("--n-test", type=int, default=300, help="test questions scored at each evaluation")
    parser.add_argument("--steps", type=int, default=1500, help="training steps per model")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between evaluations")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bf16", action="store_true", help="train and score under bf16 autocast")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    args = parser.parse_args(argv)
    if min(args.n_train, args.n_test, args.steps, args.eval_every, args.batch_size) < 1:
        parser.error("--n-train, --n-test, --steps, --eval-every and --batch-size must be >= 1")
    return args


def question_rows(
    world: ShapesWorld, tokenizer: PreTrainedTokenizerBase, split: str, n: int, with_description: bool
) -> list[Row]:
    """The short-answer questions among the first `n` understanding samples of `split`."""
    rows = []
    for sample in world.samples("vqa", split, n):
        if sample.category == "describe":
            continue
        text = f"{describe_scene(sample.scene)} {sample.question}" if with_description else sample.question
        answer = tokenizer.encode(sample.answer, add_special_tokens=False)
        if len(answer) != 1:
            raise ValueError(f"answer {sample.answer!r} is {len(answer)} tokens; this probe needs one")
        prompt = tuple(tokenizer.encode(text, add_special_tokens=False))
        rows.append(Row(sample.question, prompt, answer[0], sample.category))
    return rows


def word_prior_accuracy(train: Sequence[Row], test: Sequence[Row]) -> float:
    """Accuracy of answering each test question with its string's most common training answer."""
    answers: dict[str, Counter[int]] = defaultdict(Counter)
    for row in train:
        answers[row.question][row.answer] += 1
    hits = [bool(answers[r.question]) and answers[r.question].most_common(1)[0][0] == r.answer for r in test]
    return sum(hits) / len(hits)


def build_model(name: str, preset_name: str) -> nn.Module:
    """A from-scratch causal language model of the preset's sizes."""
    bagel_config = preset(preset_name)
    if name == "bagel":
        return Bagel(bagel_config).language_model  # the project's own initialisation
    config = Qwen2Config(**{key: getattr(bagel_config.llm, key) for key in QWEN2_SIZES})
    config.tie_word_embeddings = False
    return Qwen2ForCausalLM(config)


def answer_logits(model: nn.Module, rows: Sequence[Row]) -> torch.Tensor:
    """Next-token logits after each row's last prompt token (rows right-padded, causal attention)."""
    length = max(len(r.prompt) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.prompt)] = torch.tensor(row.prompt)
    out = model(input_ids=ids)
    logits = out.logits if hasattr(out, "logits") else out
    last = torch.tensor([len(r.prompt) - 1 for r in rows])
    return logits[torch.arange(len(rows)), last].float()


def score(model: nn.Module, rows: Sequence[Row], bf16: bool, batch_size: int = 50) -> dict[str, Any]:
    """Greedy one-token answer accuracy, overall and per category."""
    model.eval()
    hits: list[bool] = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            predicted = answer_logits(model, part).argmax(-1)
            hits += (predicted == torch.tensor([r.answer for r in part])).tolist()
    model.train()
    per_category: dict[str, list[bool]] = defaultdict(list)
    for row, hit in zip(rows, hits, strict=True):
        per_category[row.category].append(hit)
    return {
        "accuracy": sum(hits) / len(hits),
        "per_category": {c: sum(v) / len(v) for c, v in sorted(per_category.items())},
    }


def probe(name: str, args: argparse.Namespace, train: list[Row], test: list[Row]) -> dict[str, Any]:
    """Train a fresh model on the answer tokens in a fixed row order, scoring it every `eval_every` steps."""
    torch.manual_seed(args.seed)
    model = build_model(name, args.preset)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / WARMUP_STEPS))
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed)).tolist()
    curve, losses, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        first = (step - 1) * args.batch_size
        batch = [train[order[(first + i) % len(train)]] for i in range(args.batch_size)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(answer_logits(model, batch), torch.tensor([r.answer for r in batch]))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        warmup.step()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            recent = losses[-args.eval_every :]
            point = {"step": step, "examples_seen": step * args.batch_size, **score(model, test, args.bf16)}
            curve.append({**point, "train_loss": sum(recent) / len(recent)})
    return {"model": name, "curve": curve, "train_seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    world, tokenizer = ShapesWorld(), build_shapes_tokenizer()
    with_description = not args.no_description
    train = question_rows(world, tokenizer, "train", args.n_train, with_description)
    test = question_rows(world, tokenizer, "test", 2 * args.n_test, with_description)[: args.n_test]
    runs = [probe(name, args, train, test) for name in args.models]
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}
    summary = {
        "train_questions": len(train),
        "test_questions": len(test),
        "word_prior_accuracy": word_prior_accuracy(train, test),
        "runs": runs,
        "settings": settings,
    }
    return write_summary(summary, args.out)


if __name__ == "__main__":
    main()
