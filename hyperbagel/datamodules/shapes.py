"""The built-in shapes world: seeded generator of text-to-image, editing and understanding samples.

Every sample carries its exact ground truth (scenes), so the scorers in ``hyperbagel.evaluation`` can
judge generated images and answers without any learned model.

Splits are fixed and disjoint, and independent of the seed:
- text-to-image: each category's finite pool of prompt specs is ordered by a SHA-256 hash; the first
  10% (at least one spec) is ``test``, the next 10% ``val``, the rest ``train``. Both phrasings of a
  spec (e.g. "a red circle and a red square" / "a red square and a red circle", "A to the left of B" /
  "B to the right of A") belong to the same spec, so no test or val prompt text ever occurs in train.
- editing and understanding: a candidate's split is the SHA-256 hash of its scene (the source scene for
  edits) mapped to [0, 1): < 0.1 test, < 0.2 val, else train. Candidates are drawn from a stream seeded
  by (seed, kind, split, category) and kept only if they hash into the requested split, so a split's
  samples do not depend on how many samples of any other split were drawn, and no scene (hence no
  (scene, question) or (source, instruction) pair) is shared between splits.
``samples(kind, split, n)`` is deterministic and prefix-stable: the first k of n samples equal
``samples(kind, split, k)``. Without a category, samples cycle through the categories in order.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from dataclasses import dataclass
from functools import cache
from itertools import combinations

from PIL import Image

from hyperbagel.datamodules import shapes_text as text
from hyperbagel.datamodules.shapes_scene import COLORS, IDENTITIES, SHAPES, Scene, ShapeObject, render

T2I_CATEGORIES: tuple[str, ...] = (
    "single_object",
    "two_object",
    "counting",
    "colors",
    "position",
    "color_attr",
)
EDIT_KINDS: tuple[str, ...] = ("recolor", "add", "remove", "move", "replace")
VQA_CATEGORIES: tuple[str, ...] = ("color", "count", "shape", "position", "describe")
SHORT_ANSWER_CATEGORIES: tuple[str, ...] = tuple(c for c in VQA_CATEGORIES if c != "describe")
KINDS: dict[str, tuple[str, ...]] = {"t2i": T2I_CATEGORIES, "edit": EDIT_KINDS, "vqa": VQA_CATEGORIES}
SPLITS: tuple[str, ...] = ("train", "val", "test")
HELD_OUT_FRACTION = 0.1  # of each of val and test
_MAX_TRIES = 10_000
_MAX_FOLLOW_UP_TRIES = 20  # per wanted pair; a scene poses only so many distinct questions


@dataclass(frozen=True)
class T2ISpec:
    """What a text-to-image prompt demands: exactly these (color, shape) objects (a multiset), and for
    the position category `objects[0]` lies in `relation` ("left", "right", "above", "below") of
    `objects[1]`."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None


@dataclass(frozen=True)
class T2ISample:
    prompt: str
    category: str
    scene: Scene
    spec: T2ISpec

    @property
    def image(self) -> Image.Image:
        return render(self.scene)


@dataclass(frozen=True)
class EditSample:
    """One edit. `source_index` is the changed object in the source (None for "add") and
    `target_index` the changed object in the target (None for "remove"); all other objects are
    identical, so the target render equals the source render outside the changed objects' boxes.
    `instructions` holds alternative phrasings, the first being `instruction`."""

    kind: str
    source: Scene
    target: Scene
    instruction: str
    instructions: tuple[str, ...]
    source_index: int | None
    target_index: int | None

    @property
    def source_image(self) -> Image.Image:
        return render(self.source)

    @property
    def target_image(self) -> Image.Image:
        return render(self.target)


@dataclass(frozen=True)
class VQASample:
    scene: Scene
    question: str
    answer: str
    category: str

    @property
    def image(self) -> Image.Image:
        return render(self.scene)


