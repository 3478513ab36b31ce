"""Text retrieval probe: both language models trained and scored on the tiny preset; the word prior."""

from __future__ import annotations

import json
import math
from pathlib import Path

from helpers import load_benchmark


def test_probe_trains_and_scores_each_model(tmp_path: Path) -> None:
    out = tmp_path / "report" / "retrieval.json"
    argv = ["--out", str(out), "--preset", "tiny", "--n-train", "40", "--n-test", "6"]
    argv += ["--steps", "3", "--eval-every", "2", "--batch-size", "4", "--threads", "1"]
    summary = load_benchmark("text_retrieval_probe").main(argv)

    assert json.loads(out.read_text()) == summary
    assert summary["test_questions"] == 6
    assert [run["model"] for run in summary["runs"]] == ["bagel", "hf_qwen2"]
    for run in summary["runs"]:
        assert [point["step"] for point in run["curve"]] == [2, 3]
        for point in run["curve"]:
            assert 0.0 <= point["accuracy"] <= 1.0
            assert set(point["per_category"]) <= {"color", "count", "shape", "position"}
            assert math.isfinite(point["train_loss"]) and point["train_loss"] > 0.0


def test_rows_hold_the_description_and_a_one_token_answer() -> None:
    probe = load_benchmark("text_retrieval_probe")
    from hyperbagel.datamodules.shapes import ShapesWorld
    from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer

    world, tokenizer = ShapesWorld(), build_shapes_tokenizer()
    bare = probe.question_rows(world, tokenizer, "test", 20, with_description=False)
    described = probe.question_rows(world, tokenizer, "test", 20, with_description=True)
    assert [r.question for r in bare] == [r.question for r in described]
    for plain, full in zip(bare, described, strict=True):
        assert full.answer == plain.answer and tokenizer.decode([full.answer]).strip()
        assert len(full.prompt) > len(plain.prompt) and full.prompt[-len(plain.prompt) :] == plain.prompt


def test_word_prior_answers_each_question_string_with_its_commonest_training_answer() -> None:
    probe = load_benchmark("text_retrieval_probe")
    Row = probe.Row
    train = [Row("q1", (1,), 7, "color"), Row("q1", (1,), 7, "color"), Row("q1", (1,), 8, "color")]
    test = [Row("q1", (1,), 7, "color"), Row("q1", (1,), 8, "color"), Row("unseen", (2,), 7, "count")]
    assert probe.word_prior_accuracy(train, test) == 1 / 3
