"""The shapes world: exact renders, prompts/answers consistent with their scenes, disjoint splits,
closed vocabulary and tokenizer round trip."""

import re
import time
from collections import Counter

import numpy as np
import pytest

from hyperbagel.datamodules.shapes import (
    EDIT_KINDS,
    T2I_CATEGORIES,
    VQA_CATEGORIES,
    ShapesWorld,
    t2i_spec_pool,
    t2i_split_pool,
)
from hyperbagel.datamodules.shapes_scene import PALETTE, Scene, ShapeObject, label_map, render, render_array
from hyperbagel.datamodules.shapes_text import describe_scene, detokenize, words, world_vocabulary
from hyperbagel.datamodules.shapes_tokenizer import build_shapes_tokenizer

NUMBERS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4}


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(canvas_size=64, seed=0)


def _pixels_of(array, rgb):
    return np.all(array == np.array(rgb, dtype=np.uint8), axis=-1)


# ---- rendering ----------------------------------------------------------------------------------------


def test_render_is_exact_with_reference_masks():
    scene = Scene(
        (
            ShapeObject("square", "red", 10.0, 10.0, 12),
            ShapeObject("circle", "blue", 40.0, 12.0, 16),
            ShapeObject("triangle", "green", 20.0, 45.0, 14),
        ),
        64,
    )
    image = render(scene)
    assert image.size == (64, 64) and image.mode == "RGB"
    array = np.asarray(image)
    # Only the background and the three palette colours, no antialiasing.
    colours = {tuple(int(v) for v in c) for c in array.reshape(-1, 3)}
    assert colours == {(255, 255, 255), PALETTE["red"], PALETTE["blue"], PALETTE["green"]}
    # Square: exactly its 12x12 box [4, 16).
    red = _pixels_of(array, PALETTE["red"])
    assert red.sum() == 144 and red[4:16, 4:16].all()
    # Circle: brute-force count of pixel centres inside radius 8 around (40, 12).
    blue = _pixels_of(array, PALETTE["blue"])
    expected = {
        (y, x) for y in range(64) for x in range(64) if (x + 0.5 - 40) ** 2 + (y + 0.5 - 12) ** 2 <= 64
    }
    assert set(zip(*np.nonzero(blue), strict=True)) == expected
    # Triangle in box x [13, 27), y [38, 52): apex row has 2 pixels, base row all 14, widths grow.
    green = _pixels_of(array, PALETTE["green"])
    widths = green[38:52, 13:27].sum(axis=1)
    assert widths[0] == 2 and widths[-1] == 14 and np.all(np.diff(widths) >= 0)
    assert green.sum() == green[38:52, 13:27].sum()
    # Label map agrees with the render.
    labels = label_map(scene)
    assert (labels == 1).sum() == 144 and (labels > 0).sum() == red.sum() + blue.sum() + green.sum()


def test_scene_json_round_trip(world):
    for sample in world.samples("t2i", "train", 12):
        assert Scene.from_json(sample.scene.to_json()) == sample.scene


@pytest.mark.parametrize("canvas", [32, 64, 128])
def test_layouts_respect_geometry(canvas):
    w = ShapesWorld(canvas_size=canvas, seed=1)
    for sample in w.samples("t2i", "train", 60) + w.samples("vqa", "train", 20):
        scene = sample.scene
        assert render_array(scene).shape == (canvas, canvas, 3)
        boxes = [o.bbox for o in scene.objects]
        for o, (x0, y0, x1, y1) in zip(scene.objects, boxes, strict=True):
            assert 0.18 * canvas - 1 <= o.size <= 0.30 * canvas
            assert x0 >= 1 and y0 >= 1 and x1 <= canvas - 1 and y1 <= canvas - 1
        for i, a in enumerate(boxes):  # pairwise disjoint with a gap of at least 2 px
            for b in boxes[i + 1 :]:
                assert a[2] + 2 <= b[0] or b[2] + 2 <= a[0] or a[3] + 2 <= b[1] or b[3] + 2 <= a[1]


# ---- text-to-image --------------------------------------------------------------------------------------


def _parse_objects(prompt):
    """Reference parser of object phrases: [(count, color, shape)]."""
    found = re.findall(r"(a|an|two|three|four) (\w+) (circle|square|triangle)s?", prompt)
    return [(1 if n in ("a", "an") else NUMBERS[n], c, s) for n, c, s in found]


