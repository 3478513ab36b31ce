"""Scorers are trusted only if exact renders score ~1 and wrong renders ~0, including adversarial ones,
while mild noise / JPEG (what a trained generator's outputs look like) still pass."""

import io
import math
import random
import time
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image, ImageFilter

from hyperbagel.datamodules.shapes import EDIT_KINDS, T2I_CATEGORIES, ShapesWorld
from hyperbagel.datamodules.shapes_scene import COLORS, PALETTE, SHAPES, Scene, ShapeObject, render
from hyperbagel.evaluation.detector import UNKNOWN_SHAPE, connected_components, detect, segment
from hyperbagel.evaluation.editing import (
    EditScore,
    paired_edit_gap,
    score_edit,
    score_edits,
    scores_from_edits,
)
from hyperbagel.evaluation.geneval import (
    geneval_scores,
    paired_overall_gap,
    relation_holds,
    score_t2i,
    scores_from_passes,
)
from hyperbagel.evaluation.understanding import answer_accuracy

S = 64


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(canvas_size=S, seed=3)


@pytest.fixture(scope="module")
def t2i(world):
    return {c: world.samples("t2i", "test", 30, category=c) for c in T2I_CATEGORIES}


def noisy(image, sigma=8.0, seed=0):
    array = np.asarray(image).astype(np.float64) + np.random.default_rng(seed).normal(0, sigma, (S, S, 3))
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))


def jpeg(image, quality=90):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def other_shape(shape):
    return SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]


def other_color(color):
    return COLORS[(COLORS.index(color) + 1) % len(COLORS)]


# ---- detector -------------------------------------------------------------------------------------------


def _bfs_components(labels):
    """Reference 4-connected labelling by breadth-first search; returns a set of frozensets of pixels."""
    h, w = labels.shape
    seen = np.zeros_like(labels, dtype=bool)
    out = set()
    for y in range(h):
        for x in range(w):
            if labels[y, x] <= 0 or seen[y, x]:
                continue
            queue, comp = deque([(y, x)]), set()
            seen[y, x] = True
            while queue:
                cy, cx = queue.popleft()
                comp.add((cy, cx))
                for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                    if 0 <= ny < h and 0 <= nx < w and not seen[ny, nx] and labels[ny, nx] == labels[cy, cx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            out.add(frozenset(comp))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_components_match_bfs_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1, 2, 3], size=(24, 31), p=[0.1, 0.3, 0.2, 0.2, 0.2]).astype(np.int8)
    labels[5:20, 3:6] = 2  # a long snake forces many propagation steps
    labels[19, 3:28] = 2
    comp = connected_components(labels)
    ours = {frozenset(zip(*np.nonzero(comp == c), strict=True)) for c in np.unique(comp) if c >= 0}
    assert ours == _bfs_components(labels)
    assert (comp[labels <= 0] == -1).all()


def test_detector_recovers_exact_scene():
    scene = Scene(
        (
            ShapeObject("circle", "purple", 15.0, 16.0, 14),
            ShapeObject("triangle", "orange", 45.0, 17.0, 16),
            ShapeObject("square", "yellow", 30.0, 47.0, 12),
        ),
        S,
    )
    detection = detect(render(scene))
    assert detection.clean and detection.unknown_pixels == 0 and detection.unexplained_pixels == 0
    found = {o.identity: o for o in detection.objects}
    assert set(found) == {o.identity for o in scene.objects}
    for obj in scene.objects:
        d = found[obj.identity]
        assert d.bbox == obj.bbox and d.center == (obj.cx, obj.cy) and d.iou == 1.0 and d.edge_width == 0.0
    assert found[("yellow", "square")].area == 144


def test_segment_marks_off_palette_pixels_unknown():
    array = np.full((S, S, 3), 255, dtype=np.uint8)
    array[0:4, 0:4] = (128, 128, 128)  # grey: far from everything
    array[10:14, 10:14] = np.array(PALETTE["red"]) + 20  # near red
    labels = segment(array)
    assert (
        (labels[0:4, 0:4] == -1).all() and (labels[10:14, 10:14] == 1).all() and (labels[20:, 20:] == 0).all()
    )


