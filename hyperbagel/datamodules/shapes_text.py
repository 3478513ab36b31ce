"""Text of the shapes world: the closed vocabulary and every template that produces prompts,
instructions, questions and answers.

All text is lowercase with punctuation as separate space-delimited words, so a whitespace split is the
word tokenization and joining with single spaces inverts it exactly (:func:`words`, :func:`detokenize`).
"""

from __future__ import annotations

from collections import Counter

from hyperbagel.datamodules.shapes_scene import (
    COLORS,
    SHAPES,
    Scene,
    ShapeObject,
    dominant_relation,
    grid_location,
)

NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")
PUNCTUATION: tuple[str, ...] = (".", "?", ",", ":")
# Prompt phrase for "A <relation> B" in text-to-image prompts and descriptions.
RELATION_PHRASES: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
MOVE_PHRASES: dict[str, str] = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}
# Names of the 3x3 grid cells, indexed by (row, col) from grid_location.
LOCATION_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left",
    (0, 1): "top",
    (0, 2): "top right",
    (1, 0): "left",
    (1, 1): "center",
    (1, 2): "right",
    (2, 0): "bottom left",
    (2, 1): "bottom",
    (2, 2): "bottom right",
}
DESCRIBE_QUESTION = "describe the image ."
_TEMPLATE_WORDS = (
    "a an and the to of above below left right up down top bottom center colored color shape object objects "
    "make change turn add draw put in image remove delete erase move shift replace with into "
    "what is how many are there or describe at"
).split()


def world_vocabulary() -> list[str]:
    """Every word any world text can contain (punctuation included), sorted for stable token ids."""
    return sorted(
        set(_TEMPLATE_WORDS)
        | set(COLORS)
        | set(SHAPES)
        | {plural(s) for s in SHAPES}
        | set(NUMBER_WORDS)
        | set(PUNCTUATION)
    )


def words(text: str) -> list[str]:
    """Split world text into its words (whitespace tokenization)."""
    return text.split()


def detokenize(tokens: list[str]) -> str:
    """Inverse of :func:`words` for world text."""
    return " ".join(tokens)


def plural(shape: str) -> str:
    return shape + "s"


def indefinite(color: str, shape: str) -> str:
    """'a red circle' / 'an orange square'."""
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


def definite(color: str, shape: str) -> str:
    return f"the {color} {shape}"


def count_phrase(count: int, color: str, shape: str) -> str:
    """'three green triangles' (counts written as words)."""
    return f"{NUMBER_WORDS[count]} {color} {shape if count == 1 else plural(shape)}"


def join_list(items: list[str]) -> str:
    """'x', 'x and y', 'x , y and z'."""
    if len(items) <= 2:
        return " and ".join(items)
    return " , ".join(items[:-1]) + " and " + items[-1]


# ---- text-to-image prompts ------------------------------------------------------------------------------


def single_object_prompt(color: str, shape: str) -> str:
    return indefinite(color, shape)


def colors_prompt(color: str, shape: str) -> str:
    """GenEval's colours category: phrased with the colour last so it differs from single-object text."""
    return f"a {shape} colored {color}"


def pair_prompt(first: tuple[str, str], second: tuple[str, str]) -> str:
    return f"{indefinite(*first)} and {indefinite(*second)}"


def counting_prompt(count: int, color: str, shape: str) -> str:
    return count_phrase(count, color, shape)


def position_prompt(first: tuple[str, str], relation: str, second: tuple[str, str]) -> str:
    return f"{indefinite(*first)} {RELATION_PHRASES[relation]} {indefinite(*second)}"


# ---- editing instructions (first phrasing is the canonical one) -----------------------------------------


def recolor_instructions(old: tuple[str, str], new_color: str) -> tuple[str, ...]:
    the = definite(*old)
    return (f"make {the} {new_color}", f"change the color of {the} to {new_color}", f"turn {the} {new_color}")


def add_instructions(new: tuple[str, str]) -> tuple[str, ...]:
    a = indefinite(*new)
    return (f"add {a}", f"draw {a}", f"put {a} in the image")


def remove_instructions(old: tuple[str, str]) -> tuple[str, ...]:
    the = definite(*old)
    return (f"remove {the}", f"delete {the}", f"erase {the}")


def move_instructions(old: tuple[str, str], direction: str) -> tuple[str, ...]:
    the, where = definite(*old), MOVE_PHRASES[direction]
    return (f"move {the} {where}", f"shift {the} {where}")


def replace_instructions(old: tuple[str, str], new: tuple[str, str]) -> tuple[str, ...]:
    the, a = definite(*old), indefinite(*new)
    return (f"replace {the} with {a}", f"turn {the} into {a}", f"change {the} into {a}")


# ---- understanding ----------------------------------------------------------------------------------------


def color_question(shape: str) -> str:
    return f"what color is the {shape} ?"


def shape_count_question(shape: str) -> str:
    return f"how many {plural(shape)} are there ?"


def color_count_question(color: str) -> str:
    return f"how many {color} objects are there ?"


def shape_question(color: str) -> str:
    return f"what shape is the {color} object ?"


def position_question(first: tuple[str, str], second: tuple[str, str], horizontal: bool) -> str:
    options = "left or right" if horizontal else "above or below"
    return f"is {definite(*first)} {options} of {definite(*second)} ?"


def _reading_order(scene: Scene) -> list[ShapeObject]:
    """Objects top band to bottom band (3x3 grid rows), left to right within a band."""
    return sorted(scene.objects, key=lambda o: (grid_location(o.cx, o.cy, scene.canvas_size)[0], o.cx, o.cy))


def describe_scene(scene: Scene) -> str:
    """Deterministic multi-sentence description: an overview with counts per shape, one sentence per
    object (colour, shape, grid location) in reading order, then the relation of each object to the
    next one in reading order (only between objects whose colour and shape are unique in the scene)."""
    objects = _reading_order(scene)
    n = len(objects)
    shape_counts = Counter(o.shape for o in objects)
    per_shape = [f"{NUMBER_WORDS[c]} {s if c == 1 else plural(s)}" for s in SHAPES if (c := shape_counts[s])]
    if n == 1:
        sentences = [f"there is one object : {per_shape[0]} ."]
    elif n == 0:
        sentences = ["there are zero objects ."]
    else:
        sentences = [f"there are {NUMBER_WORDS[n]} objects : {join_list(per_shape)} ."]
    for o in objects:
        where = LOCATION_NAMES[grid_location(o.cx, o.cy, scene.canvas_size)]
        sentences.append(f"there is {indefinite(o.color, o.shape)} at the {where} .")
    identity_counts = Counter(o.identity for o in objects)
    for a, b in zip(objects, objects[1:], strict=False):
        if identity_counts[a.identity] == 1 and identity_counts[b.identity] == 1:
            relation = RELATION_PHRASES[dominant_relation(a, b)]
            sentences.append(f"{definite(*a.identity)} is {relation} {definite(*b.identity)} .")
    return " ".join(sentences)


def described_question(scene: Scene, question: str) -> str:
    """`question` asked about the scene's written description instead of its image: the text-only
    understanding rows the exporter writes (`vqa_text`) and the probes' reading test share this form."""
    return f"{describe_scene(scene)}\n{question}"