def test_t2i_samples_satisfy_their_prompts(world):
    samples = world.samples("t2i", "train", 240)
    assert Counter(s.category for s in samples) == {c: 40 for c in T2I_CATEGORIES}
    for s in samples:
        identities = Counter(o.identity for o in s.scene.objects)
        assert identities == Counter(s.spec.objects), s.prompt
        if s.category == "colors":
            m = re.fullmatch(r"a (circle|square|triangle) colored (\w+)", s.prompt)
            assert m and s.spec.objects == ((m.group(2), m.group(1)),)
            continue
        parsed = _parse_objects(s.prompt)
        assert Counter({(c, sh): n for n, c, sh in parsed}) == Counter(s.spec.objects), s.prompt
        if s.category == "counting":
            assert len(parsed) == 1 and 2 <= parsed[0][0] <= 4
        if s.category == "two_object":
            (c1, s1), (c2, s2) = s.spec.objects
            assert (c1 == c2) != (s1 == s2)
        if s.category == "color_attr":
            (c1, s1), (c2, s2) = s.spec.objects
            assert c1 != c2 and s1 != s2
        if s.category == "position":
            a, b = s.scene.objects
            rel = s.spec.relation
            phrase = {
                "left": "to the left of",
                "right": "to the right of",
                "above": "above",
                "below": "below",
            }
            assert f" {phrase[rel]} " in s.prompt
            dx, dy = a.cx - b.cx, a.cy - b.cy
            along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[rel]
            assert along > 0 and abs(across) <= along / 2


def test_t2i_pools_partition_and_splits_disjoint(world):
    for category in T2I_CATEGORIES:
        pools = {split: t2i_split_pool(category, split) for split in ("train", "val", "test")}
        assert all(pools.values()), category
        assert sorted(map(repr, sum(pools.values(), []))) == sorted(map(repr, t2i_spec_pool(category)))
    prompts = {
        split: {s.prompt for s in world.samples("t2i", split, 600 if split == "train" else 300)}
        for split in ("train", "val", "test")
    }
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    # The split does not depend on the seed: another seed's test prompts are still unseen in train.
    other = {s.prompt for s in ShapesWorld(64, seed=5).samples("t2i", "test", 300)}
    assert not other & prompts["train"]


def test_samples_are_deterministic_prefix_stable_and_split_independent():
    a, b = ShapesWorld(64, seed=0), ShapesWorld(64, seed=0)
    for kind in ("t2i", "edit", "vqa"):
        first = a.samples(kind, "test", 15)
        b.samples(kind, "train", 50)  # drawing train must not move the test split
        assert b.samples(kind, "test", 15) == first
        assert a.samples(kind, "test", 7) == first[:7]
        assert ShapesWorld(64, seed=1).samples(kind, "test", 15) != first


def test_edit_and_vqa_splits_disjoint(world):
    train_edit = {(s.source.key(), s.instruction) for s in world.samples("edit", "train", 400)}
    train_vqa = {(s.scene.key(), s.question) for s in world.samples("vqa", "train", 400)}
    train_scenes = {k for k, _ in train_edit} | {k for k, _ in train_vqa}
    for split in ("val", "test"):
        edit = world.samples("edit", split, 100)
        vqa = world.samples("vqa", split, 100)
        assert not {(s.source.key(), s.instruction) for s in edit} & train_edit
        assert not {(s.scene.key(), s.question) for s in vqa} & train_vqa
        assert not ({s.source.key() for s in edit} | {s.scene.key() for s in vqa}) & train_scenes


def test_invalid_arguments(world):
    with pytest.raises(ValueError, match="split"):
        world.samples("t2i", "dev", 1)
    with pytest.raises(ValueError, match="kind"):
        world.samples("video", "train", 1)
    with pytest.raises(ValueError, match="category"):
        world.samples("edit", "train", 1, category="rotate")
    with pytest.raises(ValueError, match="shape"):
        ShapeObject("hexagon", "red", 10, 10, 8)


# ---- editing --------------------------------------------------------------------------------------------


