"""Procedural images of shape-objects on textured backgrounds, with exact boxes.

Why: the pipeline (classifier -> CAM pseudo-boxes -> detector pre-training ->
few-shot fine-tuning) needs data whose ground-truth boxes are known exactly, so
that the quality of CAM-mined boxes can be measured, and it needs to run in
seconds without downloads.  Each object class is a distinct visual concept,
recognisable by its shape *and* its appearance (colour family or texture), with
random jitter in hue, brightness, size, aspect and rotation; backgrounds are
textured (smooth colour fields, mottling, low-contrast stripes, amoeba-like
clutter blobs) so that localisation is not trivial.

Two disjoint class sets mirror the ImageNet -> VOC setting: ``"pretrain"``
classes for classifier / detector pre-training and ``"downstream"`` classes for
few-shot fine-tuning.

Box convention: xyxy in absolute pixels, continuous; an object whose mask
covers columns ``j0..j1`` (inclusive) has ``x1 = j0`` and ``x2 = j1 + 1``.
Boxes are computed from the drawn mask, never from nominal shape parameters.

Only numpy and Pillow are used; a 128x128 scene renders in about a millisecond.
Everything is deterministic given the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from PIL import Image

__all__ = [
    "PRETRAIN_CLASSES",
    "DOWNSTREAM_CLASSES",
    "ClassDesign",
    "ColourFamily",
    "class_names",
    "num_classes",
    "render_scene",
    "classification_sample",
    "detection_sample",
    "write_preview_grid",
    "TagNoise",
    "NoisyTags",
    "HashtagDataset",
    "hashtag_vocabulary",
    "noisy_tags",
    "hashtag_sample",
    "write_hashtag_dataset",
    "hashtag_view",
]

# --------------------------------------------------------------------------- #
# Colour helpers
# --------------------------------------------------------------------------- #


def _hsv_to_rgb(hue: np.ndarray, sat: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Vectorised HSV (all in [0, 1]) -> RGB in [0, 255], shape ``(..., 3)``."""
    hue = np.asarray(hue, dtype=np.float64) % 1.0
    sat = np.asarray(sat, dtype=np.float64)
    val = np.asarray(val, dtype=np.float64)
    sector = np.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    p = val * (1.0 - sat)
    q = val * (1.0 - sat * frac)
    t = val * (1.0 - sat * (1.0 - frac))
    sector = sector.astype(np.int64) % 6
    red = np.choose(sector, [val, q, p, p, t, val])
    green = np.choose(sector, [t, val, val, q, p, p])
    blue = np.choose(sector, [p, p, t, val, val, q])
    return np.stack([red, green, blue], axis=-1) * 255.0


@dataclass(frozen=True)
class ColourFamily:
    """A colour family: HSV centre; ``hue=None`` means achromatic (grey levels)."""

    hue: float | None
    sat: float
    val: float

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One jittered RGB colour (float, 0..255) from this family."""
        if self.hue is None:
            hue = rng.random()
            sat = rng.uniform(0.0, 0.08)
        else:
            hue = self.hue + rng.uniform(-0.03, 0.03)
            sat = float(np.clip(self.sat + rng.uniform(-0.15, 0.1), 0.0, 1.0))
        val = float(np.clip(self.val + rng.uniform(-0.18, 0.1), 0.05, 1.0))
        return _hsv_to_rgb(np.array(hue), np.array(sat), np.array(val))


# --------------------------------------------------------------------------- #
# Shapes: implicit masks in object-local unit coordinates u, v in [-1, 1]
# (u to the right, v downwards).  Every shape stays inside the unit box.
# --------------------------------------------------------------------------- #

ShapeFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _inside_polygon(u: np.ndarray, v: np.ndarray, vertices: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over pixels (handles concave polygons)."""
    inside = np.zeros(u.shape, dtype=bool)
    count = len(vertices)
    for index in range(count):
        xa, ya = vertices[index]
        xb, yb = vertices[(index + 1) % count]
        if ya == yb:
            continue
        straddles = (ya > v) != (yb > v)
        crossing_x = xa + (v - ya) * (xb - xa) / (yb - ya)
        inside ^= straddles & (u < crossing_x)
    return inside


def _regular_polygon(sides: int, phase: float = 0.0) -> list[tuple[float, float]]:
    angles = phase + 2.0 * np.pi * np.arange(sides) / sides
    return [(float(np.cos(a)), float(np.sin(a))) for a in angles]


def _shape_disc(u, v, rng):
    return u * u + v * v <= 1.0


def _shape_box(u, v, rng):
    return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)


def _shape_triangle(u, v, rng):
    return _inside_polygon(u, v, [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])


def _shape_ring(u, v, rng):
    inner = rng.uniform(0.45, 0.62)
    radius_sq = u * u + v * v
    return (radius_sq <= 1.0) & (radius_sq >= inner * inner)


def _shape_plus(u, v, rng):
    half_arm = rng.uniform(0.26, 0.36)
    return ((np.abs(u) <= half_arm) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= half_arm) & (np.abs(u) <= 1.0))


def _shape_star(u, v, rng):
    inner = rng.uniform(0.38, 0.48)
    angles = -np.pi / 2 + np.pi * np.arange(10) / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, inner)
    return _inside_polygon(u, v, list(zip(radii * np.cos(angles), radii * np.sin(angles))))


def _shape_hexagon(u, v, rng):
    return _inside_polygon(u, v, _regular_polygon(6))


def _shape_octagon(u, v, rng):
    return _inside_polygon(u, v, _regular_polygon(8, np.pi / 8))


def _shape_diamond(u, v, rng):
    return np.abs(u) + np.abs(v) <= 1.0