def _unit_hash(key: str) -> float:
    """Stable (process- and platform-independent) hash of a string into [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _hash_split(key: str) -> str:
    h = _unit_hash(key)
    if h < HELD_OUT_FRACTION:
        return "test"
    if h < 2 * HELD_OUT_FRACTION:
        return "val"
    return "train"


def _check(kind: str, split: str, category: str | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown sample kind {kind!r}; expected one of {tuple(KINDS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if category is not None and category not in KINDS[kind]:
        raise ValueError(f"unknown {kind} category {category!r}; expected one of {KINDS[kind]}")


def t2i_spec_pool(category: str) -> list[tuple]:
    """Canonical prompt specs of a category (the unit of the t2i split)."""
    if category in ("single_object", "colors"):
        return list(IDENTITIES)
    if category == "counting":
        return [(n, ident) for n in (2, 3, 4) for ident in IDENTITIES]
    pairs = list(combinations(IDENTITIES, 2))
    if category == "two_object":  # two different objects sharing their colour or their shape
        return [(a, b) for a, b in pairs if (a[0] == b[0]) != (a[1] == b[1])]
    if category == "color_attr":  # colours and shapes both differ, so binding them matters
        return [(a, b) for a, b in pairs if a[0] != b[0] and a[1] != b[1]]
    if category == "position":  # "a left of b" and "a above b"; "right" / "below" are their rephrasings
        return [(a, rel, b) for a in IDENTITIES for b in IDENTITIES if a != b for rel in ("left", "above")]
    raise ValueError(f"unknown t2i category {category!r}; expected one of {T2I_CATEGORIES}")


@cache
def _t2i_split_pools() -> dict[str, dict[str, list[tuple]]]:
    pools: dict[str, dict[str, list[tuple]]] = {}
    for category in T2I_CATEGORIES:
        pool = sorted(t2i_spec_pool(category), key=lambda spec, c=category: _unit_hash(f"t2i|{c}|{spec!r}"))
        k = max(1, round(HELD_OUT_FRACTION * len(pool)))
        pools[category] = {"test": pool[:k], "val": pool[k : 2 * k], "train": pool[2 * k :]}
    return pools


def t2i_split_pool(category: str, split: str) -> list[tuple]:
    """The canonical prompt specs of `category` assigned to `split` (the same for every seed)."""
    _check("t2i", split, category)
    return list(_t2i_split_pools()[category][split])


def _boxes_apart(a: ShapeObject, b: ShapeObject, gap: int) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _clearly(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """`a` is unmistakably `relation` of `b`: boxes apart along the axis and the offset mostly along it."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along >= (a.size + b.size) / 2 and abs(across) <= along / 2