def test_edit_pairs_change_exactly_what_the_instruction_says(world):
    samples = world.samples("edit", "train", 100)
    assert Counter(s.kind for s in samples) == {k: 20 for k in EDIT_KINDS}
    quarter = 16
    for s in samples:
        src, tgt = s.source.objects, s.target.objects
        assert s.instruction == s.instructions[0] and len(set(s.instructions)) == len(s.instructions) >= 2
        # Untouched objects are identical and in order.
        kept_src = [o for i, o in enumerate(src) if i != s.source_index]
        kept_tgt = [o for j, o in enumerate(tgt) if j != s.target_index]
        assert kept_src == kept_tgt
        # Renders differ only inside the changed objects' boxes.
        diff = np.any(render_array(s.source) != render_array(s.target), axis=-1)
        region = np.zeros_like(diff)
        for obj in ([src[s.source_index]] if s.source_index is not None else []) + (
            [tgt[s.target_index]] if s.target_index is not None else []
        ):
            x0, y0, x1, y1 = obj.bbox
            region[y0:y1, x0:x1] = True
        assert diff.any() and not (diff & ~region).any()
        old = src[s.source_index] if s.source_index is not None else None
        new = tgt[s.target_index] if s.target_index is not None else None
        if s.kind == "recolor":
            assert s.instruction == f"make the {old.color} {old.shape} {new.color}"
            assert (new.shape, new.cx, new.cy, new.size) == (old.shape, old.cx, old.cy, old.size)
            assert new.color != old.color
        elif s.kind == "replace":
            assert re.fullmatch(
                rf"replace the {old.color} {old.shape} with an? {new.color} {new.shape}", s.instruction
            )
            assert new.color == old.color and new.shape != old.shape and (new.cx, new.cy) == (old.cx, old.cy)
        elif s.kind == "add":
            assert len(tgt) == len(src) + 1 and re.fullmatch(
                rf"add an? {new.color} {new.shape}", s.instruction
            )
        elif s.kind == "remove":
            assert len(tgt) == len(src) - 1 and s.instruction == f"remove the {old.color} {old.shape}"
        else:
            direction = s.instruction.split()[-1]
            expected = {
                "left": (-quarter, 0),
                "right": (quarter, 0),
                "up": (0, -quarter),
                "down": (0, quarter),
            }
            assert (new.cx - old.cx, new.cy - old.cy) == expected[direction]
        assert len(set(s.target.identities())) == len(tgt)  # referents stay unambiguous


# ---- understanding --------------------------------------------------------------------------------------


def _reference_answer(scene, question):
    objects = scene.objects
    if m := re.fullmatch(r"what color is the (\w+) \?", question):
        (obj,) = [o for o in objects if o.shape == m.group(1)]
        return obj.color
    if m := re.fullmatch(r"what shape is the (\w+) object \?", question):
        (obj,) = [o for o in objects if o.color == m.group(1)]
        return obj.shape
    if m := re.fullmatch(r"how many (circle|square|triangle)s are there \?", question):
        return list(NUMBERS)[sum(o.shape == m.group(1) for o in objects)]
    if m := re.fullmatch(r"how many (\w+) objects are there \?", question):
        return list(NUMBERS)[sum(o.color == m.group(1) for o in objects)]
    m = re.fullmatch(r"is the (\w+) (\w+) (left or right|above or below) of the (\w+) (\w+) \?", question)
    (a,) = [o for o in objects if o.identity == (m.group(1), m.group(2))]
    (b,) = [o for o in objects if o.identity == (m.group(4), m.group(5))]
    if m.group(3) == "left or right":
        assert abs(a.cx - b.cx) >= (a.size + b.size) / 2  # unambiguous
        return "left" if a.cx < b.cx else "right"
    assert abs(a.cy - b.cy) >= (a.size + b.size) / 2
    return "above" if a.cy < b.cy else "below"


def test_short_answers_match_reference(world):
    samples = world.samples("vqa", "train", 200)
    assert Counter(s.category for s in samples) == {c: 40 for c in VQA_CATEGORIES}
    for s in samples:
        if s.category != "describe":
            assert s.answer == _reference_answer(s.scene, s.question), s.question


def test_follow_up_questions_are_distinct_correct_and_deterministic(world):
    samples = world.samples("vqa", "train", 60)
    asked = Counter()
    for i, s in enumerate(samples):
        pairs = world.follow_up_questions(s.scene, 4, key=str(i))
        assert pairs == world.follow_up_questions(s.scene, 4, key=str(i))
        assert 1 <= len(pairs) <= 4 and len(set(pairs)) == len(pairs)
        for question, answer in pairs:
            assert answer == _reference_answer(s.scene, question), question
            asked[question.split()[0]] += 1
    assert sum(len(world.follow_up_questions(s.scene, 4, key=str(i))) for i, s in enumerate(samples)) > 200
    assert set(asked) == {"what", "how", "is"}  # colour/shape, count and position questions all appear
    assert world.follow_up_questions(samples[0].scene, 0, key="0") == []