def _shape_crescent(u, v, rng):
    shift = rng.uniform(0.38, 0.55)
    bite_radius = rng.uniform(0.8, 0.9)
    outer = u * u + v * v <= 1.0
    bite = (u - shift) ** 2 + (v + 0.12) ** 2 <= bite_radius**2
    return outer & ~bite


def _shape_arrow(u, v, rng):
    shaft = rng.uniform(0.18, 0.26)
    neck = rng.uniform(0.05, 0.3)
    return _inside_polygon(
        u, v,
        [(-1.0, -shaft), (neck, -shaft), (neck, -0.7), (1.0, 0.0), (neck, 0.7), (neck, shaft), (-1.0, shaft)],
    )


def _shape_hourglass(u, v, rng):
    waist = rng.uniform(0.1, 0.2)
    return _inside_polygon(u, v, [(-1.0, -1.0), (1.0, -1.0), (waist, 0.0), (1.0, 1.0), (-1.0, 1.0), (-waist, 0.0)])


def _shape_heart(u, v, rng):
    x = 1.14 * u
    y = 0.125 - 1.125 * v
    return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0


def _shape_gear(u, v, rng):
    teeth = int(rng.integers(7, 10))
    radius = np.sqrt(u * u + v * v)
    angle = np.arctan2(v, u)
    outline = np.where(np.cos(teeth * angle) > 0.0, 1.0, 0.76)
    hole = rng.uniform(0.2, 0.3)
    return (radius <= outline) & (radius >= hole)


def _shape_x_cross(u, v, rng):
    half_arm = rng.uniform(0.2, 0.28)
    along = (u + v) / math.sqrt(2.0)
    across = (v - u) / math.sqrt(2.0)
    arms = (np.abs(along) <= half_arm) | (np.abs(across) <= half_arm)
    return arms & (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)


