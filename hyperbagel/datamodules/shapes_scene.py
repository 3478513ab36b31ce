"""Scene model and exact renderer of the built-in shapes world.

A scene is a list of flat-coloured shapes on a flat background. Rendering is pixel-exact (no
antialiasing): every pixel is either the background colour or one palette colour, so a scorer can
recover the ground truth from an image and an exact render is a perfect reference. Shape masks are
defined on pixel centres by one function, :func:`shape_mask`, which the detector reuses as its
templates, so an exact render matches its template with IoU 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated colours at least ~100 apart in RGB, all far from the white background, so nearest-colour
# segmentation is unambiguous and blends with the background (blur, JPEG edges) fall in no class.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 35),
    "green": (35, 165, 45),
    "blue": (30, 70, 220),
    "yellow": (245, 225, 30),
    "purple": (135, 45, 195),
    "orange": (245, 125, 10),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
IDENTITIES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
BACKGROUND_LABEL = 0
UNKNOWN_LABEL = -1


def color_label(color: str) -> int:
    """Integer class of a palette colour in label maps (0 is the background)."""
    return COLORS.index(color) + 1


@lru_cache(maxsize=4096)
def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean (height, width) mask of `shape` filling a width x height box, sampled at pixel centres.

    Circle: the inscribed ellipse. Square: the full box. Triangle: upright isosceles, apex at the top
    centre, base on the bottom row; row r has half-width (r + 1) / height * width / 2 so both the apex
    row and the base row are non-empty and the mask spans the whole box. The result is cached and
    read-only.
    """
    if width < 1 or height < 1:
        raise ValueError(f"shape box must be at least 1x1, got {width}x{height}")
    u = np.arange(width, dtype=np.float64) + 0.5 - width / 2.0
    v = np.arange(height, dtype=np.float64) + 0.5 - height / 2.0
    eps = 1e-9
    if shape == "square":
        mask = np.ones((height, width), dtype=bool)
    elif shape == "circle":
        mask = (u[None, :] / (width / 2.0)) ** 2 + (v[:, None] / (height / 2.0)) ** 2 <= 1.0 + eps
    elif shape == "triangle":
        half_width = (np.arange(height, dtype=np.float64) + 1.0) / height * (width / 2.0)
        mask = np.abs(u)[None, :] <= half_width[:, None] + eps
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    mask.setflags(write=False)
    return mask


@dataclass(frozen=True)
class ShapeObject:
    """One shape: `size` pixels wide and high, centred on (cx, cy) in pixel coordinates.

    The box is [cx - size/2, cx + size/2) x [cy - size/2, cy + size/2); generators keep its corners on
    integer pixels.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in PALETTE:
            raise ValueError(f"unknown color {self.color!r}; expected one of {COLORS}")
        if self.size < 1:
            raise ValueError(f"size must be positive, got {self.size}")

    @property
    def identity(self) -> tuple[str, str]:
        """(color, shape): what a prompt or an instruction names."""
        return (self.color, self.shape)

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) with exclusive x1, y1."""
        x0 = int(round(self.cx - self.size / 2.0))
        y0 = int(round(self.cy - self.size / 2.0))
        return (x0, y0, x0 + self.size, y0 + self.size)


@dataclass(frozen=True)
class Scene:
    """Objects on a square canvas; objects never overlap in scenes produced by the world."""

    objects: tuple[ShapeObject, ...]
    canvas_size: int

    def key(self) -> str:
        """Canonical text of the scene (object order ignored), used for stable split hashing."""
        items = sorted(f"{o.color}:{o.shape}:{o.cx:g}:{o.cy:g}:{o.size}" for o in self.objects)
        return f"{self.canvas_size}|" + ";".join(items)

    def identities(self) -> list[tuple[str, str]]:
        return [o.identity for o in self.objects]

    def with_object(self, obj: ShapeObject) -> Scene:
        return replace(self, objects=(*self.objects, obj))

    def without(self, index: int) -> Scene:
        return replace(self, objects=self.objects[:index] + self.objects[index + 1 :])

    def replaced(self, index: int, obj: ShapeObject) -> Scene:
        return replace(self, objects=self.objects[:index] + (obj,) + self.objects[index + 1 :])

    def to_json(self) -> str:
        objects = [
            {"shape": o.shape, "color": o.color, "cx": o.cx, "cy": o.cy, "size": o.size} for o in self.objects
        ]
        return json.dumps({"canvas_size": self.canvas_size, "objects": objects})

    @classmethod
    def from_json(cls, text: str) -> Scene:
        data = json.loads(text)
        return cls(tuple(ShapeObject(**o) for o in data["objects"]), int(data["canvas_size"]))


def _paint(canvas: np.ndarray, obj: ShapeObject, value: np.ndarray | int) -> None:
    """Write `value` into the object's pixels, clipping its box to the canvas."""
    x0, y0, x1, y1 = obj.bbox
    mask = shape_mask(obj.shape, obj.size, obj.size)
    h, w = canvas.shape[:2]
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if cx0 >= cx1 or cy0 >= cy1:
        return
    sub = mask[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]
    canvas[cy0:cy1, cx0:cx1][sub] = value


def render_array(scene: Scene) -> np.ndarray:
    """(S, S, 3) uint8 exact render; later objects are painted over earlier ones."""
    s = scene.canvas_size
    canvas = np.empty((s, s, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        _paint(canvas, obj, np.asarray(PALETTE[obj.color], dtype=np.uint8))
    return canvas


def render(scene: Scene) -> Image.Image:
    """Exact RGB render of the scene."""
    return Image.fromarray(render_array(scene))


def label_map(scene: Scene) -> np.ndarray:
    """(S, S) int8 class map of the exact render: 0 background, 1.. palette colours (see color_label)."""
    s = scene.canvas_size
    labels = np.zeros((s, s), dtype=np.int8)
    for obj in scene.objects:
        _paint(labels, obj, color_label(obj.color))
    return labels


def identity_map(scene: Scene) -> np.ndarray:
    """(S, S) int8 map of which object identity covers each pixel: 0 background, 1 + the index of the
    object's (colour, shape) in IDENTITIES (what the vision encoder learns to see)."""
    s = scene.canvas_size
    labels = np.zeros((s, s), dtype=np.int8)
    for obj in scene.objects:
        _paint(labels, obj, 1 + IDENTITIES.index(obj.identity))
    return labels


def grid_location(cx: float, cy: float, canvas_size: int) -> tuple[int, int]:
    """(row, col) of a point in the canvas' 3x3 grid; each index is 0, 1 or 2."""
    third = canvas_size / 3.0
    return (min(int(cy // third), 2), min(int(cx // third), 2))


def dominant_relation(a: ShapeObject, b: ShapeObject) -> str:
    """Where `a` lies relative to `b` ("left", "right", "above", "below") along the axis of larger
    centre offset; ties go to the horizontal axis so the answer is always defined."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"
