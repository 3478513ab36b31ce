"""Exact-match scoring of answers to shapes-world questions.

World answers are deterministic (one correct short answer; one templated description), so exact match
after case and whitespace normalisation is the whole metric; no partial credit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hyperbagel.datamodules.shapes import VQASample


def normalize_answer(text: str) -> str:
    """Lowercase and collapse runs of whitespace to single spaces."""
    return " ".join(text.lower().split())


def answer_accuracy(predictions: Sequence[str], samples: Sequence[VQASample]) -> dict[str, float]:
    """`short_answer_accuracy` over non-describe samples and `describe_exact` over describe samples
    (NaN where there are no samples of that kind)."""
    if len(predictions) != len(samples):
        raise ValueError(f"got {len(predictions)} predictions for {len(samples)} samples")
    short: list[bool] = []
    describe: list[bool] = []
    for prediction, sample in zip(predictions, samples, strict=True):
        correct = normalize_answer(prediction) == normalize_answer(sample.answer)
        (describe if sample.category == "describe" else short).append(correct)
    return {
        "short_answer_accuracy": sum(short) / len(short) if short else math.nan,
        "describe_exact": sum(describe) / len(describe) if describe else math.nan,
    }