def _shape_frame(u, v, rng):
    inner = rng.uniform(0.55, 0.7)
    outer = (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    return outer & ~((np.abs(u) < inner) & (np.abs(v) < inner))


def _shape_half_disc(u, v, rng):
    height = (v + 1.0) / 2.0  # flat edge at v = -1, round edge at v = +1 (aspect ~2 makes it a true half disc)
    return (u * u + height * height <= 1.0) & (height >= 0.0)


def _shape_trapezoid(u, v, rng):
    top = rng.uniform(0.35, 0.55)
    return _inside_polygon(u, v, [(-top, -1.0), (top, -1.0), (1.0, 1.0), (-1.0, 1.0)])


def _shape_l_block(u, v, rng):
    return _inside_polygon(u, v, [(-1.0, -1.0), (-0.3, -1.0), (-0.3, 0.35), (1.0, 0.35), (1.0, 1.0), (-1.0, 1.0)])


def _shape_t_block(u, v, rng):
    return _inside_polygon(
        u, v, [(-1.0, -1.0), (1.0, -1.0), (1.0, -0.4), (0.3, -0.4), (0.3, 1.0), (-0.3, 1.0), (-0.3, -0.4), (-1.0, -0.4)]
    )


def _shape_lightning_bolt(u, v, rng):
    return _inside_polygon(
        u, v, [(-0.1, -1.0), (1.0, -1.0), (0.2, -0.2), (0.94, -0.2), (-0.94, 1.0), (-0.26, 0.12), (-1.0, 0.12)]
    )


# --------------------------------------------------------------------------- #
# Class catalogue
# --------------------------------------------------------------------------- #

FILL_STYLES = ("solid", "stripes", "checker", "dots", "radial", "speckle", "outlined")


@dataclass(frozen=True)
class ClassDesign:
    """One object class: a shape plus a characteristic fill, with jitter ranges.

    ``aspect_range`` is width/height of the unit box before rotation (log-uniform);
    the rotation is ``rotation_centre +- rotation_spread`` radians, kept small for
    classes whose identity depends on orientation (square vs diamond, + vs x).
    """

    name: str
    shape: ShapeFn
    fill: str
    primary: ColourFamily
    secondary: ColourFamily | None = None
    aspect_range: tuple[float, float] = (0.9, 1.1)
    rotation_centre: float = 0.0
    rotation_spread: float = math.pi
    pattern_cycles: tuple[float, float] = (3.0, 5.0)


_RED = ColourFamily(0.0, 0.9, 0.85)
_DARK_RED = ColourFamily(0.98, 0.85, 0.5)
_ORANGE = ColourFamily(0.07, 0.95, 0.95)
_YELLOW = ColourFamily(0.15, 0.9, 0.95)
_PALE_YELLOW = ColourFamily(0.14, 0.35, 0.97)
_LIME = ColourFamily(0.24, 0.85, 0.85)
_GREEN = ColourFamily(0.33, 0.8, 0.7)
_TEAL = ColourFamily(0.46, 0.85, 0.6)
_CYAN = ColourFamily(0.5, 0.8, 0.9)
_SKY = ColourFamily(0.57, 0.55, 0.95)
_BLUE = ColourFamily(0.63, 0.85, 0.8)
_PURPLE = ColourFamily(0.77, 0.7, 0.7)
_MAGENTA = ColourFamily(0.86, 0.8, 0.85)
_PINK = ColourFamily(0.94, 0.45, 0.97)
_BROWN = ColourFamily(0.07, 0.7, 0.5)
_STEEL = ColourFamily(0.58, 0.18, 0.7)
_WHITE = ColourFamily(None, 0.0, 0.98)
_BLACK = ColourFamily(None, 0.0, 0.15)

_SQUARE_TILT = math.radians(12)

_PRETRAIN_DESIGNS: tuple[ClassDesign, ...] = (
    ClassDesign("disc", _shape_disc, "solid", _RED),
    ClassDesign("square", _shape_box, "solid", _BLUE, rotation_spread=_SQUARE_TILT),
    ClassDesign("triangle", _shape_triangle, "solid", _GREEN, aspect_range=(0.9, 1.25)),
    ClassDesign("ring", _shape_ring, "solid", _ORANGE),
    ClassDesign("plus", _shape_plus, "solid", _CYAN, rotation_spread=_SQUARE_TILT),
    ClassDesign("star", _shape_star, "solid", _YELLOW),
    ClassDesign("ellipse", _shape_disc, "radial", _PURPLE, _PINK, aspect_range=(1.6, 2.3)),
    ClassDesign("hexagon", _shape_hexagon, "dots", _TEAL, _WHITE, pattern_cycles=(3.0, 4.0)),
    ClassDesign("diamond", _shape_diamond, "stripes", _MAGENTA, _WHITE, aspect_range=(0.55, 0.75),
                rotation_spread=_SQUARE_TILT),
    ClassDesign("crescent", _shape_crescent, "solid", _PALE_YELLOW),
    ClassDesign("arrow", _shape_arrow, "outlined", _SKY, _BLACK, aspect_range=(1.3, 1.7)),
    ClassDesign("hourglass", _shape_hourglass, "speckle", _BROWN, aspect_range=(0.7, 0.9),
                rotation_spread=math.radians(20)),
    ClassDesign("striped_rectangle", _shape_box, "stripes", _RED, _WHITE, aspect_range=(1.7, 2.4),
                pattern_cycles=(5.0, 7.0)),
    ClassDesign("checkered_square", _shape_box, "checker", _BLACK, _WHITE, rotation_spread=_SQUARE_TILT,
                pattern_cycles=(4.0, 5.0)),
    ClassDesign("heart", _shape_heart, "solid", _PINK, rotation_spread=math.radians(20)),
    ClassDesign("gear", _shape_gear, "speckle", _STEEL),
)

_DOWNSTREAM_DESIGNS: tuple[ClassDesign, ...] = (
    ClassDesign("x_cross", _shape_x_cross, "solid", _DARK_RED, rotation_spread=_SQUARE_TILT),
    ClassDesign("frame", _shape_frame, "stripes", _YELLOW, _BLACK, rotation_spread=_SQUARE_TILT,
                pattern_cycles=(6.0, 8.0)),
    ClassDesign("half_disc", _shape_half_disc, "radial", _YELLOW, _RED, aspect_range=(1.8, 2.2)),
    ClassDesign("trapezoid", _shape_trapezoid, "dots", _PURPLE, _YELLOW, aspect_range=(1.1, 1.5),
                pattern_cycles=(3.0, 4.0)),
    ClassDesign("l_block", _shape_l_block, "checker", _CYAN, _WHITE, pattern_cycles=(4.0, 6.0)),
    ClassDesign("t_block", _shape_t_block, "solid", _LIME),
    ClassDesign("octagon", _shape_octagon, "outlined", _RED, _WHITE),
    ClassDesign("lightning_bolt", _shape_lightning_bolt, "outlined", _YELLOW, _BLACK, aspect_range=(0.5, 0.62),
                rotation_spread=math.radians(30)),
)

_DESIGNS_BY_KIND: dict[str, tuple[ClassDesign, ...]] = {
    "pretrain": _PRETRAIN_DESIGNS,
    "downstream": _DOWNSTREAM_DESIGNS,
}

PRETRAIN_CLASSES: tuple[str, ...] = tuple(design.name for design in _PRETRAIN_DESIGNS)
DOWNSTREAM_CLASSES: tuple[str, ...] = tuple(design.name for design in _DOWNSTREAM_DESIGNS)


def _designs(kind: str) -> tuple[ClassDesign, ...]:
    try:
        return _DESIGNS_BY_KIND[kind]
    except KeyError:
        raise ValueError(f"kind must be one of {sorted(_DESIGNS_BY_KIND)}, got {kind!r}") from None


def class_names(kind: str) -> list[str]:
    """Class names of ``kind`` ("pretrain" or "downstream"); labels index into this list."""
    return [design.name for design in _designs(kind)]


def num_classes(kind: str) -> int:
    """Number of classes of ``kind``."""
    return len(_designs(kind))


# --------------------------------------------------------------------------- #
# Object rendering
# --------------------------------------------------------------------------- #


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 4-neighbour cross, ``steps`` times (pixels outside count as empty)."""
    eroded = mask
    for _ in range(steps):
        padded = np.pad(eroded, 1, constant_values=False)
        eroded = (
            eroded & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
        )
    return eroded


def _fill_object(
    rng: np.random.Generator,
    design: ClassDesign,
    u: np.ndarray,
    v: np.ndarray,
    mask: np.ndarray,
    size_px: float,
) -> np.ndarray:
    """RGB float image (0..255) of the object's appearance on its local canvas."""
    primary = design.primary.sample(rng)
    secondary = design.secondary.sample(rng) if design.secondary is not None else primary * 0.5
    cycles = rng.uniform(*design.pattern_cycles)
    style = design.fill

    if style == "solid":
        rgb = np.broadcast_to(primary, u.shape + (3,)).copy()
    elif style == "stripes":
        phase = rng.uniform(0.0, 2.0 * np.pi)
        band = np.sin(np.pi * cycles * u + phase) > 0.0
        rgb = np.where(band[..., None], primary, secondary)
    elif style == "checker":
        cells = np.floor((u + 1.0) * cycles / 2.0) + np.floor((v + 1.0) * cycles / 2.0)
        rgb = np.where((cells % 2 == 0)[..., None], primary, secondary)
    elif style == "dots":
        cell_u = (u + 1.0) * cycles / 2.0 % 1.0 - 0.5
        cell_v = (v + 1.0) * cycles / 2.0 % 1.0 - 0.5
        dot = cell_u * cell_u + cell_v * cell_v <= rng.uniform(0.22, 0.3) ** 2
        rgb = np.where(dot[..., None], secondary, primary)
    elif style == "radial":
        blend = np.clip(np.sqrt(u * u + v * v), 0.0, 1.0)[..., None]
        rgb = secondary * (1.0 - blend) + primary * blend
    elif style == "speckle":
        grain = rng.normal(1.0, 0.22, size=u.shape)[..., None]
        rgb = primary * grain
    elif style == "outlined":
        thickness = max(1, int(round(size_px / rng.uniform(13.0, 17.0))))
        border = mask & ~_erode(mask, thickness)
        rgb = np.where(border[..., None], secondary, primary)
    else:  # pragma: no cover - guarded by the catalogue
        raise ValueError(f"unknown fill style {style!r}")

    # Gentle directional shading so objects are not perfectly flat.
    light_u, light_v = rng.uniform(-0.12, 0.12, size=2)
    shading = 1.0 + light_u * u + light_v * v
    return rgb * shading[..., None]


def _rasterise_shape(
    design: ClassDesign, shape_seed: int, half_w: float, half_h: float, angle: float, canvas: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate the shape on a ``canvas x canvas`` pixel grid centred on the object.

    Returns local unit coordinates ``u, v`` of every pixel centre and the mask.
    The shape's own random parameters come from ``shape_seed`` so that
    re-rasterising at another scale draws the same instance.
    """
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    offsets = np.arange(canvas, dtype=np.float64) + 0.5 - canvas / 2.0
    dx, dy = offsets[None, :], offsets[:, None]
    u = (cos_a * dx + sin_a * dy) / half_w
    v = (-sin_a * dx + cos_a * dy) / half_h
    mask = np.asarray(design.shape(u, v, np.random.default_rng(shape_seed)), dtype=bool)
    return u, v, np.broadcast_to(mask, u.shape)


def _tight_crop(mask: np.ndarray) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _draw_object(
    rng: np.random.Generator, design: ClassDesign, size_px: float
) -> tuple[np.ndarray, np.ndarray]:
    """Render one object instance, cropped to its tight extent.

    The object is scaled so that the longer side of its drawn extent is close
    to ``size_px`` and never above ``ceil(size_px)``: a first pass fits the
    rotated unit box (always safe, but conservative for round or rotated
    shapes), a second pass rescales by the measured extent.

    Returns ``(mask, rgb)``: ``mask`` is a boolean ``(h, w)`` array whose first/last
    rows and columns each contain at least one True pixel (so the crop *is* the
    tight box), ``rgb`` the float32 ``(h, w, 3)`` appearance (meaningful under
    the mask).
    """
    size_px = max(float(size_px), 2.0)
    limit = int(math.ceil(size_px))
    aspect = math.exp(rng.uniform(*np.log(design.aspect_range)))
    angle = design.rotation_centre + rng.uniform(-design.rotation_spread, design.rotation_spread)
    shape_seed = int(rng.integers(0, 2**63 - 1))

    unit_half_w, unit_half_h = math.sqrt(aspect), 1.0 / math.sqrt(aspect)
    unit_extent = max(  # half side of the square bounding the rotated unit box
        unit_half_w * abs(math.cos(angle)) + unit_half_h * abs(math.sin(angle)),
        unit_half_w * abs(math.sin(angle)) + unit_half_h * abs(math.cos(angle)),
    )
    scale = (size_px / 2.0) / unit_extent
    u, v, mask = _rasterise_shape(design, shape_seed, unit_half_w * scale, unit_half_h * scale, angle, limit)

    if mask.any():
        crop = _tight_crop(mask)
        measured = max(crop[0].stop - crop[0].start, crop[1].stop - crop[1].start)
        # Margin for pixel quantisation; thin parts missed at small sizes can
        # still overshoot, in which case the safe first pass is kept.
        ratio = (limit - 1) / (measured + 1)
        if ratio > 1.0:
            scale *= ratio
            canvas = int(math.ceil(2.0 * unit_extent * scale)) + 2
            rescaled = _rasterise_shape(design, shape_seed, unit_half_w * scale, unit_half_h * scale, angle, canvas)
            rescaled_crop = _tight_crop(rescaled[2]) if rescaled[2].any() else None
            if rescaled_crop is not None and max(
                rescaled_crop[0].stop - rescaled_crop[0].start, rescaled_crop[1].stop - rescaled_crop[1].start
            ) <= limit:
                u, v, mask = rescaled
    if not mask.any():  # degenerate tiny object: keep the centre pixel
        mask = np.zeros(u.shape, dtype=bool)
        mask[u.shape[0] // 2, u.shape[1] // 2] = True

    crop = _tight_crop(mask)
    mask = mask[crop].copy()
    rgb = _fill_object(rng, design, u[crop], v[crop], mask, size_px)
    return mask, rgb.astype(np.float32)


# --------------------------------------------------------------------------- #
# Backgrounds
# --------------------------------------------------------------------------- #


def _smooth_field(rng: np.random.Generator, grid_hw: tuple[int, int], size_hw: tuple[int, int]) -> np.ndarray:
    """Uniform random values on a coarse grid, bicubically upsampled to ``size_hw`` (float32)."""
    coarse = rng.random(grid_hw, dtype=np.float32)
    upsampled = Image.fromarray(coarse, mode="F").resize((size_hw[1], size_hw[0]), Image.Resampling.BICUBIC)
    return np.asarray(upsampled, dtype=np.float32)


def _random_dull_colours(rng: np.random.Generator, count: int) -> np.ndarray:
    return _hsv_to_rgb(rng.random(count), rng.uniform(0.05, 0.5, count), rng.uniform(0.25, 0.85, count))


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A varied textured background (float32 HxWx3, 0..255) containing no class shapes.

    Layers: a smooth multi-colour field (doubles as a gradient), optional
    mottling, optional low-contrast stripes, optional amoeba-like clutter blobs
    made by thresholding smooth noise.
    """
    grid_h, grid_w = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    colours = _random_dull_colours(rng, grid_h * grid_w).reshape(grid_h, grid_w, 3).astype(np.uint8)
    base = Image.fromarray(colours, mode="RGB").resize((width, height), Image.Resampling.BILINEAR)
    image = np.asarray(base, dtype=np.float32).copy()

    if rng.random() < 0.6:  # mottled texture
        cell = rng.uniform(3.0, 10.0)
        grid = (max(2, int(height / cell)), max(2, int(width / cell)))
        amplitude = rng.uniform(15.0, 40.0)
        image += (amplitude * (_smooth_field(rng, grid, (height, width)) - 0.5))[..., None]

    if rng.random() < 0.4:  # low-contrast stripes
        angle = rng.uniform(0.0, np.pi)
        period = rng.uniform(4.0, 16.0)
        amplitude = rng.uniform(8.0, 22.0)
        ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
        wave = np.sin(2.0 * np.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period)
        image += (amplitude * wave)[..., None]

    for _ in range(int(rng.integers(0, 4))):  # clutter blobs
        cells = rng.uniform(8.0, 24.0)
        grid = (max(2, int(height / cells)), max(2, int(width / cells)))
        blob = _smooth_field(rng, grid, (height, width)) > rng.uniform(0.62, 0.78)
        colour = _hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.75), rng.uniform(0.2, 0.9))
        alpha = rng.uniform(0.35, 0.85)
        image[blob] = (1.0 - alpha) * image[blob] + alpha * colour

    return image