class ShapesWorld:
    """Seeded generator of shapes-world samples on a `canvas_size` square canvas (32, 64, 128, ...)."""

    def __init__(self, canvas_size: int = 64, seed: int = 0) -> None:
        if canvas_size < 24:
            raise ValueError(f"canvas_size must be at least 24 pixels, got {canvas_size}")
        self.canvas_size = canvas_size
        self.seed = seed
        # Objects are 18-30% of the side, kept `margin` px inside the border and `gap` px apart.
        self.min_size = max(4, math.ceil(0.18 * canvas_size))
        self.max_size = max(self.min_size, math.floor(0.30 * canvas_size))
        self.margin = max(1, round(0.04 * canvas_size))
        self.gap = max(2, round(0.07 * canvas_size))
        self.move_distance = round(canvas_size / 4)

    # ---- public API ----------------------------------------------------------------------------------

    def samples(
        self, kind: str, split: str, n: int, category: str | None = None
    ) -> list[T2ISample] | list[EditSample] | list[VQASample]:
        """`n` deterministic samples of `kind` ("t2i", "edit", "vqa") from `split`; see module doc."""
        _check(kind, split, category)
        rng = random.Random(f"shapes|{self.seed}|{kind}|{split}|{category or 'all'}")
        categories = (category,) if category else KINDS[kind]
        make = {"t2i": self._t2i, "edit": self._edit, "vqa": self._vqa}[kind]
        return [make(rng, categories[i % len(categories)], split) for i in range(n)]

    # ---- text-to-image -------------------------------------------------------------------------------

    def _t2i(self, rng: random.Random, category: str, split: str) -> T2ISample:
        spec = rng.choice(_t2i_split_pools()[category][split])
        relation = None
        if category in ("single_object", "colors"):
            objects = (spec,)
            prompt = (text.single_object_prompt if category == "single_object" else text.colors_prompt)(*spec)
        elif category == "counting":
            count, ident = spec
            objects = (ident,) * count
            prompt = text.counting_prompt(count, *ident)
        elif category == "position":
            a, relation, b = spec
            if rng.random() < 0.5:
                a, relation, b = b, {"left": "right", "above": "below"}[relation], a
            objects = (a, b)
            prompt = text.position_prompt(a, relation, b)
        else:
            objects = spec if rng.random() < 0.5 else spec[::-1]
            prompt = text.pair_prompt(*objects)
        scene = self._layout(rng, list(objects), relation)
        return T2ISample(prompt=prompt, category=category, scene=scene, spec=T2ISpec(objects, relation))

    # ---- layouts -------------------------------------------------------------------------------------

    def _random_object(self, rng: random.Random, color: str, shape: str) -> ShapeObject:
        size = rng.randint(self.min_size, self.max_size)
        x0 = rng.randint(self.margin, self.canvas_size - self.margin - size)
        y0 = rng.randint(self.margin, self.canvas_size - self.margin - size)
        return ShapeObject(shape, color, x0 + size / 2, y0 + size / 2, size)

    def _try_layout(self, rng: random.Random, identities: list[tuple[str, str]]) -> Scene | None:
        placed: list[ShapeObject] = []
        for color, shape in identities:
            for _ in range(50):
                obj = self._random_object(rng, color, shape)
                if all(_boxes_apart(obj, other, self.gap) for other in placed):
                    placed.append(obj)
                    break
            else:
                return None
        return Scene(tuple(placed), self.canvas_size)

    def _layout(
        self, rng: random.Random, identities: list[tuple[str, str]], relation: str | None = None
    ) -> Scene:
        """Random non-overlapping layout of the objects (in order); with `relation`, object 0 lies
        clearly in that relation to object 1."""
        for _ in range(_MAX_TRIES):
            scene = self._try_layout(rng, identities)
            if scene is not None and (relation is None or _clearly(*scene.objects[:2], relation)):
                return scene
        raise RuntimeError(f"no layout of {identities} fits a {self.canvas_size}px canvas")

    def _scene_in_split(self, rng: random.Random, split: str, n_min: int, n_max: int, tag: str) -> Scene:
        """Random scene of n_min..n_max objects with distinct (colour, shape), hashing into `split`."""
        for _ in range(_MAX_TRIES):
            identities = rng.sample(IDENTITIES, rng.randint(n_min, n_max))
            scene = self._try_layout(rng, identities)
            if scene is not None and _hash_split(f"{tag}|{scene.key()}") == split:
                return scene
        raise RuntimeError(f"could not draw a {split} scene on a {self.canvas_size}px canvas")

    # ---- editing -------------------------------------------------------------------------------------

    def _edit(self, rng: random.Random, kind: str, split: str) -> EditSample:
        for _ in range(_MAX_TRIES):
            n_min, n_max = {"add": (1, 3), "remove": (2, 3)}.get(kind, (1, 3))
            source = self._scene_in_split(rng, split, n_min, n_max, "edit")
            sample = self._apply_edit(rng, kind, source)
            if sample is not None:
                return sample
        raise RuntimeError(f"could not draw a {kind} edit on a {self.canvas_size}px canvas")

    def _apply_edit(self, rng: random.Random, kind: str, source: Scene) -> EditSample | None:
        present = set(source.identities())
        i = rng.randrange(len(source.objects))
        old = source.objects[i]
        if kind == "add":
            new_identity = rng.choice([ident for ident in IDENTITIES if ident not in present])
            for _ in range(50):
                new = self._random_object(rng, *new_identity)
                if all(_boxes_apart(new, o, self.gap) for o in source.objects):
                    target = source.with_object(new)
                    phrases = text.add_instructions(new_identity)
                    return EditSample(kind, source, target, phrases[0], phrases, None, len(source.objects))
            return None
        if kind == "remove":
            phrases = text.remove_instructions(old.identity)
            return EditSample(kind, source, source.without(i), phrases[0], phrases, i, None)
        if kind == "recolor":
            options = [c for c in COLORS if (c, old.shape) not in present]
            new = ShapeObject(old.shape, rng.choice(options), old.cx, old.cy, old.size)
            phrases = text.recolor_instructions(old.identity, new.color)
        elif kind == "replace":
            options = [s for s in SHAPES if (old.color, s) not in present]
            if not options:
                return None
            new = ShapeObject(rng.choice(options), old.color, old.cx, old.cy, old.size)
            phrases = text.replace_instructions(old.identity, new.identity)
        else:
            moves = self._valid_moves(source, i)
            if not moves:
                return None
            direction, new = rng.choice(moves)
            phrases = text.move_instructions(old.identity, direction)
        return EditSample(kind, source, source.replaced(i, new), phrases[0], phrases, i, i)

    def _valid_moves(self, scene: Scene, i: int) -> list[tuple[str, ShapeObject]]:
        """Moves of object i by a quarter canvas that stay inside the margin and apart from the others."""
        old, d = scene.objects[i], self.move_distance
        moves = []
        for direction, (dx, dy) in {"left": (-d, 0), "right": (d, 0), "up": (0, -d), "down": (0, d)}.items():
            new = ShapeObject(old.shape, old.color, old.cx + dx, old.cy + dy, old.size)
            x0, y0, x1, y1 = new.bbox
            inside = min(x0, y0) >= self.margin and max(x1, y1) <= self.canvas_size - self.margin
            others = (o for j, o in enumerate(scene.objects) if j != i)
            if inside and all(_boxes_apart(new, o, self.gap) for o in others):
                moves.append((direction, new))
        return moves

    # ---- understanding -------------------------------------------------------------------------------

    def _vqa(self, rng: random.Random, category: str, split: str) -> VQASample:
        for _ in range(_MAX_TRIES):
            scene = self._scene_in_split(rng, split, 2, 4, "vqa")
            qa = self._question(rng, category, scene)
            if qa is not None:
                return VQASample(scene, qa[0], qa[1], category)
        raise RuntimeError(f"could not draw a {category} question on a {self.canvas_size}px canvas")

    def follow_up_questions(self, scene: Scene, n: int, key: str) -> list[tuple[str, str]]:
        """Up to `n` distinct short-answer (question, answer) pairs about `scene`, drawn deterministically
        from `key`: extra conversation turns that give an image's ViT tokens several answers to train on."""
        rng = random.Random(f"shapes|{self.seed}|follow-up|{key}")
        pairs: list[tuple[str, str]] = []
        for _ in range(_MAX_FOLLOW_UP_TRIES * n):
            if len(pairs) == n:
                break
            qa = self._question(rng, rng.choice(SHORT_ANSWER_CATEGORIES), scene)
            if qa is not None and qa not in pairs:
                pairs.append(qa)
        return pairs

    def _question(self, rng: random.Random, category: str, scene: Scene) -> tuple[str, str] | None:
        """(question, its single correct answer) about the scene, or None if the scene cannot pose it."""
        objects = scene.objects
        if category == "describe":
            return text.DESCRIBE_QUESTION, text.describe_scene(scene)
        if category == "count":
            if rng.random() < 0.5:
                shape = rng.choice(SHAPES)
                count = sum(o.shape == shape for o in objects)
                return text.shape_count_question(shape), text.NUMBER_WORDS[count]
            present = sorted({o.color for o in objects})
            color = rng.choice(present if rng.random() < 0.75 else COLORS)
            count = sum(o.color == color for o in objects)
            return text.color_count_question(color), text.NUMBER_WORDS[count]
        if category == "color":
            shape_counts = Counter(o.shape for o in objects)
            unique = [o for o in objects if shape_counts[o.shape] == 1]
            if not unique:
                return None
            o = rng.choice(unique)
            return text.color_question(o.shape), o.color
        if category == "shape":
            color_counts = Counter(o.color for o in objects)
            unique = [o for o in objects if color_counts[o.color] == 1]
            if not unique:
                return None
            o = rng.choice(unique)
            return text.shape_question(o.color), o.shape
        options = [
            (a, b, rel)
            for a in objects
            for b in objects
            if a is not b
            for rel in ("left", "right", "above", "below")
            if _separated(a, b, rel)
        ]
        if not options:
            return None
        a, b, rel = rng.choice(options)
        horizontal = rel in ("left", "right")
        return text.position_question(a.identity, b.identity, horizontal), rel


def _separated(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """`a` lies in `relation` of `b` with their boxes' projections on that axis disjoint."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    along = {"left": -dx, "right": dx, "above": -dy, "below": dy}[relation]
    return along >= (a.size + b.size) / 2