def test_detector_rejects_non_shapes():
    base = np.full((S, S, 3), 255, dtype=np.uint8)
    ring, bar = base.copy(), base.copy()
    yy, xx = np.mgrid[:S, :S] + 0.5
    r = np.hypot(xx - 32, yy - 32)
    ring[(r <= 9) & (r >= 5)] = PALETTE["green"]  # hollow circle
    bar[20:28, 10:40] = PALETTE["blue"]  # 30x8 bar: wrong aspect ratio
    for image in (ring, bar):
        (obj,) = detect(image).objects
        assert obj.shape == UNKNOWN_SHAPE


# ---- GenEval-style text-to-image scoring -------------------------------------------------------------


def test_exact_noisy_and_jpeg_renders_pass(t2i):
    for category, samples in t2i.items():
        assert all(score_t2i(s.image, s) for s in samples), category
        assert all(score_t2i(noisy(s.image, seed=i), s) for i, s in enumerate(samples)), category
        assert np.mean([score_t2i(jpeg(s.image), s) for s in samples]) >= 0.9, category


@pytest.mark.parametrize("canvas", [32, 128])
def test_exact_renders_pass_at_other_canvas_sizes(canvas):
    samples = ShapesWorld(canvas_size=canvas, seed=4).samples("t2i", "test", 60)
    scores = geneval_scores([s.image for s in samples], samples)
    assert scores["overall"] == 1.0


def _scattered_patches(scene, rng):
    array = np.full((S, S, 3), 255, dtype=np.uint8)
    for obj in scene.objects:
        for _ in range(12):
            x, y = rng.randrange(S - 3), rng.randrange(S - 3)
            array[y : y + 3, x : x + 3] = PALETTE[obj.color]
    return Image.fromarray(array)


def _with_extra_object(scene, rng):
    taken = set(scene.identities())
    for _ in range(10_000):
        extra = ShapeObject(
            rng.choice(SHAPES), rng.choice(COLORS), rng.randrange(8, S - 8), rng.randrange(8, S - 8), 12
        )
        apart = all(
            max(abs(extra.cx - o.cx), abs(extra.cy - o.cy)) >= (extra.size + o.size) / 2 + 3
            for o in scene.objects
        )
        if apart and extra.identity not in taken:
            return render(scene.with_object(extra))
    raise AssertionError("no room for an extra object")


def _negatives(scene, category, rng):
    first = scene.objects[0]
    out = {
        "wrong_shape": render(scene.replaced(0, replace(first, shape=other_shape(first.shape)))),
        "wrong_color": render(scene.replaced(0, replace(first, color=other_color(first.color)))),
        "extra_object": _with_extra_object(scene, rng),
        "missing_object": render(scene.without(0)),
        "scattered_patches": _scattered_patches(scene, rng),
        "blurred_smear": render(scene).filter(ImageFilter.GaussianBlur(3)),
        "empty": render(Scene((), S)),
    }
    if category == "counting":
        out["one_more"] = _with_extra_object(Scene(scene.objects, S), rng)
    if category == "position":
        a, b = scene.objects
        out["wrong_relation"] = render(Scene((replace(a, cx=b.cx, cy=b.cy), replace(b, cx=a.cx, cy=a.cy)), S))
    if category == "color_attr":
        a, b = scene.objects
        out["swapped_colors"] = render(Scene((replace(a, color=b.color), replace(b, color=a.color)), S))
    return out


def test_wrong_and_adversarial_renders_fail(t2i):
    rng = random.Random(0)
    for category, samples in t2i.items():
        for s in samples[:15]:
            for name, image in _negatives(s.scene, category, rng).items():
                assert not score_t2i(image, s), (category, name, s.prompt)
                assert not score_t2i(noisy(image), s), (category, name, s.prompt)


def test_relation_holds_geneval_rule():
    a, b = (0, 0, 10, 10), (30, 0, 40, 10)  # b is 30 px right of a, same row
    assert relation_holds(a, b, "left") and relation_holds(b, a, "right")
    assert not relation_holds(a, b, "right") and not relation_holds(a, b, "above")
    diagonal = (30, 30, 40, 40)  # 45 degrees: both "left" and "above" (revised offsets 26/42.4 > 0.5)
    assert relation_holds(a, diagonal, "left") and relation_holds(a, diagonal, "above")
    touching = (0, 10, 10, 20)  # directly below by one box: offset 10 shrinks to 8 of norm 10 -> "above"
    assert relation_holds(a, touching, "above") and not relation_holds(a, touching, "left")
    assert not relation_holds(a, (1, 0, 11, 10), "left")  # 1 px offset is swallowed by the 0.1 margin


