"""Scoring of edited images against the exact target of a shapes-world edit (GEdit-like).

Two numbers per sample:
- instruction (bool): the detector finds exactly the target's objects (same (colour, shape) multiset,
  all recognised, image clean), each within `position_tolerance` x canvas of its target position; the
  object an "add" introduces may be anywhere, since the instruction names no place.
- preservation (float in [0, 1]): outside the edited region, the fraction of pixels whose palette class
  (background / colour / unknown) equals the source's. The region is the union of the changed object's
  boxes in source and target and of the box where the edited image shows the changed object, dilated
  by the detector halo; so an edit placed elsewhere than the reference target is not charged twice.
`overall` multiplies them per sample (an edit that misses the instruction scores 0; one that follows it
scores its preservation), then averages over samples.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from hyperbagel.datamodules.shapes import EditSample
from hyperbagel.datamodules.shapes_scene import label_map
from hyperbagel.evaluation.detector import (
    DEFAULT_CONFIG,
    Detection,
    DetectorConfig,
    detect,
    dilate,
    to_rgb_array,
)
from hyperbagel.evaluation.paired import mean_with_error

POSITION_TOLERANCE = 0.1  # of the canvas side


@dataclass(frozen=True)
class EditScore:
    instruction: bool
    preservation: float

    @property
    def overall(self) -> float:
        return float(self.instruction) * self.preservation


def _instruction_followed(detection: Detection, sample: EditSample, tolerance: float) -> bool:
    target = sample.target
    if not (detection.clean and detection.all_recognised):
        return False
    if Counter(o.identity for o in detection.objects) != Counter(target.identities()):
        return False
    found = {o.identity: o.center for o in detection.objects}  # edit scenes have distinct identities
    for j, obj in enumerate(target.objects):
        if sample.kind == "add" and j == sample.target_index:
            continue
        cx, cy = found[obj.identity]
        if np.hypot(cx - obj.cx, cy - obj.cy) > tolerance * target.canvas_size:
            return False
    return True


def _edited_region(detection: Detection, sample: EditSample, halo: int) -> np.ndarray:
    size = sample.source.canvas_size
    region = np.zeros((size, size), dtype=bool)
    boxes = []
    if sample.source_index is not None:
        boxes.append(sample.source.objects[sample.source_index].bbox)
    if sample.target_index is not None:
        changed = sample.target.objects[sample.target_index]
        boxes.append(changed.bbox)
        boxes += [o.bbox for o in detection.objects if o.identity == changed.identity]
    for x0, y0, x1, y1 in boxes:
        region[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)] = True
    return dilate(region, halo)


def score_edit(
    edited_image: Image.Image | np.ndarray,
    sample: EditSample,
    config: DetectorConfig = DEFAULT_CONFIG,
    position_tolerance: float = POSITION_TOLERANCE,
) -> EditScore:
    """Instruction-following and preservation of one edited image (see module docstring)."""
    rgb = to_rgb_array(edited_image)
    size = sample.source.canvas_size
    if rgb.shape[:2] != (size, size):
        raise ValueError(
            f"edited image is {rgb.shape[1]}x{rgb.shape[0]}, the sample's canvas is {size}x{size}"
        )
    detection = detect(rgb, config)
    halo = max(1, round(config.halo_fraction * size))
    outside = ~_edited_region(detection, sample, halo)
    kept = detection.labels[outside] == label_map(sample.source)[outside]
    preservation = float(kept.mean()) if kept.size else 1.0
    return EditScore(_instruction_followed(detection, sample, position_tolerance), preservation)


def score_edits(
    images: Sequence[Image.Image | np.ndarray],
    samples: Sequence[EditSample],
    config: DetectorConfig = DEFAULT_CONFIG,
) -> list[EditScore]:
    """Each image's `EditScore` against its sample, in sample order."""
    if len(images) != len(samples):
        raise ValueError(f"got {len(images)} images for {len(samples)} samples")
    return [score_edit(image, sample, config) for image, sample in zip(images, samples, strict=True)]


def scores_from_edits(scores: Sequence[EditScore]) -> dict[str, float]:
    """Means over samples: `instruction` (rate), `preservation`, and
    `overall` = mean(instruction * preservation)."""
    if not scores:
        raise ValueError("no samples to score")
    n = len(scores)
    return {
        "overall": sum(s.overall for s in scores) / n,
        "instruction": sum(s.instruction for s in scores) / n,
        "preservation": sum(s.preservation for s in scores) / n,
    }


def paired_edit_gap(baseline: Sequence[EditScore], candidate: Sequence[EditScore]) -> tuple[float, float]:
    """(`overall` of the candidate minus the baseline's, its standard error; NaN from one edit), both models
    given the same edits (and noise): the error of the mean of the per-edit differences."""
    if not baseline or len(baseline) != len(candidate):
        raise ValueError(f"need the same edits scored twice; got {len(baseline)} and {len(candidate)}")
    return mean_with_error([c.overall - b.overall for b, c in zip(baseline, candidate, strict=True)])
