"""Programmatic object detector for shapes-world images (the scorers' eyes).

Pipeline:
1. nearest-palette segmentation with a distance threshold; pixels far from every palette colour and
   from the background are "unknown";
2. 4-connected components per colour; components below a tiny area are specks;
3. each blob absorbs its soft edge: unknown / speck pixels within a thin halo that lie at least half-way
   from the background to its colour (anti-aliasing, mild blur, JPEG damage), so a generated image
   that is not pixel-perfect keeps its shapes;
4. the shape is the best IoU among the world's own templates
   (:func:`~hyperbagel.datamodules.shapes_scene.shape_mask`) fitted to the blob's box. Blobs too
   small, too elongated, fitting no template well, or whose soft edge is too wide per boundary pixel
   (a smear) are reported with shape "unknown";
5. unknown / speck pixels neither absorbed nor within the halo of a recognised object are "unexplained";
   more than a small budget of them makes the image unclean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from hyperbagel.datamodules.shapes_scene import (
    BACKGROUND,
    BACKGROUND_LABEL,
    COLORS,
    PALETTE,
    SHAPES,
    UNKNOWN_LABEL,
    shape_mask,
)

UNKNOWN_SHAPE = "unknown"
# Row i is the RGB of label i: 0 the background, then the palette in COLORS order.
_LABEL_RGB = np.array([BACKGROUND, *(PALETTE[c] for c in COLORS)], dtype=np.float32)


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds; sizes are fractions of the canvas side or area so one config serves 32-128 px."""

    color_threshold: float = 60.0  # max RGB distance to the nearest palette colour / background
    speck_fraction: float = 0.002  # components below this fraction of the canvas area are specks
    min_side_fraction: float = 0.12  # blobs narrower than this are not objects (palette objects are >= 0.18)
    max_aspect: float = 1.4  # world objects have square boxes
    min_iou: float = 0.8  # best template IoU needed to name a shape
    halo_fraction: float = 1 / 32  # width of an object's soft-edge zone (2 px at 64)
    max_matte_residual: float = 100.0  # edge pixels absorbed into an object must lie near its colour axis
    # A blob whose soft-edge pixels per boundary pixel exceed max(min_edge_width_limit,
    # max_edge_width_fraction * side) is a smear, not a shape (the floor spares JPEG edges on small canvases).
    max_edge_width_fraction: float = 0.04
    min_edge_width_limit: float = 2.0
    max_unexplained_fraction: float = 0.01  # of the canvas area, for a clean image


DEFAULT_CONFIG = DetectorConfig()


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str  # one of SHAPES or UNKNOWN_SHAPE
    centroid: tuple[float, float]  # (x, y) mean of pixel centres
    area: int  # pixels, absorbed soft edge included
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), exclusive x1, y1
    iou: float  # IoU with the named shape's template (best template if unknown)
    edge_width: float  # soft-edge pixels per boundary pixel (0 for an exact render)

    @property
    def identity(self) -> tuple[str, str]:
        return (self.color, self.shape)

    @property
    def center(self) -> tuple[float, float]:
        """Bounding-box centre, comparable to ShapeObject (cx, cy)."""
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2.0, (y0 + y1) / 2.0)


@dataclass(frozen=True)
class Detection:
    objects: tuple[DetectedObject, ...]
    labels: np.ndarray  # (H, W) int8: -1 unknown, 0 background, i palette colour COLORS[i - 1]
    unknown_pixels: int
    unexplained_pixels: int
    clean: bool  # unexplained pixels within the config's budget

    @property
    def all_recognised(self) -> bool:
        return all(o.shape != UNKNOWN_SHAPE for o in self.objects)


def to_rgb_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 view of a PIL image or an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a PIL image or an (H, W, 3) uint8 array, got {array.dtype} {array.shape}")
    return array


