"""GenEval-style strict scoring of text-to-image outputs in the shapes world.

An image passes only if the detector finds exactly the objects the prompt implies: the same multiset
of (colour, shape), every blob a recognised shape, no unexplained pixels beyond a small budget, and for
the position category the named relation between the two objects' boxes (GenEval's rule).
Per-category accuracies are averaged into `overall` with equal weight per category, as GenEval does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np
from PIL import Image

from hyperbagel.datamodules.shapes import T2I_CATEGORIES, T2ISample
from hyperbagel.evaluation.detector import DEFAULT_CONFIG, DetectorConfig, detect
from hyperbagel.evaluation.paired import mean_with_error

POSITION_THRESHOLD = 0.1  # GenEval's: offsets shrink by this fraction of the two boxes' summed sizes


def relation_holds(
    a_box: tuple[float, float, float, float],
    b_box: tuple[float, float, float, float],
    relation: str,
    threshold: float = POSITION_THRESHOLD,
) -> bool:
    """Whether box a lies `relation` ("left", "right", "above", "below") of box b (boxes x0, y0, x1, y1).

    GenEval's rule: the centre offset, shrunk per axis by `threshold` times the two boxes' summed
    extents, must point along the named direction for more than half of the offset's length.
    """
    a, b = np.asarray(a_box, dtype=np.float64), np.asarray(b_box, dtype=np.float64)
    offset = (a[:2] + a[2:]) / 2 - (b[:2] + b[2:]) / 2
    extent = (a[2:] - a[:2]) + (b[2:] - b[:2])
    norm = float(np.linalg.norm(offset))
    if norm == 0.0:
        return False
    revised = np.sign(offset) * np.maximum(np.abs(offset) - threshold * extent, 0.0) / norm
    dx, dy = float(revised[0]), float(revised[1])
    return {"left": dx < -0.5, "right": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def score_t2i(
    image: Image.Image | np.ndarray, sample: T2ISample, config: DetectorConfig = DEFAULT_CONFIG
) -> bool:
    """Strict pass/fail of one generated image against its prompt's spec."""
    detection = detect(image, config)
    if not (detection.clean and detection.all_recognised):
        return False
    if Counter(o.identity for o in detection.objects) != Counter(sample.spec.objects):
        return False
    if sample.spec.relation is None:
        return True
    first, second = sample.spec.objects
    boxes = {o.identity: o.bbox for o in detection.objects}
    return relation_holds(boxes[first], boxes[second], sample.spec.relation)


def geneval_passes(
    images: Sequence[Image.Image | np.ndarray],
    samples: Sequence[T2ISample],
    config: DetectorConfig = DEFAULT_CONFIG,
) -> list[bool]:
    """The strict verdict of each image against its sample's prompt, in sample order."""
    if len(images) != len(samples):
        raise ValueError(f"got {len(images)} images for {len(samples)} samples")
    return [score_t2i(image, sample, config) for image, sample in zip(images, samples, strict=True)]


def _by_category(values: Sequence[float], samples: Sequence[T2ISample]) -> dict[str, list[float]]:
    grouped: dict[str, list[float]] = {c: [] for c in T2I_CATEGORIES}
    for value, sample in zip(values, samples, strict=True):
        grouped[sample.category].append(float(value))
    return grouped


def scores_from_passes(passes: Sequence[bool], samples: Sequence[T2ISample]) -> dict[str, float]:
    """Accuracy per category (keys: the six GenEval categories; NaN for a category without samples) and
    `overall`, the mean of the categories that have samples."""
    passed = _by_category(passes, samples)
    scores = {c: (sum(v) / len(v) if v else math.nan) for c, v in passed.items()}
    present = [scores[c] for c in T2I_CATEGORIES if passed[c]]
    scores["overall"] = sum(present) / len(present) if present else math.nan
    return scores


def geneval_scores(
    images: Sequence[Image.Image | np.ndarray],
    samples: Sequence[T2ISample],
    config: DetectorConfig = DEFAULT_CONFIG,
) -> dict[str, float]:
    """`scores_from_passes` of the images' strict verdicts."""
    return scores_from_passes(geneval_passes(images, samples, config), samples)


def paired_overall_gap(
    baseline: Sequence[bool], candidate: Sequence[bool], samples: Sequence[T2ISample]
) -> tuple[float, float]:
    """(`overall` of the candidate minus the baseline's, its standard error), both models scored on the
    same prompts (and noise). Why paired: the per-prompt differences carry whatever correlation the two
    models' verdicts have, which combining two independent errors would ignore. The error is that of a
    mean of per-category means: sqrt(sum_c var_c / n_c) / C, var_c the sample variance of the differences."""
    if not samples or not len(baseline) == len(candidate) == len(samples):
        raise ValueError(f"got {len(baseline)} and {len(candidate)} verdicts for {len(samples)} samples")
    differences = [float(c) - float(b) for b, c in zip(baseline, candidate, strict=True)]
    per_category = [mean_with_error(v) for v in _by_category(differences, samples).values() if v]
    gap = sum(mean for mean, _ in per_category) / len(per_category)
    return gap, math.sqrt(sum(error**2 for _, error in per_category)) / len(per_category)