def test_geneval_scores_per_category_and_overall(t2i):
    blank = render(Scene((), S))
    images, samples = [], []
    passing = {
        "single_object": 3,
        "two_object": 0,
        "counting": 1,
        "colors": 2,
        "position": 4,
        "color_attr": 2,
    }
    for category, n_pass in passing.items():
        for i, s in enumerate(t2i[category][:4]):
            images.append(s.image if i < n_pass else blank)
            samples.append(s)
    scores = geneval_scores(images, samples)
    assert set(scores) == {*T2I_CATEGORIES, "overall"}
    for category, n_pass in passing.items():
        assert scores[category] == n_pass / 4
    assert scores["overall"] == pytest.approx(sum(passing.values()) / 24)
    partial = geneval_scores([t2i["counting"][0].image], [t2i["counting"][0]])
    assert partial["counting"] == 1.0 and partial["overall"] == 1.0 and math.isnan(partial["position"])


def test_paired_gap_is_the_difference_of_overalls_with_the_error_of_a_mean_of_category_means(t2i):
    samples = t2i["single_object"][:3] + t2i["counting"][:3]
    baseline = [True, False, True, False, False, True]
    candidate = [True, True, True, True, False, True]
    gap, error = paired_overall_gap(baseline, candidate, samples)
    expected = (
        scores_from_passes(candidate, samples)["overall"] - scores_from_passes(baseline, samples)["overall"]
    )
    assert gap == pytest.approx(expected) == pytest.approx(1 / 3)
    # per-category differences [0, 1, 0] and [1, 0, 0]: sample variance 1/3 each over 3 prompts, 2 categories
    assert error == pytest.approx(math.sqrt(2 * (1 / 3) / 3) / 2)
    assert paired_overall_gap(baseline, baseline, samples) == (0.0, 0.0)
    with pytest.raises(ValueError, match="verdicts"):
        paired_overall_gap(baseline[:5], candidate, samples)


def test_scoring_is_fast(t2i):
    samples = [s for group in t2i.values() for s in group][:100]
    images = [noisy(s.image) for s in samples]
    start = time.perf_counter()
    geneval_scores(images, samples)
    assert time.perf_counter() - start < 1.5


# ---- editing -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def edits(world):
    return {k: world.samples("edit", "test", 20, category=k) for k in EDIT_KINDS}


def test_exact_target_scores_perfectly_and_source_fails(edits):
    for kind, samples in edits.items():
        for s in samples:
            exact = score_edit(s.target_image, s)
            assert exact.instruction and exact.preservation == 1.0 and exact.overall == 1.0, kind
            assert not score_edit(s.source_image, s).instruction, kind
            robust = score_edit(noisy(s.target_image), s)
            assert robust.instruction and robust.preservation == 1.0, kind
            compressed = score_edit(jpeg(s.target_image), s)
            assert compressed.instruction and compressed.preservation >= 0.95, kind


def test_changing_a_background_object_costs_preservation(edits):
    for kind, samples in edits.items():
        for s in samples:
            others = [j for j in range(len(s.target.objects)) if j != s.target_index]
            if not others:
                continue
            obj = s.target.objects[others[0]]
            color = next(c for c in COLORS if (c, obj.shape) not in s.target.identities())
            image = render(s.target.replaced(others[0], replace(obj, color=color)))
            score = score_edit(image, s)
            # Independent reference: the recoloured object's pixels over the pixels outside the edit.
            changed = np.any(np.asarray(image) != np.asarray(s.target_image), axis=-1).sum()
            region = np.zeros((S, S), dtype=bool)
            for o in [s.source.objects[i] for i in [s.source_index] if i is not None] + [
                s.target.objects[j] for j in [s.target_index] if j is not None
            ]:
                x0, y0, x1, y1 = o.bbox
                region[max(y0 - 2, 0) : y1 + 2, max(x0 - 2, 0) : x1 + 2] = True
            assert not score.instruction, kind
            assert score.preservation == pytest.approx(1 - changed / (~region).sum()), kind
            assert score.preservation < 0.99