# --------------------------------------------------------------------------- #
# Scene composition
# --------------------------------------------------------------------------- #


_MAX_IOU_BETWEEN_OBJECTS = 0.3
_PLACEMENT_ATTEMPTS = 30


def _iou_with(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU between one xyxy box and an ``[N, 4]`` array of boxes (``torchvision.ops.box_iou``
    in float64, so the placement threshold sees the same values as plain numpy would)."""
    import torch
    from torchvision.ops import box_iou

    if len(others) == 0:
        return np.zeros(0)
    one = torch.as_tensor(np.asarray(box, dtype=np.float64)).reshape(1, 4)
    return box_iou(one, torch.as_tensor(np.asarray(others, dtype=np.float64)).reshape(-1, 4))[0].numpy()


def _placement_is_free(box: np.ndarray, mask: np.ndarray, placed_boxes: np.ndarray, occupied: np.ndarray) -> bool:
    """Whether an object with tight ``mask`` may go at integer xyxy ``box``.

    Requires IoU < 0.3 with every placed box and no shared pixel with the
    ``occupied`` map (union of placed masks), so no object is occluded.
    """
    if np.any(_iou_with(box, placed_boxes) >= _MAX_IOU_BETWEEN_OBJECTS):
        return False
    left, top, right, bottom = (int(c) for c in box)
    return not np.any(occupied[top:bottom, left:right] & mask)


def _compose_scene(
    rng: np.random.Generator,
    objects: Sequence[tuple[int, float]],
    kind: str,
    size: tuple[int, int],
    background: str,
    return_masks: bool,
):
    """Draw ``(class_id, size_px)`` objects onto a background without heavy overlap.

    Objects are placed in order; each gets up to ``_PLACEMENT_ATTEMPTS`` random
    positions and is dropped if none has IoU < 0.3 with every placed box and no
    pixel overlap with placed masks (so every box stays tight to visible pixels).
    """
    designs = _designs(kind)
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    if background == "textured":
        image = _textured_background(rng, height, width)
    elif background == "flat":
        image = np.full((height, width, 3), 128.0, dtype=np.float32)
    else:
        raise ValueError(f"background must be 'textured' or 'flat', got {background!r}")

    occupied = np.zeros((height, width), dtype=bool)
    boxes: list[list[float]] = []
    labels: list[int] = []
    masks: list[np.ndarray] = []
    for class_id, size_px in objects:
        if not 0 <= class_id < len(designs):
            raise ValueError(f"class id {class_id} out of range for kind {kind!r} ({len(designs)} classes)")
        size_px = min(float(size_px), float(min(height, width)))
        mask, rgb = _draw_object(rng, designs[class_id], size_px)
        mask_h, mask_w = mask.shape
        placed_boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        for _ in range(_PLACEMENT_ATTEMPTS):
            top = int(rng.integers(0, height - mask_h + 1))
            left = int(rng.integers(0, width - mask_w + 1))
            box = np.array([left, top, left + mask_w, top + mask_h], dtype=np.float64)
            if not _placement_is_free(box, mask, placed_boxes, occupied):
                continue
            window = (slice(top, top + mask_h), slice(left, left + mask_w))
            occupied[window] |= mask
            image[window][mask] = rgb[mask]
            boxes.append(box.tolist())
            labels.append(int(class_id))
            if return_masks:
                full = np.zeros((height, width), dtype=bool)
                full[window] = mask
                masks.append(full)
            break

    if background == "textured":
        image += rng.normal(0.0, rng.uniform(2.0, 7.0), size=image.shape).astype(np.float32)
    image_u8 = np.clip(image + 0.5, 0, 255).astype(np.uint8)
    boxes_arr = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if return_masks:
        masks_arr = np.stack(masks) if masks else np.zeros((0, height, width), dtype=bool)
        return image_u8, boxes_arr, labels_arr, masks_arr
    return image_u8, boxes_arr, labels_arr


def _jittered_size(rng: np.random.Generator, size: tuple[int, int]) -> tuple[int, int]:
    """An image size around ``size``: area within ~+-30%, aspect W/H in [3/4, 4/3]."""
    side = math.sqrt(size[0] * size[1]) * rng.uniform(0.85, 1.15)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    return max(8, int(round(side / math.sqrt(aspect)))), max(8, int(round(side * math.sqrt(aspect))))


def render_scene(
    rng: np.random.Generator,
    class_ids: Sequence[int],
    kind: str,
    size: tuple[int, int],
    *,
    min_scale: float = 0.15,
    max_scale: float = 0.45,
    background: str = "textured",
    return_masks: bool = False,
):
    """Render one object per entry of ``class_ids`` (indices into ``class_names(kind)``).

    Object sizes are drawn uniformly in ``[min_scale, max_scale] * min(H, W)``.
    Objects that cannot be placed (IoU >= 0.3 or pixel overlap with earlier
    ones after bounded retries) are dropped and absent from the output.

    Returns ``(image uint8 [H, W, 3], boxes float32 [N, 4] xyxy, labels int64 [N])``;
    with ``return_masks=True`` also ``masks bool [N, H, W]`` (exact object pixels,
    useful for measuring CAM quality).  ``background="flat"`` gives a uniform grey
    background without noise (for tests and debugging).
    """
    short_side = min(size)
    objects = [(int(cid), rng.uniform(min_scale, max_scale) * short_side) for cid in class_ids]
    return _compose_scene(rng, objects, kind, size, background, return_masks)


def classification_sample(
    rng: np.random.Generator,
    num_classes_kind: str = "pretrain",
    size: tuple[int, int] = (128, 128),
    min_scale: float = 0.3,
    max_scale: float = 0.7,
    *,
    vary_size: bool = True,
    class_id: int | None = None,
    distractor_prob: float = 0.3,
    background: str = "textured",
):
    """An image-classification sample: one dominant object, maybe a small distractor.

    The dominant object (class ``class_id`` or a random one) has nominal side in
    ``[min_scale, max_scale] * short side``; with probability ``distractor_prob``
    a distractor of another class, at most 1/3 the dominant size, is added.  With
    ``vary_size`` the image size is jittered around ``size`` (aspect 3:4..4:3).

    Returns ``(image, label, boxes, labels)``; ``label`` is the dominant class,
    ``boxes``/``labels`` list every drawn object (dominant first).
    """
    count = num_classes(num_classes_kind)
    image_size = _jittered_size(rng, size) if vary_size else (int(size[0]), int(size[1]))
    label = int(rng.integers(0, count)) if class_id is None else int(class_id)
    dominant_px = rng.uniform(min_scale, max_scale) * min(image_size)
    objects = [(label, dominant_px)]
    if count > 1 and rng.random() < distractor_prob:
        other = int(rng.integers(0, count - 1))
        other += other >= label
        largest = dominant_px / 3.0
        objects.append((other, rng.uniform(max(0.5 * largest, min(6.0, largest)), largest)))
    image, boxes, labels = _compose_scene(rng, objects, num_classes_kind, image_size, background, False)
    return image, label, boxes, labels


def detection_sample(
    rng: np.random.Generator,
    kind: str = "downstream",
    size: tuple[int, int] = (128, 128),
    min_objects: int = 1,
    max_objects: int = 4,
    min_scale: float = 0.15,
    max_scale: float = 0.45,
    *,
    vary_size: bool = False,
    background: str = "textured",
):
    """A detection sample: ``min_objects..max_objects`` objects of random classes.

    Returns ``(image, boxes float32 [N, 4] xyxy, labels int64 [N])``.  N can fall
    below ``min_objects`` only if placement fails (crowded scenes); the first
    object always fits.
    """
    image_size = _jittered_size(rng, size) if vary_size else (int(size[0]), int(size[1]))
    object_count = int(rng.integers(min_objects, max_objects + 1))
    class_ids = rng.integers(0, num_classes(kind), size=object_count).tolist()
    return render_scene(
        rng, class_ids, kind, image_size, min_scale=min_scale, max_scale=max_scale, background=background
    )


# --------------------------------------------------------------------------- #
# Hashtag mode: multi-label scenes with noisy user tags
# --------------------------------------------------------------------------- #

# Tags that name no class, as users add them; none of them is a class hashtag.
JUNK_TAGS: tuple[str, ...] = (
    "love", "instagood", "photooftheday", "nofilter", "tbt", "happy", "weekend", "art", "picoftheday",
    "colour", "shapes", "random", "follow", "summer", "mood", "vibes", "design", "pattern", "geometry", "abstract",
)


@dataclass(frozen=True)
class TagNoise:
    """How tags differ from the true classes (all per-draw probabilities except ``junk``).

    ``missing``: a present class gets no tag. ``synonym``: a tagged present class is tagged
    with one of its other hashtags (plural or synonym) instead of its name. ``spurious``:
    each absent class gets a tag anyway. ``junk``: mean number (Poisson) of tags naming no
    class. Spelling is varied too (``#``, case, spaces), which normalisation undoes.
    """

    missing: float = 0.2
    spurious: float = 0.02
    synonym: float = 0.3
    junk: float = 1.0

    def validate(self) -> None:
        for name in ("missing", "spurious", "synonym"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TagNoise.{name} must be in [0, 1], got {value}")
        if self.junk < 0:
            raise ValueError(f"TagNoise.junk must be >= 0, got {self.junk}")


@dataclass
class NoisyTags:
    """One image's tags and what the noise did (class indices), for checking the statistics."""

    tags: list[str]
    missing: list[int]
    spurious: list[int]
    synonym: list[int]
    junk: int


def hashtag_vocabulary(names: Sequence[str]) -> dict[str, list[str]]:
    """``{class: [name, plural, synonym]}`` for synthetic classes: ``disc: [disc, discs, disc_shape]``,
    ``hourglass: [hourglass, hourglasses, hourglass_shape]``.

    Multi-word names also get the words joined (``striped_rectangle`` → ``stripedrectangle``).
    The first entry is the canonical tag; the others are what ``TagNoise.synonym`` draws.
    """
    vocabulary = {}
    for name in names:
        plural = f"{name}es" if name.endswith(("s", "x", "sh", "ch")) else f"{name}s"
        forms = [name, plural, f"{name}_shape"]
        if "_" in name:
            forms.append(name.replace("_", ""))
        vocabulary[name] = forms
    return vocabulary


def _decorate(rng: np.random.Generator, tag: str) -> str:
    """The same tag as users might write it: maybe ``#``, maybe capitalised, maybe padded."""
    if rng.random() < 0.5:
        tag = "#" + tag
    if rng.random() < 0.3:
        tag = tag.upper() if rng.random() < 0.3 else tag.capitalize()
    if rng.random() < 0.1:
        tag = f" {tag} "
    return tag


def noisy_tags(
    rng: np.random.Generator,
    present: Sequence[int],
    vocabulary: Sequence[Sequence[str]],
    rates: TagNoise,
) -> NoisyTags:
    """Noisy tags for an image whose true classes are ``present`` (indices into ``vocabulary``,
    whose entries list each class's canonical tag first, then its other forms)."""
    present_set = {int(c) for c in present}
    tags: list[str] = []
    missing, spurious, synonym = [], [], []
    for c in sorted(present_set):
        if rng.random() < rates.missing:
            missing.append(c)
            continue
        forms = vocabulary[c]
        if len(forms) > 1 and rng.random() < rates.synonym:
            synonym.append(c)
            tags.append(_decorate(rng, forms[int(rng.integers(1, len(forms)))]))
        else:
            tags.append(_decorate(rng, forms[0]))
    for c in range(len(vocabulary)):
        if c not in present_set and rng.random() < rates.spurious:
            spurious.append(c)
            forms = vocabulary[c]
            tags.append(_decorate(rng, forms[int(rng.integers(0, len(forms)))]))
    junk = int(rng.poisson(rates.junk)) if rates.junk > 0 else 0
    tags += [_decorate(rng, JUNK_TAGS[int(i)]) for i in rng.integers(0, len(JUNK_TAGS), size=junk)]
    order = rng.permutation(len(tags))
    return NoisyTags([tags[i] for i in order], missing, spurious, synonym, junk)


def hashtag_sample(
    rng: np.random.Generator,
    kind: str = "pretrain",
    size: tuple[int, int] = (128, 128),
    min_objects: int = 1,
    max_objects: int = 3,
    *,
    background: str = "textured",
):
    """A multi-label scene: ``min_objects..max_objects`` objects of *different* classes.

    Returns ``(image, boxes, labels)`` as ``render_scene``; the true image-level classes
    are ``set(labels)`` (an object that cannot be placed is absent from both).
    """
    count = num_classes(kind)
    object_count = int(rng.integers(min_objects, min(max_objects, count) + 1))
    class_ids = rng.choice(count, size=object_count, replace=False).tolist()
    return render_scene(rng, class_ids, kind, size, background=background)


@dataclass
class HashtagDataset:
    """What a hashtag writer produced: the JSONL, the vocabulary file, the class names, and
    per JSONL line the image path (as written in the JSONL), its true classes and its noise."""

    jsonl: str
    vocabulary: str
    classes: list[str]
    images: list[str]
    labels: list[list[int]]
    noise: list[NoisyTags]


def _write_hashtag_files(out_dir: str, classes: Sequence[str], rows: list[dict]) -> tuple[str, str]:
    import json

    import yaml

    from pseudobox import storage

    vocabulary_uri = storage.join(out_dir, "vocabulary.yaml")
    jsonl_uri = storage.join(out_dir, "tags.jsonl")
    storage.write_text(vocabulary_uri, yaml.safe_dump(hashtag_vocabulary(classes), sort_keys=False))
    storage.write_text(jsonl_uri, "".join(json.dumps(row) + "\n" for row in rows))
    return jsonl_uri, vocabulary_uri


def write_hashtag_dataset(
    out_dir: str,
    num_images: int,
    rates: TagNoise = TagNoise(),
    seed: int = 0,
    *,
    kind: str = "pretrain",
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 3,
) -> HashtagDataset:
    """Render ``num_images`` multi-label scenes and write ``images/*.jpg``, ``tags.jsonl``
    (image paths relative to ``out_dir``) and ``vocabulary.yaml`` under ``out_dir`` (a
    local path or URI) — the input of ``build-corpus builder=hashtags``."""
    from pseudobox import storage
    from pseudobox.datasets.corpus import encode_image

    rates.validate()
    rng = np.random.default_rng(seed)
    classes = class_names(kind)
    vocabulary = list(hashtag_vocabulary(classes).values())
    rows, images, labels, records = [], [], [], []
    for index in range(num_images):
        image, _, drawn = hashtag_sample(rng, kind, (image_size, image_size), min_objects, max_objects)
        present = sorted({int(c) for c in drawn})
        record = noisy_tags(rng, present, vocabulary, rates)
        rel = f"images/{index:07d}.jpg"
        storage.write_bytes(storage.join(out_dir, rel), encode_image(image))
        rows.append({"image": rel, "tags": record.tags})
        images.append(rel)
        labels.append(present)
        records.append(record)
    jsonl, vocabulary_uri = _write_hashtag_files(out_dir, classes, rows)
    return HashtagDataset(jsonl, vocabulary_uri, list(classes), images, labels, records)


def hashtag_view(corpus_uri: str, out_dir: str, rates: TagNoise = TagNoise(), seed: int = 0) -> HashtagDataset:
    """The hashtag view of an existing corpus: the same images (bytes copied as they are)
    with noisy tags drawn from each sample's true classes (its ``box_labels`` when it has
    boxes, else its ``labels``), plus a vocabulary of the corpus's classes, under ``out_dir``.

    Build it with ``build-corpus builder=hashtags`` to give PreDet the same images that
    classification labels give CLS and DAP. Unreadable samples are left out.
    """
    import json

    from pseudobox import storage
    from pseudobox.datasets.corpus import iter_shard, load_manifest, shard_uris

    rates.validate()
    rng = np.random.default_rng(seed)
    manifest = load_manifest(corpus_uri)
    classes = list(manifest.classes)
    vocabulary = list(hashtag_vocabulary(classes).values())

    def index_of(label) -> int:
        return classes.index(label) if isinstance(label, str) else int(label)

    rows, images, labels, records = [], [], [], []
    for shard in shard_uris(corpus_uri, manifest):
        for raw in iter_shard(shard):
            if raw.get("error") or raw.get("image") is None or raw.get("meta") is None:
                continue
            meta = json.loads(raw["meta"])
            truth = meta["box_labels"] if meta.get("boxes") else meta.get("labels", [])
            present = sorted({index_of(x) for x in truth})
            record = noisy_tags(rng, present, vocabulary, rates)
            rel = f"images/{raw['key']}.{raw['image_ext']}"
            storage.write_bytes(storage.join(out_dir, rel), raw["image"])
            rows.append({"image": rel, "tags": record.tags})
            images.append(rel)
            labels.append(present)
            records.append(record)
    jsonl, vocabulary_uri = _write_hashtag_files(out_dir, classes, rows)
    return HashtagDataset(jsonl, vocabulary_uri, classes, images, labels, records)


# --------------------------------------------------------------------------- #
# Preview
# --------------------------------------------------------------------------- #


def write_preview_grid(path: str, seed: int = 0, tile: int = 128) -> None:
    """Write a PNG for eyeballing: every class (3 instances each), then detection scenes with boxes.

    Rows 1..: one tile per class showing classification samples of that class
    (pretrain then downstream), captioned; last rows: detection samples of both
    kinds with their ground-truth boxes drawn.
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    tiles: list[tuple[np.ndarray, str, np.ndarray]] = []
    for kind in ("pretrain", "downstream"):
        for class_id, name in enumerate(class_names(kind)):
            for _ in range(2):
                image, _, boxes, _ = classification_sample(
                    rng, kind, (tile, tile), vary_size=False, class_id=class_id, distractor_prob=0.0
                )
                tiles.append((image, name, boxes))
    for kind in ("pretrain", "downstream"):
        for _ in range(8):
            image, boxes, labels = detection_sample(rng, kind, (tile, tile), max_objects=5)
            names = class_names(kind)
            tiles.append((image, f"{kind[:3]}: " + ",".join(names[i][:5] for i in labels), boxes))

    columns = 8
    caption = 12
    rows = math.ceil(len(tiles) / columns)
    sheet = Image.new("RGB", (columns * (tile + 4), rows * (tile + caption + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for index, (image, text, boxes) in enumerate(tiles):
        x0 = (index % columns) * (tile + 4)
        y0 = (index // columns) * (tile + caption + 4)
        sheet.paste(Image.fromarray(image), (x0, y0 + caption))
        draw.text((x0 + 1, y0), text[:22], fill=(0, 0, 0))
        if index >= len(tiles) - 16:
            for x1, y1, x2, y2 in boxes.tolist():
                draw.rectangle([x0 + x1, y0 + caption + y1, x0 + x2 - 1, y0 + caption + y2 - 1], outline=(255, 0, 0))
    sheet.save(path)


_USAGE = """usage:
  python -m pseudobox.datasets.synthetic OUTPUT.png                    preview grid of every class
  python -m pseudobox.datasets.synthetic hashtags OUT_DIR [NUM_IMAGES]  multi-label scenes with noisy tags
  python -m pseudobox.datasets.synthetic hashtag-view CORPUS OUT_DIR    noisy tags for an existing corpus
(hashtag outputs: OUT_DIR/tags.jsonl and OUT_DIR/vocabulary.yaml for `build-corpus builder=hashtags`)"""


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) == 1:
        write_preview_grid(args[0])
        print(f"wrote {args[0]}")
    elif args[:1] == ["hashtags"] and len(args) in (2, 3):
        made = write_hashtag_dataset(args[1], int(args[2]) if len(args) == 3 else 1000)
        print(f"wrote {len(made.images)} images, {made.jsonl} and {made.vocabulary}")
    elif args[:1] == ["hashtag-view"] and len(args) == 3:
        made = hashtag_view(args[1], args[2])
        print(f"wrote {len(made.images)} images, {made.jsonl} and {made.vocabulary}")
    else:
        sys.exit(_USAGE)