def test_describe_hand_made_scene():
    scene = Scene(
        (ShapeObject("square", "blue", 50.0, 50.0, 16), ShapeObject("circle", "orange", 18.0, 18.0, 16)), 64
    )
    assert describe_scene(scene) == (
        "there are two objects : one circle and one square . "
        "there is an orange circle at the top left . "
        "there is a blue square at the bottom right . "
        "the orange circle is to the left of the blue square ."
    )


def test_describe_answers_are_long_and_consistent(world):
    names = {
        0: {0: "top left", 1: "top", 2: "top right"},
        1: {0: "left", 1: "center", 2: "right"},
        2: {0: "bottom left", 1: "bottom", 2: "bottom right"},
    }
    for s in world.samples("vqa", "train", 60, category="describe"):
        assert s.question == "describe the image ."
        sentences = [x.strip() for x in s.answer.split(" .") if x.strip()]
        n = len(s.scene.objects)
        assert len(sentences) == 1 + n + (n - 1) >= 4
        assert sentences[0].startswith(f"there are {list(NUMBERS)[n]} objects :")
        expected = set()
        for o in s.scene.objects:
            where = names[int(o.cy // (64 / 3))][int(o.cx // (64 / 3))]
            article = "an" if o.color == "orange" else "a"
            expected.add(f"there is {article} {o.color} {o.shape} at the {where}")
        assert set(sentences[1 : 1 + n]) == expected
        for sentence in sentences[1 + n :]:
            m = re.fullmatch(
                r"the (\w+) (\w+) is (to the left of|to the right of|above|below) the (\w+) (\w+)", sentence
            )
            (a,) = [o for o in s.scene.objects if o.identity == (m.group(1), m.group(2))]
            (b,) = [o for o in s.scene.objects if o.identity == (m.group(4), m.group(5))]
            dx, dy = a.cx - b.cx, a.cy - b.cy
            ok = {
                "to the left of": dx < 0 and abs(dx) >= abs(dy),
                "to the right of": dx > 0 and abs(dx) >= abs(dy),
                "above": dy < 0 and abs(dy) > abs(dx),
                "below": dy > 0 and abs(dy) > abs(dx),
            }
            assert ok[m.group(3)], sentence


# ---- vocabulary and tokenizer ---------------------------------------------------------------------------


def _all_texts(world):
    texts = [s.prompt for s in world.samples("t2i", "train", 300)]
    for s in world.samples("edit", "train", 100):
        texts += list(s.instructions)
    for s in world.samples("vqa", "train", 150):
        texts += [s.question, s.answer]
    return texts


def test_vocabulary_is_closed_and_text_whitespace_tokenizable(world):
    vocab = world_vocabulary()
    assert len(vocab) == len(set(vocab)) and all(w == w.lower() and " " not in w for w in vocab)
    texts = _all_texts(world)
    used = set()
    for t in texts:
        assert detokenize(words(t)) == t and "  " not in t and t == t.strip()
        used |= set(words(t))
    assert used <= set(vocab)
    assert {".", "?", ","} <= used
    assert len(set(vocab) - used) < 10  # the vocabulary is not padded with unused words


def test_tokenizer_round_trip_and_specials(world):
    tok = build_shapes_tokenizer()
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|endoftext|>", "<unk>"]
    ids = tok.convert_tokens_to_ids(specials)
    assert len(set(ids)) == 6 and max(ids) < 6
    assert tok.pad_token == "<|endoftext|>" and tok.unk_token == "<unk>"
    assert len(tok) == 6 + len(world_vocabulary())
    for t in _all_texts(world):
        encoded = tok.encode(t)
        assert len(encoded) == len(words(t)) and tok.unk_token_id not in encoded
        assert tok.decode(encoded) == t
    chat = "<|im_start|> what color is the square ? <|im_end|>"
    assert tok.decode(tok.encode(chat)) == chat
    assert tok.encode("what color is the square?") == tok.encode("what color is the square ?")
    assert tok.encode("a zebra")[-1] == tok.unk_token_id


def test_generation_is_fast(world):
    start = time.perf_counter()
    ShapesWorld(64, seed=9).samples("t2i", "train", 1000)
    ShapesWorld(64, seed=9).samples("edit", "train", 1000)
    assert time.perf_counter() - start < 2.0