def segment(image: Image.Image | np.ndarray, config: DetectorConfig = DEFAULT_CONFIG) -> np.ndarray:
    """Per-pixel class: nearest of background / palette colours, or -1 if farther than the threshold."""
    rgb = to_rgb_array(image)
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2, as one small matmul instead of a (H, W, K, 3) broadcast.
    dist2 = (pixels**2).sum(1, keepdims=True) - 2.0 * pixels @ _LABEL_RGB.T + (_LABEL_RGB**2).sum(1)
    labels = dist2.argmin(1).astype(np.int8)
    labels[dist2.min(1) > config.color_threshold**2] = UNKNOWN_LABEL
    return labels.reshape(rgb.shape[:2])


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal positive labels: (H, W) int64 of a component id per pixel
    (the smallest flat index in the component), -1 on background and unknown pixels.

    Min-label propagation with pointer jumping, all in numpy (scipy is not a dependency)."""
    h, w = labels.shape
    fg = labels > 0
    sentinel = h * w
    comp = np.where(fg, np.arange(h * w).reshape(h, w), sentinel)
    right = fg[:, :-1] & (labels[:, :-1] == labels[:, 1:])
    down = fg[:-1, :] & (labels[:-1, :] == labels[1:, :])
    fg_flat = fg.ravel()
    while True:
        new = comp.copy()
        m = np.minimum(new[:, :-1], new[:, 1:])
        new[:, :-1] = np.where(right, np.minimum(new[:, :-1], m), new[:, :-1])
        new[:, 1:] = np.where(right, np.minimum(new[:, 1:], m), new[:, 1:])
        m = np.minimum(new[:-1, :], new[1:, :])
        new[:-1, :] = np.where(down, np.minimum(new[:-1, :], m), new[:-1, :])
        new[1:, :] = np.where(down, np.minimum(new[1:, :], m), new[1:, :])
        flat = new.ravel()
        for _ in range(2):  # pointer jumping: a pixel's id is a pixel of the same component
            flat[fg_flat] = flat[flat[fg_flat]]
        if np.array_equal(new, comp):
            break
        comp = new
    comp[~fg] = -1
    return comp


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a (2r+1)^2 square."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        for k in range(1, radius + 1):
            if axis == 0:
                out[k:, :] |= src[:-k, :]
                out[:-k, :] |= src[k:, :]
            else:
                out[:, k:] |= src[:, :-k]
                out[:, :-k] |= src[:, k:]
    return out


def classify_shape(
    blob: np.ndarray, canvas_side: int, config: DetectorConfig = DEFAULT_CONFIG
) -> tuple[str, float]:
    """(shape, IoU) of a blob cropped to its bounding box: the best-fitting template if it fits well."""
    h, w = blob.shape
    templates = [
        (float(np.logical_and(blob, t := shape_mask(s, w, h)).sum() / np.logical_or(blob, t).sum()), s)
        for s in SHAPES
    ]
    best_iou, best_shape = max(templates)
    too_small = min(h, w) < config.min_side_fraction * canvas_side
    if too_small or max(h, w) / min(h, w) > config.max_aspect or best_iou < config.min_iou:
        return UNKNOWN_SHAPE, best_iou
    return best_shape, best_iou


def _perimeter(mask: np.ndarray) -> int:
    """Pixels of the mask with a 4-neighbour outside it (or on the image border)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return int((mask & ~interior).sum())


def _soft_edge(
    rgb: np.ndarray, blob: np.ndarray, label: int, free: np.ndarray, halo: int, config: DetectorConfig
):
    """Free pixels within `halo` of the blob that lie at least half-way from the background to the blob's
    colour and near the line between them: its anti-aliased, blurred or JPEG-damaged edge."""
    near = dilate(blob, halo) & free
    background = _LABEL_RGB[BACKGROUND_LABEL]
    axis = _LABEL_RGB[label] - background
    offset = rgb[near].astype(np.float32) - background
    t = offset @ axis / float(axis @ axis)
    residual = np.linalg.norm(offset - t[:, None] * axis, axis=1)
    edge = np.zeros_like(near)
    edge[near] = (t >= 0.5) & (residual <= config.max_matte_residual)
    return edge


def detect(image: Image.Image | np.ndarray, config: DetectorConfig = DEFAULT_CONFIG) -> Detection:
    """Detect the coloured shapes of an image; see the module docstring for the rules."""
    rgb = to_rgb_array(image)
    labels = segment(rgb, config)
    h, w = labels.shape
    side = min(h, w)
    halo = max(1, round(config.halo_fraction * side))
    comp = connected_components(labels)
    fg = comp >= 0
    roots, inverse, counts = np.unique(comp[fg], return_inverse=True, return_counts=True)
    speck_area = max(2.0, config.speck_fraction * h * w)
    speck = np.zeros((h, w), dtype=bool)
    speck[fg] = counts[inverse] < speck_area
    # Pixels no object owns: unknown colours and specks. Each blob first absorbs its soft edge.
    free = (labels == UNKNOWN_LABEL) | speck
    blobs = []
    for root in roots[counts >= speck_area]:
        label = int(labels.flat[root])
        blob = comp == root
        edge = _soft_edge(rgb, blob, label, free, halo, config)
        free &= ~edge
        blobs.append((label, blob | edge, int(edge.sum())))
    max_edge_width = max(config.min_edge_width_limit, config.max_edge_width_fraction * side)
    known = np.zeros((h, w), dtype=bool)
    objects = []
    for label, mask, absorbed in blobs:
        ys, xs = np.nonzero(mask)
        x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        shape, iou = classify_shape(mask[y0:y1, x0:x1], side, config)
        # Soft-edge pixels inside (absorbed) and just outside (still free) per boundary pixel.
        edge_width = (absorbed + int((dilate(mask, halo) & free).sum())) / _perimeter(mask)
        if edge_width > max_edge_width:
            shape = UNKNOWN_SHAPE
        centroid = (float(xs.mean()) + 0.5, float(ys.mean()) + 0.5)
        objects.append(
            DetectedObject(COLORS[label - 1], shape, centroid, len(xs), (x0, y0, x1, y1), iou, edge_width)
        )
        if shape != UNKNOWN_SHAPE:
            known |= mask
    unexplained = int((free & ~dilate(known, halo)).sum())
    return Detection(
        objects=tuple(objects),
        labels=labels,
        unknown_pixels=int((labels == UNKNOWN_LABEL).sum()),
        unexplained_pixels=unexplained,
        clean=unexplained <= config.max_unexplained_fraction * h * w,
    )