def test_move_by_half_the_distance_fails(edits):
    for s in edits["move"]:
        old, new = s.source.objects[s.source_index], s.target.objects[s.target_index]
        halfway = replace(new, cx=(old.cx + new.cx) / 2, cy=(old.cy + new.cy) / 2)
        assert not score_edit(render(s.target.replaced(s.target_index, halfway)), s).instruction


def test_add_anywhere_free_is_accepted(edits):
    moved = 0
    for s in edits["add"]:
        added = s.target.objects[s.target_index]
        for dx, dy in ((-16, 0), (16, 0), (0, -16), (0, 16)):
            candidate = replace(added, cx=added.cx + dx, cy=added.cy + dy)
            x0, y0, x1, y1 = candidate.bbox
            others = s.source.objects
            inside = min(x0, y0) >= 1 and max(x1, y1) <= S - 1
            if inside and all(
                max(abs(candidate.cx - o.cx), abs(candidate.cy - o.cy)) >= (candidate.size + o.size) / 2 + 3
                for o in others
            ):
                score = score_edit(render(s.source.with_object(candidate)), s)
                assert score.instruction and score.preservation == 1.0
                moved += 1
                break
    assert moved >= 5


def test_edit_scores_combination(edits):
    samples = [s for group in edits.values() for s in group[:2]]
    images = [s.target_image if i % 2 == 0 else s.source_image for i, s in enumerate(samples)]
    per = [score_edit(im, s) for im, s in zip(images, samples, strict=True)]
    scores = scores_from_edits(score_edits(images, samples))
    assert scores["instruction"] == 0.5
    assert scores["overall"] == pytest.approx(np.mean([p.instruction * p.preservation for p in per]))
    assert scores["preservation"] == pytest.approx(np.mean([p.preservation for p in per]))
    with pytest.raises(ValueError, match="canvas"):
        score_edit(Image.new("RGB", (32, 32), "white"), samples[0])


def test_paired_edit_gap_is_the_difference_of_overalls_with_the_error_of_the_mean_difference():
    baseline = [EditScore(True, 0.9), EditScore(False, 1.0), EditScore(True, 1.0)]
    candidate = [EditScore(True, 0.5), EditScore(True, 1.0), EditScore(True, 1.0)]
    gap, error = paired_edit_gap(baseline, candidate)
    assert gap == pytest.approx(
        scores_from_edits(candidate)["overall"] - scores_from_edits(baseline)["overall"]
    )
    # differences -0.4, 1, 0: mean 0.2, sample variance (0.36 + 0.64 + 0.04) / 2 = 0.52, over 3 edits
    assert gap == pytest.approx(0.2) and error == pytest.approx(math.sqrt(0.52 / 3))
    assert paired_edit_gap(baseline, baseline) == (0.0, 0.0)
    gap, error = paired_edit_gap(baseline[:1], candidate[:1])  # one edit: no variance to estimate
    assert gap == pytest.approx(-0.4) and math.isnan(error)
    with pytest.raises(ValueError, match="same edits"):
        paired_edit_gap(baseline[:2], candidate)


# ---- understanding -------------------------------------------------------------------------------------


def test_answer_accuracy(world):
    samples = world.samples("vqa", "test", 50)
    truth = [s.answer for s in samples]
    assert answer_accuracy(truth, samples) == {"short_answer_accuracy": 1.0, "describe_exact": 1.0}
    shouted = ["  " + a.upper().replace(" ", "   ") + "\n" for a in truth]
    assert answer_accuracy(shouted, samples) == {"short_answer_accuracy": 1.0, "describe_exact": 1.0}
    # Wrong for every short question, and the describe answers truncated by their last sentence.
    wrong = [
        ("not " + a) if s.category != "describe" else a.rsplit(" .", 2)[0] + " ."
        for a, s in zip(truth, samples, strict=True)
    ]
    assert answer_accuracy(wrong, samples) == {"short_answer_accuracy": 0.0, "describe_exact": 0.0}
    half = [a if i % 2 == 0 else "blue purple" for i, a in enumerate(truth)]
    short = [i for i, s in enumerate(samples) if s.category != "describe"]
    result = answer_accuracy(half, samples)
    assert result["short_answer_accuracy"] == pytest.approx(sum(i % 2 == 0 for i in short) / len(short))
    only_short = [s for s in samples if s.category != "describe"]
    assert math.isnan(answer_accuracy([s.answer for s in only_short], only_short)["describe_exact"])
